"""Pictures of the run in TensorBoard's Images tab: the seed's scatter plot, line and cost surface.

- ``figures/fit``: for one input and a regression, the data as a scatter with the model's current line or
  curve (and, for a linear model, the least-squares line dashed);
- ``figures/cost_surface``: for the line, the contours of C(m, c), the path gradient descent has taken so
  far, and the closed-form optimum;
- ``figures/decision_regions``: for two inputs and classes, the class the model picks at every point,
  with the data.

They are drawn at the start, then at most every ``every_n_steps`` updates while drawing stays within
``max_overhead`` of the training time (``trainer.budget.TimeBudget``), and once at the end. Each figure is
built and fully drawn once; later frames redraw only what moves (``Canvas``), on matplotlib's Agg canvas
(no window, no pyplot state). matplotlib is imported only when the first figure is drawn.
"""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from trainer.budget import TimeBudget
from trainer.module import ConfigError
from trainer.monitor import tensorboard_writer
from trainer.optimum import LeastSquares

FIGSIZE = (5.0, 3.75)  # inches; × dpi gives the pixels
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MAX_POINTS = 1000  # scatter at most this many examples: enough to see the data, cheap to draw
PATH_CHUNK = 512  # the cost surface's path leaves the device in chunks of this many points
PATH_POINTS = 4096  # and keeps at most this many on the host (see Figures._path_to_host)


class Canvas:
    """A matplotlib Figure on an Agg canvas whose still parts are drawn once.

    The first ``render`` draws everything except the ``moving`` artists and keeps that picture; every
    render then restores it and draws only the moving artists over it (blitting), which costs a few
    milliseconds instead of a full draw. matplotlib is imported here, on first use.
    """

    def __init__(self, dpi: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=FIGSIZE, dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)  # fixed: no layout pass per draw
        self.ax = self.fig.add_subplot()
        from matplotlib.ticker import MaxNLocator

        for axis in (self.ax.xaxis, self.ax.yaxis):
            axis.set_major_locator(MaxNLocator(5))  # fewer tick labels: text is most of a full draw
        # titles are set with an explicit y, so a draw skips the layout pass that would place them
        self.moving: list[Any] = []
        self._background = None

    def move(self, artist: Any) -> Any:
        """Mark ``artist`` as one that changes between renders."""
        artist.set_animated(True)
        self.moving.append(artist)
        return artist

    def render(self) -> np.ndarray:
        """The figure as an (H, W, 3) uint8 RGB array."""
        canvas = self.fig.canvas
        if self._background is None:
            canvas.draw()  # everything that does not move
            self._background = canvas.copy_from_bbox(self.fig.bbox)
        else:
            canvas.restore_region(self._background)
        for artist in self.moving:
            self.fig.draw_artist(artist)
        return np.asarray(canvas.buffer_rgba())[..., :3]


def image_summary(tag: str, rgb: np.ndarray) -> Any:
    """A TensorBoard image summary of an (H, W, 3) uint8 array, PNG-encoded at zlib level 1.

    ``SummaryWriter.add_image`` encodes at level 6 after a few conversions: three times the time, for files
    a fifth smaller.
    """
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=1)
    height, width = rgb.shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _light(color: str, amount: float = 0.6) -> tuple[float, float, float]:
    """``color`` mixed with white."""
    rgb = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return tuple(c + (1 - c) * amount for c in rgb)


def _span(lo: float, hi: float, margin: float = 0.08) -> tuple[float, float]:
    pad = (hi - lo) * margin if hi > lo else max(abs(lo), 1.0) * 0.5
    return lo - pad, hi + pad


