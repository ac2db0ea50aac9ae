"""What the pictures cost, taken apart: the figures and histograms timed inside a run, against the whole command.

python scripts/benchmark_figures.py [--quick]

The measure the issue asks for is ``figures.<config>`` in scripts/benchmark.py (``trainer.fit`` with the
pictures ÷ without, plus what a fresh process pays for them once); this script uses its runs and adds the
details. Each config runs a fixed number of updates (the convergence stop off) in three variants, interleaved and
repeated so that a busy moment of a shared machine hits every variant alike:

- ``bare``: no monitor scalars, no live gradient check, no histograms, no figures;
- ``scalars``: the monitor's scalars and the live gradient check at their defaults;
- ``all``: everything at its defaults, figures and histograms included.

Reported per config (medians over the repeats):

- ``share_of_fit``: the seconds the figure and histogram callbacks timed themselves drawing, ÷ the
  ``all`` variant's ``trainer.fit`` seconds: the strict measure, and the least noisy;
- ``share_of_run``: the same seconds ÷ the wall time of the whole ``trainer fit`` command (start-up
  included, timed as a subprocess): what the user waits for;
- ``ab_overhead``: all ÷ scalars − 1 of the ``trainer.fit`` seconds (noisy on a shared machine);
- ``scalars_overhead``: scalars ÷ bare − 1, the cost of the monitor and the live gradient check.

python scripts/benchmark_figures.py --fresh N [--configs line,mlp_classification]

measures instead what ``figures.<config>`` estimates, without its accounting: N pairs of fresh processes,
alternately with the pictures at their defaults and without them. Each process imports the trainer, makes
two 1-update fits without pictures (Lightning's own first-fit costs, alike for both), then the config's
fit, whose process CPU seconds it reports. With the pictures, that fit also pays their imports and first
use, as a user's run does. Reported: the median fit of each side, the mean difference with its standard
error, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmark import PICTURE_RUNS, PICTURES_OFF, _quiet, fit_args, timed_fit  # noqa: E402  (scripts/ is on sys.path)

OFF_SCALARS = ["--monitor.every_n_steps", "0", "--gradcheck.every_n_steps", "0"]
VARIANTS = {"bare": PICTURES_OFF + OFF_SCALARS, "scalars": PICTURES_OFF, "all": []}


def _fit(config: str, steps: int, extra: list[str], save_dir: str) -> dict:
    """One in-process ``trainer fit`` of ``steps`` updates: its wall seconds and the pictures' own seconds."""
    return timed_fit(fit_args(config, steps, save_dir, *extra), time.perf_counter)


