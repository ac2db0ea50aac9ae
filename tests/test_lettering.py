"""The figures' text from cached glyphs: PIL's own rendering where it can be, a cache that cannot break a run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _util import ROOT, run_cli
from PIL import Image, ImageDraw, ImageFont
from tb_helpers import events

from trainer import lettering
from trainer.figures import _font_file

FONT = _font_file()
LABELS = ["0.5", "−1.25", "2.5e-09", "slope m", "intercept c", "C(m, c)   step 487   cost − optimum 0.00123"]
SIZES = [11.25, 12.5, 15.0]  # the figures' 9, 10 and 12 points at 90 dpi


def _pil(size: float) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(FONT, size, layout_engine=ImageFont.Layout.BASIC)


def _ours(face: lettering.Face, text: str, at: tuple[float, float], anchor: str, shape=(60, 420)) -> np.ndarray:
    image = Image.new("L", shape[::-1])
    pen = Image.core.draw(image.im, 0)
    lettering.draw_text(pen, at, text, face, pen.draw_ink(255), anchor)
    return np.asarray(image)


def _theirs(size: float, text: str, at: tuple[float, float], anchor: str, shape=(60, 420)) -> np.ndarray:
    image = Image.new("L", shape[::-1])
    ImageDraw.Draw(image).text(at, text, fill=255, font=_pil(size), anchor=anchor)
    return np.asarray(image)


def _ink_box(a: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(a)
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "glyphs"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", LABELS)
def test_text_at_a_whole_pixel_is_pils_own_rendering(cache, size, text):
    """Anchored by its left end on the baseline at a whole pixel, a label is FreeType's rendering of the
    whole string, pixel for pixel."""
    face = lettering.Face(FONT, size, cache)
    ours, theirs = _ours(face, text, (10, 40), "ls"), _theirs(size, text, (10, 40), "ls")
    assert theirs.any()
    np.testing.assert_array_equal(ours, theirs)
    assert face.length(text) == _pil(size).getlength(text)


@pytest.mark.parametrize("anchor", ["la", "ma", "rm", "ms", "ld", "rd", "ra", "mm"])
@pytest.mark.parametrize("at", [(200, 30), (200.4, 30.6), (199.5, 29.5)])
def test_every_anchor_the_figures_use_puts_the_ink_where_pil_does(cache, anchor, at):
    """Within a pixel: PIL shifts the outlines by a fractional start, the glyph cache rounds it."""
    face = lettering.Face(FONT, 12.5, cache)
    for text in LABELS:
        ours, theirs = _ours(face, text, at, anchor), _theirs(12.5, text, at, anchor)
        assert max(abs(a - b) for a, b in zip(_ink_box(ours), _ink_box(theirs), strict=True)) <= 1, (text, anchor)
        assert abs(int(ours.astype(np.int64).sum()) - int(theirs.astype(np.int64).sum())) <= 0.05 * theirs.sum()


def test_an_unknown_anchor_is_refused_by_name(cache):
    face = lettering.Face(FONT, 12.5, cache)
    with pytest.raises(ValueError, match="anchor 'lt'"):
        face.origin((0, 0), "x", "lt")


def test_vertical_text_is_the_horizontal_ink_turned_a_quarter_left(cache):
    face = lettering.Face(FONT, 12.5, cache)
    text = "intercept c"
    image = Image.new("L", (60, 200))
    pen = Image.core.draw(image.im, 0)
    lettering.draw_vertical(pen, (40, 100), text, face, pen.draw_ink(255))
    ours = np.asarray(image)
    flat = _theirs(12.5, text, (10, 40), "ls")
    top, bottom, left, right = _ink_box(flat)
    turned = np.asarray(Image.fromarray(flat[top : bottom + 1, left : right + 1]).transpose(Image.Transpose.ROTATE_90))
    top, bottom, left, right = _ink_box(ours)
    np.testing.assert_array_equal(ours[top : bottom + 1, left : right + 1], turned)
    assert right == 39 and abs((top + bottom) / 2 - 100) <= 1  # its right edge and middle at (40, 100)


def test_a_second_face_reads_the_file_and_renders_nothing(cache, monkeypatch):
    first = lettering.Face(FONT, 12.5, cache)
    (path,) = cache.glob("*.glyphs")
    assert path == first.path
    masks = {text: first.mask(text) for text in LABELS}
    monkeypatch.setattr(lettering.Face, "_render", lambda self, characters: pytest.fail(f"rendered {characters!r}"))
    second = lettering.Face(FONT, 12.5, cache)
    for text, (mask, left, top) in masks.items():
        again, left_again, top_again = second.mask(text)
        np.testing.assert_array_equal(again, mask)
        assert (left_again, top_again) == (left, top)
    assert (second.ascent, second.descent) == (first.ascent, first.descent) == _pil(12.5).getmetrics()


def test_each_size_has_its_own_file(cache):
    paths = {lettering.Face(FONT, size, cache).path for size in SIZES}
    assert len(paths) == len(SIZES) and all(p.is_file() for p in paths)


def test_a_character_the_file_lacks_is_rendered_once_and_added_to_it(cache):
    text = "ζ ≈ ∞"  # none of them among the first characters
    assert not set(text) - {" "} & set(lettering.FIRST_CHARACTERS)
    first = lettering.Face(FONT, 12.5, cache)
    before = first.path.stat().st_size
    mask, _, _ = first.mask(text)
    np.testing.assert_array_equal(_ours(first, text, (10, 40), "ls"), _theirs(12.5, text, (10, 40), "ls"))
    assert first.path.stat().st_size > before
    second = lettering.Face(FONT, 12.5, cache)
    assert "ζ" in second._stored
    np.testing.assert_array_equal(second.mask(text)[0], mask)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another key"])
def test_a_damaged_or_foreign_file_is_rendered_again_and_rewritten(cache, damage):
    good = lettering.Face(FONT, 12.5, cache)
    reference = {text: good.mask(text)[0] for text in LABELS}
    blob = good.path.read_bytes()
    damaged = {
        "truncated": blob[: len(blob) // 2],
        "garbage": os.urandom(len(blob)),
        "empty": b"",
        "another key": blob.replace(b"|12.5|", b"|12.6|", 1),
    }[damage]
    assert damaged != blob
    good.path.write_bytes(damaged)
    again = lettering.Face(FONT, 12.5, cache)
    for text, mask in reference.items():
        np.testing.assert_array_equal(again.mask(text)[0], mask)
    assert good.path.read_bytes() == blob  # written again whole


def test_an_unwritable_cache_only_costs_the_rendering(tmp_path):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    face = lettering.Face(FONT, 12.5, blocked / "glyphs")
    np.testing.assert_array_equal(_ours(face, "0.5", (10, 40), "ls"), _theirs(12.5, "0.5", (10, 40), "ls"))
    assert list(tmp_path.iterdir()) == [blocked]  # no temporary file left behind
    assert lettering.Face(FONT, 12.5, None).mask("0.5")[0].any()  # no cache at all


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HANDGRAD_CACHE_DIR", str(tmp_path / "mine"))
    assert lettering.glyph_cache() == tmp_path / "mine"
    monkeypatch.delenv("HANDGRAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lettering.glyph_cache() == tmp_path / "xdg" / "handgrad"


def test_with_the_cache_in_place_a_run_draws_its_figures_without_loading_freetype(tmp_path, monkeypatch):
    """What the cache is for: a `trainer fit` of the line draws its end figures with PIL's text modules and
    FreeType's library never loaded, once a first run has filled the cache."""
    monkeypatch.setenv("HANDGRAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    freetype = ["PIL.ImageFont", "PIL.ImageDraw", "PIL._imagingft"]
    loaded = []
    for run in range(2):
        out = tmp_path / f"modules{run}.json"
        probe = json.dumps({"class_path": "_probes.ModulesProbe", "init_args": {"path": str(out), "modules": freetype}})
        done = run_cli(
            "fit", "--config", "configs/line.yaml", "--trainer.max_steps", "5", "--progress_bar.refresh_rate", "0",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), f"--trainer.callbacks+={probe}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        loaded.append(json.loads(out.read_text()))
    second = tmp_path / "runs" / "line" / "version_1"
    assert {"figures/fit", "figures/cost_surface"} <= set(events(second).Tags()["images"])  # drawn, and read back
    assert loaded[0] == ["PIL.ImageFont", "PIL._imagingft"]  # the first run fills the cache
    assert loaded[1] == []