class FitFigure(Canvas):
    """The data (N, 1) → (N, K) as a scatter and the model's curve over the inputs' range.

    Args:
        x, y: the training data (N, 1) and (N, K); x_val, y_val: the validation data (may be empty).
        xs: the inputs the curve is drawn at (M,).
        reference: the least-squares predictions at ``xs`` (M, K), drawn dashed, or None.
        dpi: resolution.
    """

    def __init__(self, x, y, x_val, y_val, xs, reference=None, dpi: int = 100) -> None:
        super().__init__(dpi)
        ax = self.ax
        k = y.shape[1]
        for j in range(k):
            color = COLORS[j % len(COLORS)]
            ax.scatter(x[:MAX_POINTS, 0], y[:MAX_POINTS, j], s=9, color=_light(color, 0.35), label="data")
            if len(x_val):
                ax.scatter(
                    x_val[:MAX_POINTS, 0],
                    y_val[:MAX_POINTS, j],
                    s=11,
                    facecolors="none",
                    edgecolors=color,
                    lw=0.6,
                    label="validation",
                )
            if reference is not None:
                ax.plot(xs, reference[:, j], "--", color="0.45", lw=1.0, label="least squares")
        self.curves = [
            self.move(ax.plot(xs, np.zeros_like(xs), color=COLORS[j % len(COLORS)], lw=2.0, label="model")[0])
            for j in range(k)
        ]
        ys = np.concatenate([y.reshape(-1), y_val.reshape(-1)])
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(*_span(float(ys.min()), float(ys.max()), 0.15))
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        handles, labels = ax.get_legend_handles_labels()
        unique = {label: h for h, label in zip(handles, labels, strict=True)}
        ax.legend(unique.values(), unique.keys(), loc="best", fontsize="small", frameon=False)
        self.title = self.move(ax.set_title(" ", y=1.0, pad=6))

    def draw(self, curve: np.ndarray, title: str) -> np.ndarray:
        """``curve``: the model at ``xs`` (M, K)."""
        for j, line in enumerate(self.curves):
            line.set_ydata(curve[:, j])
        self.title.set_text(title)
        return self.render()


class CostSurfaceFigure(Canvas):
    """Contours of the line's cost C(m, c), the path gradient descent has taken, and the optimum.

    Args:
        quadratic: the cost on the training data (``LeastSquares`` of a one-input, one-output line).
        start: the starting (slope, intercept); the view spans it and the optimum.
        dpi: resolution.
    """

    def __init__(self, quadratic: LeastSquares, start: tuple[float, float], dpi: int = 100) -> None:
        super().__init__(dpi)
        m_opt, c_opt = quadratic.optimum[0].tolist()
        m_lo, m_hi = sorted((start[0], m_opt))
        c_lo, c_hi = sorted((start[1], c_opt))
        half = max(m_hi - m_lo, c_hi - c_lo, 1e-3)
        m_lo, m_hi = _span(m_lo - 0.15 * half, m_hi + 0.15 * half, 0.1)
        c_lo, c_hi = _span(c_lo - 0.15 * half, c_hi + 0.15 * half, 0.1)
        ms, cs = torch.meshgrid(
            torch.linspace(m_lo, m_hi, 90, dtype=torch.float64),
            torch.linspace(c_lo, c_hi, 90, dtype=torch.float64),
            indexing="xy",
        )
        costs = quadratic.costs(ms, cs)  # (90, 90) C(m, c)
        lowest, highest = quadratic.cost, costs.max().item()
        # contours at costs spaced geometrically above the optimum: the ellipses close in on it evenly
        levels = lowest + (highest - lowest) * np.geomspace(3e-3, 1.0, 10)
        ax = self.ax
        ax.contour(ms.numpy(), cs.numpy(), costs.numpy(), levels=levels, cmap="viridis", linewidths=0.9)
        ax.plot([m_opt], [c_opt], marker="*", ms=13, color="#d62728", ls="none", label="least squares")
        ax.plot([start[0]], [start[1]], marker="o", ms=6, mfc="none", mec="black", ls="none", label="start")
        self.path = self.move(ax.plot([], [], "-", color="#ff7f0e", lw=1.4, label="gradient descent")[0])
        self.head = self.move(ax.plot([], [], "o", color="#ff7f0e", ms=5)[0])
        ax.set_xlim(m_lo, m_hi)
        ax.set_ylim(c_lo, c_hi)
        ax.set_xlabel("slope m")
        ax.set_ylabel("intercept c")
        ax.legend(loc="best", fontsize="small", frameon=False)
        self.title = self.move(ax.set_title(" ", y=1.0, pad=6))

    def draw(self, path: np.ndarray, title: str) -> np.ndarray:
        """``path``: the (slope, intercept) after every update so far (T, 2), the start first."""
        self.path.set_data(path[:, 0], path[:, 1])
        self.head.set_data(path[-1:, 0], path[-1:, 1])
        self.title.set_text(title)
        return self.render()