def _run(config: str, steps: int, save_dir: str) -> float:
    """The wall seconds of the whole ``trainer fit`` command, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "trainer", "fit", *fit_args(config, steps, save_dir)]
    begin = time.perf_counter()
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - begin


def measure(quick: bool = False) -> dict:
    """Time configs/line.yaml and configs/mlp_classification.yaml with and without the pictures.

    Returns ``{"quick", "repeats", "<config stem>": {...}}`` with, per config: ``steps``, the median
    ``seconds`` of each variant, ``share_of_fit``, ``share_of_run``, ``ab_overhead``, ``scalars_overhead``,
    ``pictures_seconds``, ``run_seconds`` and how many figure and histogram sets were drawn.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs = dict(PICTURE_RUNS.values())  # the runs' real lengths
    repeats = 1 if quick else 3
    out: dict = {"quick": quick, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for config, steps in runs.items():
            times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            pictures, shares, whole = [], [], []
            last: dict = {}
            for r in range(repeats):
                order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
                for name in order:
                    result = _fit(config, steps, VARIANTS[name], tmp)
                    times[name].append(result["seconds"])
                    if name == "all":
                        last = result
                        pictures.append(result["pictures_seconds"])
                        shares.append(result["pictures_seconds"] / result["seconds"])
                whole.append(_run(config, steps, tmp))
            median = {name: statistics.median(ts) for name, ts in times.items()}
            out[Path(config).stem] = {
                "steps": steps,
                "seconds": median,
                "share_of_fit": statistics.median(shares),
                "share_of_run": statistics.median(pictures) / statistics.median(whole),
                "ab_overhead": median["all"] / median["scalars"] - 1.0,
                "scalars_overhead": median["scalars"] / median["bare"] - 1.0,
                "pictures_seconds": statistics.median(pictures),
                "run_seconds": statistics.median(whole),
                "figure_sets": last["figure_sets"],
                "histogram_sets": last["histogram_sets"],
            }
    return out


def _fresh_child(config: str, steps: int, pictures: bool) -> None:
    """Run in a fresh interpreter by ``fresh``: prints one fit's ``timed_fit`` result (CPU seconds) as JSON."""
    import gc

    import torch

    import trainer.cli  # noqa: F401  (what every `trainer fit` imports before it trains)

    torch.set_num_threads(1)
    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # Lightning's own first-fit costs, paid by both sides alike
            timed_fit(fit_args(config, 1, tmp, *PICTURES_OFF), time.process_time)
        gc.collect()
        overrides = [] if pictures else PICTURES_OFF
        print(json.dumps(timed_fit(fit_args(config, steps, tmp, *overrides), time.process_time)))


def fresh(config: str, steps: int, pairs: int) -> dict:
    """``pairs`` pairs of fresh processes, alternately with and without the pictures (``_fresh_child``).

    Returns ``config``, ``steps``, ``pairs``, the fits' seconds of each side (``with``, ``without``), their
    ``figure_sets`` (every fit with pictures draws its end set, none without), ``difference`` (the mean of
    the pairs' differences, seconds), its standard error ``difference_se`` (0 for one pair) and ``ratio``
    (the median with ÷ the median without).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scripts = str(Path(__file__).resolve().parent)
    sides: dict[str, list[dict]] = {"with": [], "without": []}
    for i in range(pairs):
        for side in ("with", "without") if i % 2 == 0 else ("without", "with"):
            code = (
                f"import sys; sys.path.insert(0, {scripts!r}); import benchmark_figures; "
                f"benchmark_figures._fresh_child({config!r}, {steps}, {side == 'with'})"
            )
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                failed = f"a fresh process timing {config} failed (exit {done.returncode})"
                raise RuntimeError(f"{failed}: {done.stderr[-500:]}")
            sides[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    seconds = {side: [r["seconds"] for r in results] for side, results in sides.items()}
    differences = [a - b for a, b in zip(seconds["with"], seconds["without"], strict=True)]
    spread = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
    return {
        "config": config,
        "steps": steps,
        "pairs": pairs,
        **seconds,
        "figure_sets": {side: [r["figure_sets"] for r in results] for side, results in sides.items()},
        "difference": statistics.mean(differences),
        "difference_se": spread,
        "ratio": statistics.median(seconds["with"]) / statistics.median(seconds["without"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--fresh", type=int, metavar="N", help="N pairs of fresh processes instead (see above)")
    names = ", ".join(PICTURE_RUNS)
    parser.add_argument("--configs", default="line", help=f"with --fresh: comma-separated, of {names}")
    args = parser.parse_args(argv)
    if args.fresh is not None:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in PICTURE_RUNS]
        if args.fresh < 1 or unknown or not names:
            print(f"error: --fresh takes N ≥ 1 and --configs names from {', '.join(PICTURE_RUNS)}")
            return 2
        for name in names:
            r = fresh(*PICTURE_RUNS[name], args.fresh)
            print(
                f"{name}: {r['pairs']} pairs of fresh processes; the fit took "
                f"{1e3 * statistics.median(r['with']):.1f} ms with its pictures, "
                f"{1e3 * statistics.median(r['without']):.1f} ms without (medians); "
                f"difference {1e3 * r['difference']:.1f} ± {1e3 * r['difference_se']:.1f} ms; ratio {r['ratio']:.3f}"
            )
            print(json.dumps(r, indent=2))
        return 0
    result = measure(args.quick)
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        s = r["seconds"]
        print(
            f"{name:<19} {r['steps']:>5} steps: pictures {1e3 * r['pictures_seconds']:.0f} ms = "
            f"{100 * r['share_of_fit']:.1f} % of trainer.fit ({s['all']:.2f} s), "
            f"{100 * r['share_of_run']:.1f} % of the run ({r['run_seconds']:.2f} s); "
            f"A/B {100 * r['ab_overhead']:+.1f} %; scalars {100 * r['scalars_overhead']:+.1f} %; "
            f"{r['figure_sets']} figure sets, {r['histogram_sets']} histogram sets"
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
