"""The figures and histograms: drawn right, drawn rarely enough, and within their share of the time."""

from __future__ import annotations

import io
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tb_helpers import QUIET, ROOT

from trainer.budget import TimeBudget
from trainer.data import ClassificationData, LineData
from trainer.figures import CostSurfaceFigure, DecisionRegionsFigure, Figures, FitFigure, _ellipses, png
from trainer.monitor import HISTOGRAM_BINS, histogram_value
from trainer.optimum import LeastSquares, squared_error


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_runs_first_then_pays_back():
    clock = FakeClock()
    budget = TimeBudget(every_n_steps=10, max_overhead=0.02, clock=clock)
    assert budget.due(0)
    with budget.timed(0):
        clock.now += 0.1  # the first figures take 0.1 s
    clock.now += 1.0
    assert not budget.due(5)  # too few updates since
    assert not budget.due(10)  # 0.1 + 0.1 s spent would exceed 2 % of 1.1 s
    clock.now = 10.0
    assert budget.due(10)  # 0.2 s ≤ 2 % of 10 s


@pytest.mark.parametrize(("step_s", "work_s"), [(0.001, 0.03), (0.05, 0.03), (0.0001, 0.2)])
def test_budget_keeps_the_overhead_below_its_share(step_s, work_s):
    clock = FakeClock()
    budget = TimeBudget(every_n_steps=1, max_overhead=0.02, clock=clock)
    for step in range(20_000):
        clock.now += step_s
        if budget.due(step):
            with budget.timed(step):
                clock.now += work_s
    elapsed = clock.now
    assert budget.count >= 1
    assert budget.spent <= 0.02 * elapsed + work_s  # within the share, but for the first piece


def test_budget_with_a_first_cost_waits_until_it_is_earned():
    clock = FakeClock()
    budget = TimeBudget(every_n_steps=10, max_overhead=0.01, clock=clock, first_cost=0.02)
    assert not budget.due(0)  # 0.02 s would be all of the first seconds
    clock.now = 1.0
    assert not budget.due(10)  # 1 % of 1 s is 0.01 s
    clock.now = 2.5
    assert budget.due(10)
    with budget.timed(10):
        clock.now += 0.005  # cheaper than assumed: the measured cost is the estimate from now on
    clock.now = 3.0
    assert budget.due(20)  # 0.005 + 0.005 s ≤ 1 % of 3 s


def test_budget_settings_are_checked():
    with pytest.raises(ValueError, match=r"figures.max_overhead = 0 is invalid"):
        TimeBudget(10, 0, key="figures")
    with pytest.raises(ValueError, match=r"histograms.every_n_steps = -2 is invalid"):
        TimeBudget(-2, 0.1, key="histograms")
    assert not TimeBudget(0, 0.1).due(0)  # 0 turns it off


def _fit_figure():
    dm = LineData()
    x, y = dm.x_train.numpy(), dm.y_train.numpy()
    xs = np.linspace(-2.2, 2.2, 200)
    return FitFigure(x, y, x[:0], y[:0], xs, None, dpi=80), xs


def test_a_blitted_frame_is_the_frame_drawn_from_scratch():
    """Redrawing only what moves gives the same pixels as building the figure for that state."""
    reused, xs = _fit_figure()
    reused.draw(np.zeros((200, 1)), "step 0")  # the first frame: its still parts drawn straight in
    second = reused.draw(-xs[:, None], "step 5").copy()  # the still parts kept from here on
    np.testing.assert_array_equal(second, _fit_figure()[0].draw(-xs[:, None], "step 5"))
    blitted = reused.draw(2 * xs[:, None] - 1, "step 9").copy()
    fresh, _ = _fit_figure()
    drawn = fresh.draw(2 * xs[:, None] - 1, "step 9")
    assert blitted.shape == (300, 400, 3) and blitted.dtype == np.uint8
    np.testing.assert_array_equal(blitted, drawn)
    assert not np.array_equal(blitted, reused.draw(np.zeros((200, 1)), "step 0"))


