"""The figures' text, set from glyphs that FreeType rendered once and a file on disk keeps.

PIL draws text through FreeType: loading its text modules and FreeType's library takes a process about
2.6 ms, and each font size 0.15 ms more; on a short run, such as the seed's line, that was a quarter of
what its pictures cost. A ``Face`` is one font at one size: for each character, the bitmap FreeType
renders for it alone (anchored at the pen's place on the baseline) and its advance. A label is the
characters' bitmaps laid side by side by their advances and combined by their maximum, as PIL combines
them, so at a whole-pixel position it is PIL's own rendering, pixel for pixel (no kerning: DejaVu Sans
kerns few pairs, by less than a fiftieth of a pixel at these sizes). The origin is rounded to whole
pixels, where PIL would shift the outlines by the fraction.

The glyphs are kept in ``glyph_cache()`` (``$HANDGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/handgrad``, else
``~/.cache/handgrad``), one file per font and size, keyed by the font file, its size and time, the pixel
size and PIL's version. A run reads the files (0.35 ms for the figures' three sizes) and imports nothing of
FreeType; a user's first run on a machine renders the printable ASCII and a few signs (about 2 ms a size,
after FreeType's import) and writes the files; a character missing from it is rendered when first asked for,
and the file written again. A file that cannot be read or written is only a slower run: the glyphs are
rendered in memory, as without a cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1  # the cache file's layout; a change of it makes every older file a miss
MAGIC = b"handgrad glyphs\n"
# What a face renders when it is first made: printable ASCII, and the signs the figures' own labels use
FIRST_CHARACTERS = "".join(chr(c) for c in range(32, 127)) + "−·×±°²³ŷμσθλ∂∇Δ₀₁₂→…"
ANCHORS_HORIZONTAL = "lmr"  # the left, middle or right of the text's advance
ANCHORS_VERTICAL = "asmd"  # ascender, baseline, halfway between ascender and descender, descender


def glyph_cache() -> Path:
    """Where the glyph files are kept (``HANDGRAD_CACHE_DIR``, ``XDG_CACHE_HOME`` or ``~/.cache``)."""
    explicit = os.environ.get("HANDGRAD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "handgrad"


def _whole(value: float) -> int:
    """The whole pixel nearest ``value``, halves rounded up."""
    return math.floor(value + 0.5)


class Face:
    """One font (a TrueType file, or PIL's default font where ``file`` is None) at ``pixels`` per em.

    ``glyphs`` maps a character to ``(left, top, mask, advance)``: its bitmap (an (h, w) uint8 array) with
    its top left at (left, top) from the pen's place on the baseline, and how far the pen then moves.
    ``ascent`` and ``descent`` are the font's, in whole pixels as PIL gives them (the descent positive).
    """

    def __init__(self, file: str | None, pixels: float, cache: Path | None) -> None:
        self.file, self.pixels = file, pixels
        self.glyphs: dict[str, tuple[int, int, np.ndarray, float]] = {}
        self.ascent = self.descent = 0
        self._font: Any = None  # PIL's FreeType font, loaded only to render a glyph the file lacks
        self._stored: dict[str, int] = {}  # the cache file's characters not yet in ``glyphs``: their rows
        self._blob = b""
        self._key = self._identity()
        digest = hashlib.sha1(self._key.encode()).hexdigest()[:20]
        self.path = None if cache is None else cache / f"{digest}.glyphs"
        if not self._load():
            self._render(FIRST_CHARACTERS)

    # ------------------------------------------------------------------ the cache file
    # MAGIC, the key's length and the key (UTF-8), ascent, descent, the number of glyphs n, their characters
    # (a length, then UTF-8), n rows of ``ROW`` (left, top, width, height, the mask's offset, advance), then
    # the masks, row by row. A glyph is made from its row when first asked for.

    ROW = struct.Struct("<iiiiId")

    def _identity(self) -> str:
        import PIL

        stat = os.stat(self.file) if self.file else None
        where = f"{self.file}|{stat.st_size}|{stat.st_mtime_ns}" if stat else "PIL's default font"
        return f"{FORMAT}|{where}|{self.pixels!r}|{PIL.__version__}"

    def _load(self) -> bool:
        """Index the glyphs of the cache file: False where it is missing, unreadable or another's."""
        if self.path is None:
            return False
        try:
            blob = self.path.read_bytes()
            at = len(MAGIC)
            if not blob.startswith(MAGIC):
                return False
            (length,) = struct.unpack_from("<I", blob, at)
            if blob[at + 4 : at + 4 + length].decode() != self._key:
                return False
            at += 4 + length
            ascent, descent, count = struct.unpack_from("<iiI", blob, at)
            at += 12
            (size,) = struct.unpack_from("<I", blob, at)
            characters = blob[at + 4 : at + 4 + size].decode()
            at += 4 + size
            rows, masks = at, at + self.ROW.size * count
            last = self.ROW.unpack_from(blob, rows + self.ROW.size * (count - 1)) if count else (0,) * 6
            if len(characters) != count or len(blob) < masks + last[4] + last[2] * last[3]:
                return False  # cut short
        except (OSError, UnicodeDecodeError, struct.error):
            return False
        self._blob, self._rows, self._masks = blob, rows, masks
        self._stored = {ch: i for i, ch in enumerate(characters)}
        self.ascent, self.descent = ascent, descent
        return True

    def _glyph(self, ch: str) -> tuple[int, int, np.ndarray, float] | None:
        """The glyph of ``ch`` from the cache file (then kept in ``glyphs``), or None where it has none."""
        i = self._stored.pop(ch, None)
        if i is None:
            return None
        left, top, width, height, offset, advance = self.ROW.unpack_from(self._blob, self._rows + self.ROW.size * i)
        try:
            mask = np.frombuffer(self._blob, np.uint8, width * height, self._masks + offset).reshape(height, width)
        except ValueError:  # a row the file's checks missed (a flipped bit): FreeType renders it again
            return None
        glyph = self.glyphs[ch] = (left, top, mask, advance)
        return glyph

    def _save(self) -> None:
        """Write every glyph to the cache file, through a temporary file and a rename; skipped on failure."""
        if self.path is None:
            return
        for ch in list(self._stored):
            self._glyph(ch)
        characters = "".join(self.glyphs)
        rows, masks, offset = [], [], 0
        for left, top, mask, advance in self.glyphs.values():
            height, width = mask.shape
            rows.append(self.ROW.pack(left, top, width, height, offset, advance))
            masks.append(mask.tobytes())
            offset += width * height
        key = self._key.encode()
        head = MAGIC + struct.pack("<I", len(key)) + key + struct.pack("<iiI", self.ascent, self.descent, len(rows))
        text = characters.encode()
        blob = head + struct.pack("<I", len(text)) + text + b"".join(rows) + b"".join(masks)
        tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ------------------------------------------------------------------ rendering by FreeType

    def _render(self, characters: str) -> None:
        """Render ``characters`` by FreeType into ``glyphs``, then write the cache file."""
        from PIL import Image, ImageFont

        if self._font is None:
            self._font = (
                ImageFont.truetype(self.file, self.pixels, layout_engine=ImageFont.Layout.BASIC)
                if self.file
                else ImageFont.load_default(self.pixels)
            )
            self.ascent, self.descent = self._font.getmetrics()
        for ch in characters:
            if ch in self.glyphs or self._glyph(ch) is not None:
                continue
            core, (left, top) = self._font.getmask2(ch, mode="L", anchor="ls")
            width, height = core.size
            if width and height:
                mask = np.frombuffer(Image.Image()._new(core).tobytes(), np.uint8).reshape(height, width)
            else:  # a space: nothing to set, only an advance
                mask = np.zeros((0, 0), np.uint8)
            self.glyphs[ch] = (left, top, mask, float(self._font.getlength(ch)))
        self._save()

    def _missing(self, text: str) -> None:
        """Make sure every character of ``text`` is in ``glyphs``: from the cache file, else by FreeType."""
        glyphs = self.glyphs
        missing = "".join(dict.fromkeys(ch for ch in text if ch not in glyphs and self._glyph(ch) is None))
        if missing:
            self._render(missing)

    # ------------------------------------------------------------------ setting text

    def length(self, text: str) -> float:
        """How far the pen moves over ``text``, in pixels (PIL's ``getlength``)."""
        self._missing(text)
        glyphs = self.glyphs
        return sum(glyphs[ch][3] for ch in text)

    def mask(self, text: str) -> tuple[np.ndarray, int, int]:
        """``text`` as one (h, w) uint8 coverage array, with the (left, top) of its top left from the pen's
        place on the baseline at the start; (0, 0) in size for text with no ink."""
        self._missing(text)
        glyphs, pen, placed = self.glyphs, 0.0, []
        for ch in text:
            left, top, mask, advance = glyphs[ch]
            if mask.size:
                placed.append((_whole(pen) + left, top, mask))
            pen += advance
        if not placed:
            return np.zeros((0, 0), np.uint8), 0, 0
        x0 = min(x for x, _, _ in placed)
        y0 = min(y for _, y, _ in placed)
        x1 = max(x + m.shape[1] for x, _, m in placed)
        y1 = max(y + m.shape[0] for _, y, m in placed)
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for x, y, mask in placed:
            region = out[y - y0 : y - y0 + mask.shape[0], x - x0 : x - x0 + mask.shape[1]]
            np.maximum(region, mask, out=region)
        return out, x0, y0

    def origin(self, at: tuple[float, float], text: str, anchor: str) -> tuple[float, float]:
        """The pen's place on the baseline at the start of ``text`` anchored at ``at`` by ``anchor`` (two
        letters, as PIL's: ``ANCHORS_HORIZONTAL`` then ``ANCHORS_VERTICAL``)."""
        horizontal, vertical = anchor
        if horizontal not in ANCHORS_HORIZONTAL or vertical not in ANCHORS_VERTICAL:
            raise ValueError(f"anchor {anchor!r}: use one of {ANCHORS_HORIZONTAL!r} then one of {ANCHORS_VERTICAL!r}")
        x, y = at
        if horizontal != "l":
            x -= self.length(text) * (0.5 if horizontal == "m" else 1.0)
        y += {"a": self.ascent, "s": 0.0, "m": (self.ascent - self.descent) / 2, "d": -self.descent}[vertical]
        return x, y


def draw_text(pen: Any, at: tuple[float, float], text: str, face: Face, ink: int, anchor: str = "la") -> None:
    """Set ``text`` by ``pen``, a PIL drawing core (``Image.core.draw``), in its colour ``ink``
    (``pen.draw_ink``), anchored at ``at`` (``Face.origin``)."""
    from PIL import Image

    mask, left, top = face.mask(text)
    if not mask.size:
        return
    x, y = face.origin(at, text, anchor)
    height, width = mask.shape
    bitmap = Image.frombuffer("L", (width, height), mask, "raw", "L", 0, 1)
    pen.draw_bitmap((_whole(x) + left, _whole(y) + top), bitmap.im, ink)


def draw_vertical(pen: Any, at: tuple[float, float], text: str, face: Face, ink: int) -> None:
    """``text`` turned a quarter left (it reads from the bottom up), the right edge and the middle of its
    ink at ``at``."""
    from PIL import Image

    mask, _, _ = face.mask(text)
    if not mask.size:
        return
    turned = np.ascontiguousarray(np.rot90(mask))
    height, width = turned.shape
    bitmap = Image.frombuffer("L", (width, height), turned, "raw", "L", 0, 1)
    pen.draw_bitmap((_whole(at[0] - width), _whole(at[1] - height / 2)), bitmap.im, ink)


@functools.cache
def face(file: str | None, pixels: float) -> Face:
    """The ``Face`` of ``file`` at ``pixels`` per em, one per process, read from the glyph cache."""
    return Face(file, pixels, glyph_cache())


__all__ = ["Face", "draw_text", "draw_vertical", "face", "glyph_cache"]