class DecisionRegionsFigure(Canvas):
    """The class the model picks over a grid of two inputs, with the data coloured by class.

    Args:
        x, labels: the training data (N, 2) and its classes (N,); num_classes: K.
        extent: (x0_lo, x0_hi, x1_lo, x1_hi) of the grid; resolution: grid points per side.
        dpi: resolution.
    """

    def __init__(self, x, labels, num_classes: int, extent, resolution: int, dpi: int = 100) -> None:
        from matplotlib.colors import ListedColormap

        super().__init__(dpi)
        ax = self.ax
        colors = [COLORS[k % len(COLORS)] for k in range(num_classes)]
        self.image = self.move(
            ax.imshow(
                np.zeros((resolution, resolution)),
                extent=extent,
                origin="lower",
                cmap=ListedColormap([_light(c, 0.65) for c in colors]),
                vmin=-0.5,
                vmax=num_classes - 0.5,
                interpolation="nearest",
                aspect="auto",
            )
        )
        # the data goes over the regions, so it moves with them
        self.move(ax.scatter(x[:MAX_POINTS, 0], x[:MAX_POINTS, 1], c=[colors[k] for k in labels[:MAX_POINTS]], s=7))
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
        self.title = self.move(ax.set_title(" ", y=1.0, pad=6))

    def draw(self, classes: np.ndarray, title: str) -> np.ndarray:
        """``classes``: the predicted class at each grid point (resolution, resolution), row = x₂."""
        self.image.set_data(classes)
        self.title.set_text(title)
        return self.render()