def test_figures_drawn_one_after_another_share_memory_but_not_pixels():
    """First frames are drawn in scratch images shared by figures of a size: a frame is the same whether
    another figure was drawn before it, and a frame handed out is not changed by the next one."""
    dm = LineData()
    quad = LeastSquares(dm.x_train, dm.y_train, "mean")
    path = np.stack([np.linspace(1.0, 1.9, 50), np.linspace(0.0, -1.0, 50)], 1)
    fit, xs = _fit_figure()
    line = fit.draw(2 * xs[:, None] - 1, "step 9")
    kept = line.copy()
    after_the_fit = CostSurfaceFigure(quad, (1.0, 0.0), dpi=80).draw(path, "step 49")
    np.testing.assert_array_equal(line, kept)  # the fit's frame, untouched by the surface drawn after it
    assert (line[0, 0] == 255).all() and (after_the_fit[0, 0] == 255).all()  # each on a white picture
    again = CostSurfaceFigure(quad, (1.0, 0.0), dpi=80).draw(path, "step 49")  # after one like it
    np.testing.assert_array_equal(after_the_fit, again)
    np.testing.assert_array_equal(_fit_figure()[0].draw(2 * xs[:, None] - 1, "step 9"), kept)


def test_cost_surface_is_the_squared_error():
    dm = LineData()
    quad = LeastSquares(dm.x_train, dm.y_train, "mean")
    gen = torch.Generator().manual_seed(0)
    m, c = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    surface = quad.costs(m, c)
    for i in range(7):
        exact = squared_error(dm.x_train, dm.y_train, m[i].reshape(1, 1), c[i].reshape(1), "mean")
        assert surface[i].item() == pytest.approx(exact, rel=1e-10)
    figure = CostSurfaceFigure(quad, (1.0, 0.0), dpi=80)
    path = np.stack([np.linspace(1.0, 1.9, 50), np.linspace(0.0, -1.0, 50)], 1)
    assert figure.draw(path, "step 49").shape == (300, 400, 3)


def test_decision_regions_draw_the_classes():
    dm = ClassificationData(n=200)
    x, labels = dm.x_train.numpy(), dm.y_train.numpy()
    figure = DecisionRegionsFigure(x, labels, 2, (-1.5, 2.5, -1.0, 1.5), resolution=20, dpi=80)
    zeros = figure.draw(np.zeros((20, 20), dtype=int), "step 0").copy()
    halves = figure.draw(np.repeat([[0] * 10 + [1] * 10], 20, axis=0), "step 0")
    assert not np.array_equal(zeros, halves)  # the right half changed class


@pytest.mark.parametrize("deflater", ["isal", "zlib"])
@pytest.mark.parametrize("channels", [3, 4])
def test_png_holds_the_pixels(channels, deflater, monkeypatch):
    """Decoded by PIL, the PNG gives back every pixel (an RGBA array loses only its alpha), whether ISA-L
    or zlib deflates it."""
    import zlib

    from isal import isal_zlib

    from trainer import figures

    assert figures._deflater() is isal_zlib  # a dependency: installed, so used
    monkeypatch.setattr(figures, "_deflater", lambda: isal_zlib if deflater == "isal" else zlib)
    gen = np.random.default_rng(0)
    picture = gen.integers(0, 256, size=(37, 53, channels), dtype=np.uint8)
    picture[:10] = 255  # flat rows, as most of a figure
    decoded = np.asarray(Image.open(io.BytesIO(png(picture))))
    assert decoded.shape == (37, 53, 3)
    np.testing.assert_array_equal(decoded, picture[..., :3])


def test_the_ellipses_are_the_contours_of_the_cost():
    dm = LineData()
    quad = LeastSquares(dm.x_train, dm.y_train, "mean")
    gaps = np.array([1e-3, 0.1, 2.0])
    contours = _ellipses(quad, gaps)  # (3, points, 2)
    costs = quad.costs(torch.from_numpy(contours[..., 0]), torch.from_numpy(contours[..., 1])).numpy()
    np.testing.assert_allclose(costs - quad.cost, np.broadcast_to(gaps[:, None], costs.shape), rtol=1e-9)


