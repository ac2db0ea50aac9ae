"""The README's pictures, from real runs: train, then copy the figures out of the TensorBoard event files.

python scripts/make_figures.py [--out docs/images] [--configs configs/line.yaml configs/mlp_classification.yaml]

Each config is trained exactly as ``make train CONFIG=…`` trains it (``trainer fit --config FILE``, into a
temporary folder); the images are read back with TensorBoard's EventAccumulator, so what lands in
docs/images/ is what a user sees in the Images tab. Written: ``<config>_<figure>.png`` for the last frame
of every figure, and ``<config>_<figure>_start.png`` for the first where there is an earlier one.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/line.yaml", "configs/mlp_classification.yaml"]


def train(config: str, save_dir: Path) -> Path:
    """``trainer fit --config config`` with its runs under ``save_dir``; returns the run's version folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "trainer", "fit", "--config", config]
    args += ["--trainer.logger.init_args.save_dir", str(save_dir), "--progress_bar.refresh_rate", "0"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: `trainer fit --config {config}` failed:\n{result.stderr[-2000:]}")
    print(result.stdout.strip())
    runs = sorted(save_dir.glob("*/version_*"))
    if len(runs) != 1:
        raise SystemExit(f"error: expected one run under {save_dir}, found {len(runs)}")
    return runs[0]


def extract(run: Path, stem: str, out: Path) -> list[Path]:
    """Write the last frame of every image tag of ``run``, and its first if earlier; returns the files."""
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    written = []
    for tag in acc.Tags()["images"]:
        frames = acc.Images(tag)
        name = tag.removeprefix("figures/")
        ends = [("", frames[-1])] + ([("_start", frames[0])] if frames[0].step < frames[-1].step else [])
        for suffix, frame in ends:
            path = out / f"{stem}_{name}{suffix}.png"
            # the same pixels, re-compressed harder than training's fast PNGs: small files for the repository
            Image.open(io.BytesIO(frame.encoded_image_string)).save(path, format="PNG", optimize=True)
            written.append(path)
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {tag} at step {frame.step}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            run = train(config, Path(tmp))
            if not extract(run, Path(config).stem, args.out):
                raise SystemExit(f"error: the run of {config} logged no figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