class Figures(L.Callback):
    """Draw ``figures/fit``, ``figures/cost_surface`` and ``figures/decision_regions`` where they apply.

    Args:
        every_n_steps: at most one set of figures per this many updates (the first at the start);
            0 turns the periodic figures off.
        max_overhead: the share of training time the periodic figures may take, in (0, 1].
        at_end: draw a last set when training ends.
        dpi: dots per inch of the 5 × 3.75 inch figures.
        resolution: grid points per side of the decision regions.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_overhead: float = 0.02,
        at_end: bool = True,
        dpi: int = 100,
        resolution: int = 120,
    ) -> None:
        if dpi < 10 or resolution < 2:
            raise ConfigError(
                f"figures.dpi = {dpi} and figures.resolution = {resolution}: use dpi ≥ 10, resolution ≥ 2"
            )
        self.budget = TimeBudget(every_n_steps, max_overhead, key="figures")
        self.at_end, self.dpi, self.resolution = at_end, dpi, resolution
        self._writer = None
        self.spent_end = 0.0  # seconds the figures at the end took (not charged to the budget)

    @property
    def spent(self) -> float:
        """Seconds spent drawing in this run, the end included."""
        return self.budget.spent + self.spent_end

    # ------------------------------------------------------------------ which figures apply

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget.start()
        self.spent_end = 0.0
        self._writer = None
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "x_train"):
            return
        inputs = dm.x_train.shape[1]
        self._fit = inputs == 1 and not pl_module.classification
        self._regions = inputs == 2 and pl_module.classification
        lin = pl_module.model.linears[0]
        self._surface = pl_module.is_linear and lin.weight.shape == (1, 1)
        if not (self._fit or self._regions or self._surface):
            return
        self._writer = tensorboard_writer(trainer)
        if self._writer is None:
            return
        self._built: dict[str, Any] = {}
        self._path: list[Tensor] = []  # (slope, intercept) after every update, on the device
        self._path_host = np.zeros((0, 2))
        self._last_drawn: int | None = None
        if self._surface:
            self._record(pl_module)
        self._maybe_draw(trainer, pl_module)

    def _record(self, pl_module: L.LightningModule) -> None:
        lin = pl_module.model.linears[0]
        self._path.append(torch.stack((lin.weight.detach()[0, 0], lin.bias.detach()[0])))
        if len(self._path) >= PATH_CHUNK:
            self._path_to_host()

    def _path_to_host(self) -> None:
        """Move the recorded points to the host path in one copy (a host sync every PATH_CHUNK updates):
        a tensor a step, kept until the next drawing, would grow by 500 bytes a step between drawings.

        Past PATH_POINTS points the path keeps every other point (always the start and the newest), so a
        run of any length holds and draws a few thousand points: more than the figure has pixels across.
        """
        if not self._path:
            return
        fresh = torch.stack(self._path).double().cpu().numpy()
        self._path = []
        path = np.concatenate([self._path_host, fresh])
        if len(path) > PATH_POINTS:
            path = np.concatenate([path[:1], path[:0:-2][::-1]])  # the start, then every other from the newest
        self._path_host = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._writer is None:
            return
        if self._surface:
            self._record(pl_module)
        self._maybe_draw(trainer, pl_module)

    def _maybe_draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.budget.due(step):
            with self.budget.timed(step):
                self._draw(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is None or not self.at_end or self._last_drawn == trainer.global_step:
            return
        budget = TimeBudget(1, 1.0)
        with budget.timed(trainer.global_step):
            self._draw(trainer, pl_module, trainer.global_step)
        self.spent_end = budget.spent
        self._writer.flush()

    # ------------------------------------------------------------------ drawing

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        dm = trainer.datamodule
        model, loss = pl_module.model, pl_module.loss
        modes = (model.training, loss.training)
        model.eval()  # no cache is kept, and nothing of the training step is disturbed
        try:
            if self._fit:
                self._add("figures/fit", self._draw_fit(dm, pl_module, step), step)
            if self._surface:
                self._add("figures/cost_surface", self._draw_surface(dm, pl_module, step), step)
            if self._regions:
                self._add("figures/decision_regions", self._draw_regions(dm, pl_module, step), step)
        finally:
            model.train(modes[0])
            loss.train(modes[1])  # full_cost restores the loss to the model's mode, which is eval here
        self._last_drawn = step

    def _add(self, tag: str, image: np.ndarray, step: int) -> None:
        self._writer._get_file_writer().add_summary(image_summary(tag, image), step)

    def _draw_fit(self, dm, pl_module, step: int) -> np.ndarray:
        figure = self._built.get("fit")
        if figure is None:
            k = int(pl_module.hparams.out_features)
            x, y = _numpy(dm.x_train), _numpy(dm.y_train).reshape(-1, k)
            x_val, y_val = _numpy(dm.x_val), _numpy(dm.y_val).reshape(-1, k)
            lo, hi = _span(float(np.concatenate([x, x_val]).min()), float(np.concatenate([x, x_val]).max()), 0.05)
            xs = np.linspace(lo, hi, 200)
            self._xs = torch.as_tensor(xs, dtype=dm.x_train.dtype, device=dm.x_train.device).reshape(-1, 1)
            reference = None
            if pl_module.is_linear:
                quad = self._quadratic(dm, pl_module)
                reference = xs[:, None] * quad.weight[:, 0].numpy() + quad.bias.numpy()
            figure = self._built["fit"] = FitFigure(x, y, x_val, y_val, xs, reference, self.dpi)
        curve = _numpy(pl_module.model(self._xs))
        if pl_module.is_linear and pl_module.model.linears[0].weight.shape == (1, 1):
            lin = pl_module.model.linears[0]
            m, c = lin.weight.item(), lin.bias.item()
            title = f"step {step}   ŷ = {m:.3g}·x {'−' if c < 0 else '+'} {abs(c):.3g}"
        else:
            title = f"step {step}   train cost {pl_module.full_cost(dm.x_train, dm.y_train):.4g}"
        return figure.draw(curve, title)

    def _quadratic(self, dm, pl_module) -> LeastSquares:
        if "quadratic" not in self._built:
            self._built["quadratic"] = LeastSquares(dm.x_train, dm.y_train, pl_module.hparams.reduction)
        return self._built["quadratic"]

    def _draw_surface(self, dm, pl_module, step: int) -> np.ndarray:
        self._path_to_host()
        path = self._path_host
        figure = self._built.get("surface")
        if figure is None:
            figure = self._built["surface"] = CostSurfaceFigure(
                self._quadratic(dm, pl_module), tuple(path[0]), self.dpi
            )
        quad = self._quadratic(dm, pl_module)
        cost = quad.costs(torch.tensor(path[-1, 0]), torch.tensor(path[-1, 1])).item()
        gap = cost - quad.cost
        return figure.draw(path, f"C(m, c)   step {step}   cost − optimum {gap:.3g}")

    def _draw_regions(self, dm, pl_module, step: int) -> np.ndarray:
        figure = self._built.get("regions")
        if figure is None:
            x, labels = _numpy(dm.x_train), _numpy(dm.y_train).astype(int)
            lo0, hi0 = _span(float(x[:, 0].min()), float(x[:, 0].max()))
            lo1, hi1 = _span(float(x[:, 1].min()), float(x[:, 1].max()))
            n = self.resolution
            g0 = torch.linspace(lo0, hi0, n, dtype=dm.x_train.dtype)
            g1 = torch.linspace(lo1, hi1, n, dtype=dm.x_train.dtype)
            rows, cols = torch.meshgrid(g1, g0, indexing="ij")  # row i is x₂ = g1[i]
            self._grid = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1).to(dm.x_train.device)  # (n², 2)
            k = int(pl_module.hparams.out_features)
            figure = self._built["regions"] = DecisionRegionsFigure(x, labels, k, (lo0, hi0, lo1, hi1), n, self.dpi)
        classes = pl_module.model(self._grid).argmax(1).reshape(self.resolution, self.resolution)
        accuracy = (pl_module.model(dm.x_train).argmax(1) == dm.y_train).double().mean().item()
        return figure.draw(_numpy(classes), f"step {step}   train accuracy {accuracy:.3f}")


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


__all__ = ["Canvas", "CostSurfaceFigure", "DecisionRegionsFigure", "FitFigure", "Figures"]