@pytest.mark.parametrize("per_call", [1, 3])
def test_the_cost_surface_path_is_gradient_descent(tmp_path, per_call):
    """The (slope, intercept) recorded after every training_step call are torch.optim.SGD's on autograd's
    cost: after every update, or every third with three updates a call (the last call makes one)."""
    from trainer.cli import make_cli

    steps = 25
    args = ["--config", str(ROOT / "configs/line.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    args += ["--trainer.max_steps", str(steps), "--convergence.tol", "0", "--model.steps_per_call", str(per_call)]
    args += QUIET
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = make_cli(args, run=False)
    x, y, lr = cli.datamodule.x_train, cli.datamodule.y_train, cli.model.hparams.lr
    theta = torch.tensor([cli.model.hparams.slope, cli.model.hparams.intercept], requires_grad=True)
    cli.trainer.fit(cli.model, cli.datamodule)
    figures = next(c for c in cli.trainer.callbacks if isinstance(c, Figures))
    path = figures.path()
    recorded = [0, *range(per_call, steps, per_call), steps]  # the updates made before each point
    assert path.shape == (len(recorded), 2)
    assert cli.model._reads == []  # the module reads nothing for the figures once the fit is over
    opt = torch.optim.SGD([theta], lr=lr)
    for k in range(steps + 1):
        if k in recorded:
            point = path[recorded.index(k)]
            torch.testing.assert_close(point, theta.detach().double().numpy(), rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ((theta[0] * x + theta[1] - y) ** 2).mean().backward()
        opt.step()


def test_histogram_buckets_count_the_values():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40, 30, generator=gen)
    values[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])  # left out
    finite = values[values.isfinite()].double()
    histo = histogram_value("weights/w", values).histo
    assert histo.num == finite.numel() == 1197
    assert histo.min == finite.min().item() and histo.max == finite.max().item()
    torch.testing.assert_close(histo.sum, finite.sum().item())
    torch.testing.assert_close(histo.sum_squares, (finite * finite).sum().item())
    assert len(histo.bucket) == len(histo.bucket_limit) == HISTOGRAM_BINS
    lefts = [histo.min, *histo.bucket_limit[:-1]]
    for i, (lo, hi) in enumerate(zip(lefts, histo.bucket_limit, strict=True)):
        inside = (finite >= lo) & ((finite < hi) if i < HISTOGRAM_BINS - 1 else (finite <= hi))
        assert histo.bucket[i] == inside.sum().item(), i
    assert histogram_value("grads/w", torch.full((3,), float("nan"))) is None


def test_the_benchmark_compares_fits_with_and_without_pictures(tmp_path):
    """figures.<config> are registered; a tiny run of the same measurement gives a finite ratio."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    for name in ("figures.line", "figures.mlp_classification"):
        assert benchmark.COMPARISONS[name].target == 1.05
    cpu = torch.device("cpu")
    settings = benchmark.Settings(cpu, True, benchmark.Clock(cpu), tmp_path)
    # what a full run does first: the once-a-process costs, a machine's first run (no glyph cache) included
    benchmark.once_per_process(["configs/line.yaml"], settings.clock.host_kind, "cpu", without_cache=True)
    result = benchmark.pictures_comparison(settings, "figures.tiny", "configs/line.yaml", updates=5, repeats=1)
    assert math.isfinite(result.ratio) and result.ratio > 0
    fits = [row for row in result.rows if row["side"] in ("ours", "reference")]
    assert [row["side"] for row in fits] == ["ours", "reference", "reference", "ours"]
    assert all(row["figure_sets"] >= 1 for row in fits if row["side"] == "ours")
    assert all(row["figure_sets"] == 0 == row["pictures_seconds"] for row in fits if row["side"] == "reference")
    (once,) = [row for row in result.rows if row["side"] == "ours, once per process"]
    assert once["total"] == once["import_after_trainer"] + once["first_use"] >= 0
    assert math.isfinite(once["first_use_without_cache"]) and "filling the glyph cache" in result.note
    for row in fits:  # ours carries the once-a-process cost on top of its fit
        assert row["seconds"] == row["fit_seconds"] + (once["total"] if row["side"] == "ours" else 0.0)


def test_fresh_processes_time_the_fit_with_and_without_pictures():
    """benchmark_figures.fresh: one pair of fresh processes, the pictures drawn on one side only, and the
    difference and ratio computed from the fits the processes report."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark_figures

    r = benchmark_figures.fresh("configs/line.yaml", 5, pairs=1)
    assert r["figure_sets"] == {"with": [1], "without": [0]}  # the end set, and nothing without pictures
    (with_, without) = r["with"][0], r["without"][0]
    assert with_ > 0 and without > 0
    assert r["difference"] == with_ - without and r["difference_se"] == 0.0
    assert r["ratio"] == with_ / without


def test_invalid_figure_settings():
    with pytest.raises(ValueError, match="figures.every_n_steps"):
        Figures(every_n_steps=-1)
    with pytest.raises(ValueError, match="figures.dpi"):
        Figures(dpi=1)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.74, 2.22), (-1.28, 0.28), (-2.2, 2.2), (-6.2, 4.2), (-1.2, 2.5), (0.0, 1e-3), (5.0, 5.0001), (-310.0, 17.0)],
)
def test_ticks_are_matplotlibs_max_n_locator_inside_the_view(lo, hi):
    from matplotlib.ticker import MaxNLocator

    from trainer.figures import TICKS, _ticks

    values, labels = _ticks(lo, hi)
    reference = MaxNLocator(TICKS).tick_values(lo, hi)
    tolerance = 1e-9 * (hi - lo)
    reference = reference[(reference >= lo - tolerance) & (reference <= hi + tolerance)]
    np.testing.assert_allclose(values, reference, rtol=0, atol=tolerance)
    assert len(set(labels)) == len(labels) and not any(label.startswith("-") for label in labels)


def test_dashes_lie_on_the_line_with_the_pattern_asked_for():
    from trainer.figures import _dashes

    t = np.linspace(0.0, 1.0, 50)
    xy = np.stack([100 * t, 40 * t**2], 1)  # a curve
    dashes = _dashes(xy, 4.0, 6.0)
    length = np.hypot(*np.diff(xy, axis=0).T).sum()
    assert len(dashes) == math.ceil(length / 10.0)
    starts, ends = dashes[:, :2], dashes[:, 2:]
    on_curve = np.interp(np.concatenate([starts[:, 0], ends[:, 0]]), xy[:, 0], xy[:, 1])
    np.testing.assert_allclose(np.concatenate([starts[:, 1], ends[:, 1]]), on_curve, atol=0.05)  # chords of a curve
    gaps = np.hypot(*(starts[1:] - starts[:-1]).T)
    np.testing.assert_allclose(gaps, 10.0, rtol=0.02)  # one period apart along a gently bending curve
    np.testing.assert_allclose(np.hypot(*(ends - starts)[:-1].T), 4.0, rtol=0.02)


@pytest.mark.parametrize("color", ["#1f77b4", "black", "0.45", (0.2, 0.4, 0.6)])
def test_colours_are_matplotlibs(color):
    from matplotlib.colors import to_rgb

    from trainer.figures import _rgb

    assert _rgb(color) == tuple(round(255 * c) for c in to_rgb(color))


def test_the_data_is_drawn_smooth_and_the_key_over_it():
    """Supersampled: a line's edge has shades between its colour and the white; the key is set over the data."""
    figure, xs = _fit_figure()
    picture = figure.draw(2 * xs[:, None] - 1, "step 9")
    inside = picture[figure.top + 2 : figure.bottom - 2, figure.left + 2 : figure.right - 2].reshape(-1, 3)
    blue = np.array([31, 119, 180])
    between = ~np.all(inside == 255, 1) & ~np.all(inside == blue, 1)
    assert np.count_nonzero(between) > 200  # antialiased edges, not just two colours
    from trainer.figures import Canvas

    empty = Canvas(80, (0.0, 1.0), (0.0, 1.0), "x", "y")
    frame = (slice(empty.top + 2, empty.bottom - 2), slice(empty.left + 2, empty.right - 2))
    assert np.all(empty.render("t")[frame] == 255)
    empty.key([("— model", "#1f77b4")])
    assert not empty.still  # not a still part of the data: set over whatever moves
    assert (empty.render("t")[frame] < 255).any()


@pytest.mark.parametrize("far", [1e30, np.inf, np.nan])
def test_a_diverging_model_is_drawn_not_raised(far):
    """A learning rate past its bound sends the curve and the path to 1e30, inf or nan: PIL draws in integers,
    so such points must be held or dropped, and the part that shows still drawn."""
    dm = LineData()
    x, y = dm.x_train.numpy(), dm.y_train.numpy()
    xs = np.linspace(-2.2, 2.2, 200)
    curve = np.where(xs > 0, far, xs)[:, None]  # the left half finite, the right half far away
    y_far = y.copy()
    y_far[:5] = far if np.isfinite(far) else 1e30  # markers far outside the frame
    figure = FitFigure(x, y, x[:0], y[:0], xs, curve, curve, dpi=80)  # dashed and dotted lines too
    picture = figure.draw(curve, "step 9")
    assert picture.shape == (300, 400, 3)
    left = picture[figure.top + 2 : figure.bottom - 2, figure.left + 2 : (figure.left + figure.right) // 2 - 4]
    blue = np.array([31, 119, 180])
    assert np.any(np.all(left == blue, -1))  # the finite half of the curve is there
    FitFigure(x, y_far, x[:0], y[:0], xs, None, None, dpi=80).draw(curve, "step 9")
    surface = CostSurfaceFigure(LeastSquares(dm.x_train, dm.y_train, "mean"), (1.0, 0.0), dpi=80)
    path = np.array([[1.0, 0.0], [1.5, -0.5], [far, -far]])
    assert surface.draw(path, "step 2").shape == (300, 400, 3)
