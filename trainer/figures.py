"""Pictures of the run in TensorBoard's Images tab: the seed's scatter plot, line and cost surface.

- ``figures/fit``: for one input and a regression, the data as a scatter with the model's current line or
  curve (and, for a linear model, the least-squares line dashed);
- ``figures/cost_surface``: for the line, the contours of C(m, c), the path gradient descent has taken so
  far, and the closed-form optimum;
- ``figures/decision_regions``: for two inputs and classes, the class the model picks at every point,
  with the data.

They are drawn at most every ``every_n_steps`` updates while drawing stays within ``max_overhead`` of the
training time (``trainer.budget.TimeBudget``), and once at the end. The fit and the cost surface show where
training started in every frame (the starting curve dotted, the starting point circled), so their first
frame waits for the budget; the decision regions also get a frame at the start. Each figure is built and
fully drawn once; later frames redraw only what moves (``Canvas``), on matplotlib's Agg canvas (no window,
no pyplot state), with the text set by PIL. matplotlib is imported only when the first figure is drawn.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
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
DPI = 90  # 450 × 337 pixels: readable, and a fifth fewer pixels to draw, encode and checksum than at 100
FRAME = (0.14, 0.13, 0.97, 0.91)  # left, bottom, right, top of the frame, as fractions of the figure
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MAX_POINTS = 1000  # scatter at most this many examples: enough to see the data, cheap to draw
MAX_PATH = 2000  # draw at most about this many updates of the path on the cost surface (a few per pixel)
TICKS = 5  # at most this many intervals between tick labels per axis
PAD = 3.5  # points between the frame and a tick label (a tick mark's length)
# What each figure's first frame is assumed to cost until a set has been timed (a full draw, its PNG and
# the event writer's checksum: about 10 ms on a CPU): the first periodic set waits until the budget has
# earned that much.
FIRST_FRAME_SECONDS = 0.01


class Canvas:
    """A figure drawn by matplotlib's Agg renderer, with its text set by PIL, whose still parts are drawn once.

    The first ``render`` draws every artist that does not move and keeps that picture; every render then
    restores it and draws only the ``moving`` artists over it (blitting), which costs a millisecond instead of
    a full draw. There is no Axes: building one (its axis, ticks, spines and titles) took most of a first
    frame, so the frame, tick marks and data are a few plain artists placed in data coordinates (``data``)
    and fractions of the frame (``in_frame``). Text, the rest of a full draw with matplotlib, is set on each
    rendered picture by PIL in the same font (matplotlib's default) at a twentieth of the time: the tick
    labels, axis labels and key (``label``) and the title of the frame (``render``).
    matplotlib is imported here, on first use.

    Args:
        dpi: resolution; xlim, ylim: the data coordinates at the frame's edges; xlabel, ylabel: axis labels.
    """

    def __init__(self, dpi: int, xlim: tuple[float, float], ylim: tuple[float, float], xlabel: str, ylabel: str):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
        from matplotlib.transforms import Bbox, BboxTransformFrom, BboxTransformTo, TransformedBbox

        self.fig = Figure(figsize=FIGSIZE, dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.dpi, self.height = dpi, self.fig.canvas.get_width_height()[1]  # rows of pixels
        self.xlim, self.ylim = xlim, ylim
        self.box = TransformedBbox(Bbox.from_extents(*FRAME), self.fig.transFigure)  # the frame, in pixels
        self.in_frame = BboxTransformTo(self.box)  # (0, 0) to (1, 1) across the frame
        self.data = BboxTransformFrom(Bbox.from_extents(xlim[0], ylim[0], xlim[1], ylim[1])) + self.in_frame
        self.frame = self.fig.add_artist(
            Rectangle((0, 0), 1, 1, transform=self.in_frame, fill=False, lw=0.8, zorder=3)  # over the data
        )
        self.labels: list[tuple[tuple[float, float], str, str, Any, tuple[int, ...], bool]] = []
        self._axis_labels(xlabel, ylabel)
        self.moving: list[Any] = []
        self._title_at = self._pixels(self.in_frame, 0.5, 1.0, (0, 6))
        self._background = None

    def add(self, artist: Any, moving: bool = False) -> Any:
        """Add ``artist`` in data coordinates, clipped to the frame; ``moving``: redrawn every render."""
        artist.set_transform(self.data)
        artist.set_clip_box(self.box)
        self.fig.add_artist(artist)
        return self.move(artist) if moving else artist

    def line(self, x, y, moving: bool = False, **kwargs) -> Any:
        """A Line2D through (x, y) in data coordinates (``kwargs`` as for ``Line2D``)."""
        from matplotlib.lines import Line2D

        return self.add(Line2D(x, y, **kwargs), moving)

    def move(self, artist: Any) -> Any:
        """Mark ``artist`` as one that changes between renders; they are drawn in the order marked."""
        artist.set_animated(True)
        self.moving.append(artist)
        return artist

    def label(
        self,
        x: float,
        y: float,
        text: str,
        offset=(0.0, 0.0),
        transform=None,
        anchor: str = "la",
        size: float = 10.0,
        color: Any = "black",
        vertical: bool = False,
    ) -> None:
        """Text at (x, y) in ``transform`` (fractions of the frame by default), moved by ``offset`` points.

        ``anchor``: PIL's text anchor, e.g. ``mt`` (the middle of the top edge), ``rm``, ``ls``; ``size`` in
        points; ``vertical``: turned a quarter left, then placed by its right edge and middle.
        """
        from matplotlib.colors import to_rgb

        fill = tuple(round(255 * c) for c in to_rgb(color))
        where = self._pixels(transform or self.in_frame, x, y, offset)
        self.labels.append((where, text, anchor, _font(size * self.dpi / 72), fill, vertical))

    def _pixels(self, transform, x: float, y: float, offset=(0.0, 0.0)) -> tuple[float, float]:
        """(x, y) in ``transform`` moved by ``offset`` points, in pixels from the top left."""
        px, py = transform.transform((x, y))
        return px + offset[0] * self.dpi / 72, self.height - (py + offset[1] * self.dpi / 72)

    def _axis_labels(self, xlabel: str, ylabel: str) -> None:
        """Tick marks at round values (matplotlib's ``MaxNLocator``), their labels, and the axis labels."""
        from matplotlib.lines import Line2D
        from matplotlib.transforms import blended_transform_factory

        x_values, x_labels = _ticks(*self.xlim)
        y_values, y_labels = _ticks(*self.ylim)
        along_x = blended_transform_factory(self.data, self.in_frame)  # x in data, y in the frame
        along_y = blended_transform_factory(self.in_frame, self.data)
        marks = {"ls": "none", "color": "black", "ms": PAD, "mew": 0.8}
        self.fig.add_artist(Line2D(x_values, np.zeros_like(x_values), marker=3, transform=along_x, **marks))  # down
        self.fig.add_artist(Line2D(np.zeros_like(y_values), y_values, marker=0, transform=along_y, **marks))  # left
        for value, text in zip(x_values, x_labels, strict=True):
            self.label(value, 0, text, (0, -PAD - 2), along_x, anchor="ma")
        for value, text in zip(y_values, y_labels, strict=True):
            self.label(0, value, text, (-PAD - 2, 0), along_y, anchor="rm")
        width = max(_font(10 * self.dpi / 72).getlength(text) for text in y_labels) * 72 / self.dpi  # points
        self.label(0.5, 0, xlabel, (0, -PAD - 16), anchor="ma")
        self.label(0, 0.5, ylabel, (-PAD - 6 - width, 0), vertical=True)

    def key(self, entries: list[tuple[str, Any]], points: np.ndarray | None = None) -> None:
        """A legend as one line of coloured text per entry (``(text, colour)``), in the corner of the frame
        with the fewest of ``points`` (P, 2) in data coordinates."""
        corners = [(0.03, 0.96, "l", "a"), (0.97, 0.96, "r", "a"), (0.03, 0.04, "l", "d"), (0.97, 0.04, "r", "d")]
        corner = corners[0]
        if points is not None and len(points):
            u = (points[:, 0] - self.xlim[0]) / (self.xlim[1] - self.xlim[0])  # fractions of the frame
            v = (points[:, 1] - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
            height = 0.07 * len(entries) + 0.04

            def crowd(c) -> int:
                near_u = u < 0.4 if c[2] == "l" else u > 0.6
                near_v = v > 1 - height if c[3] == "a" else v < height
                return int(np.count_nonzero(near_u & near_v))

            corner = min(corners, key=crowd)
        x, y, horizontal, vertical = corner
        step = -0.07 if vertical == "a" else 0.07
        for i, (text, color) in enumerate(entries if vertical == "a" else entries[::-1]):
            self.label(x, y + i * step, text, anchor=horizontal + vertical, size=9, color=color)

    def render(self, title: str) -> np.ndarray:
        """The figure titled ``title``: an (H, W, 3) uint8 RGB view of the canvas, good until the next render.

        The labels are set into the canvas once, with the still artists; the title into a strip of it.
        """
        from PIL import Image, ImageDraw

        canvas = self.fig.canvas
        if self._background is None:
            canvas.draw()  # every artist that does not move
            pixels = np.asarray(canvas.buffer_rgba())  # (H, W, 4): the canvas itself
            still = Image.fromarray(pixels[..., :3])
            pen = ImageDraw.Draw(still)
            for (x, y), text, anchor, font, fill, vertical in self.labels:
                if vertical:
                    _vertical(still, (x, y), text, font, fill)
                else:
                    pen.text((x, y), text, fill=fill, font=font, anchor=anchor)
            pixels[..., :3] = np.asarray(still)
            self._background = canvas.copy_from_bbox(self.fig.bbox)
        else:
            canvas.restore_region(self._background)
        for artist in self.moving:
            self.fig.draw_artist(artist)
        pixels = np.asarray(canvas.buffer_rgba())
        font = _font(12 * self.dpi / 72)
        x, y = self._title_at
        _, top, _, bottom = font.getbbox(title, anchor="ms")
        rows = slice(max(0, math.floor(y + top) - 1), math.ceil(y + bottom) + 1)  # the title's strip
        strip = Image.fromarray(pixels[rows, :, :3])
        ImageDraw.Draw(strip).text((x, y - rows.start), title, fill=(0, 0, 0), font=font, anchor="ms")
        pixels[rows, :, :3] = np.asarray(strip)
        return pixels[..., :3]


@functools.cache
def _font(pixels: float) -> Any:
    """matplotlib's default font (DejaVu Sans unless configured) as a PIL font of ``pixels`` per em."""
    from matplotlib.font_manager import FontProperties, findfont
    from PIL import ImageFont

    return ImageFont.truetype(findfont(FontProperties()), pixels)


def _vertical(picture: Any, at: tuple[float, float], text: str, font: Any, fill: tuple[int, ...]) -> None:
    """``text`` turned a quarter left onto ``picture``, its right edge and middle at ``at`` (pixels)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text, anchor="ls")
    ink = Image.new("L", (math.ceil(right - left), math.ceil(bottom - top)))
    ImageDraw.Draw(ink).text((-left, -top), text, fill=255, font=font, anchor="ls")
    ink = ink.transpose(Image.Transpose.ROTATE_90)
    corner = (round(at[0] - ink.width), round(at[1] - ink.height / 2))
    picture.paste(Image.new("RGB", ink.size, fill), corner, mask=ink)


def _ticks(lo: float, hi: float) -> tuple[np.ndarray, list[str]]:
    """Round values inside [lo, hi] (matplotlib's ``MaxNLocator``) and their labels, every label with the
    decimals the finest needs, and a true minus sign."""
    from matplotlib.ticker import MaxNLocator

    values = MaxNLocator(TICKS).tick_values(lo, hi)
    tolerance = 1e-9 * (hi - lo)
    values = values[(values >= lo - tolerance) & (values <= hi + tolerance)]
    values = np.where(np.abs(values) < tolerance, 0.0, values)  # no "−0"
    decimals = next((d for d in range(8) if np.allclose(np.round(values, d), values, rtol=0, atol=tolerance)), 8)
    return values, [f"{v:.{decimals}f}".replace("-", "−") for v in values]


def png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) (or RGBA, (H, W, 4)) uint8 array as the bytes of an RGB PNG file.

    Every row unfiltered (filter type 0), deflated at zlib level 1: a figure is mostly flat colour, which
    deflate packs well as it is. A third of the time of PIL's encoder, which tries every filter on every
    row, for files no larger.
    """
    height, width = rgb.shape[:2]
    deflate = zlib.compressobj(1)
    # 64 rows at a time, each its filter type (0) then R G B R G B …: no copy of the whole picture
    rows = np.zeros((min(height, 64), 1 + 3 * width), np.uint8)
    parts = []
    for top in range(0, height, len(rows)):
        block = rgb[top : top + len(rows), :, :3]
        rows[: len(block), 1:] = block.reshape(len(block), 3 * width)
        parts.append(deflate.compress(rows[: len(block)]))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits a channel, RGB, no interlace
    idat = b"".join(parts)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def image_summary(tag: str, rgb: np.ndarray) -> Any:
    """A TensorBoard image summary of an (H, W, 3) uint8 array (``png``).

    ``SummaryWriter.add_image`` converts the array a few times and has PIL encode it at zlib level 6: about
    five times the time.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width = rgb.shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png(rgb))
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
        start: the model's curve at ``xs`` when training started (M, K), drawn dotted, or None.
        dpi: resolution.
    """

    def __init__(self, x, y, x_val, y_val, xs, reference=None, start=None, dpi: int = DPI) -> None:
        ys = np.concatenate([y.reshape(-1), y_val.reshape(-1)])
        super().__init__(dpi, (xs[0], xs[-1]), _span(float(ys.min()), float(ys.max()), 0.15), "x", "y")
        k = y.shape[1]
        dots = {"ls": "none", "marker": "o"}  # markers on a line, not a scatter: one stamped marker, much faster
        for j in range(k):
            color = COLORS[j % len(COLORS)]
            self.line(x[:MAX_POINTS, 0], y[:MAX_POINTS, j], ms=3.6, mew=0, color=_light(color, 0.35), **dots)
            if len(x_val):
                self.line(x_val[:MAX_POINTS, 0], y_val[:MAX_POINTS, j], ms=3.3, mfc="none", mec=color, mew=0.6, **dots)
            if reference is not None:
                self.line(xs, reference[:, j], ls="--", color="0.45", lw=1.0)
            if start is not None:
                self.line(xs, start[:, j], ls=":", color=color, lw=1.5)
        self.curves = [
            self.line(xs, np.zeros_like(xs), moving=True, color=COLORS[j % len(COLORS)], lw=2.0) for j in range(k)
        ]
        entries = [("● data", _light(COLORS[0], 0.35))]
        if len(x_val):
            entries.append(("○ validation", COLORS[0]))
        if reference is not None:
            entries.append(("– – least squares", "0.45"))
        if start is not None:
            entries.append(("··· start", COLORS[0]))
        entries.append(("— model", COLORS[0]))
        points = [np.stack([x[:MAX_POINTS, 0], y[:MAX_POINTS, j]], 1) for j in range(k)]
        if len(x_val):
            points += [np.stack([x_val[:MAX_POINTS, 0], y_val[:MAX_POINTS, j]], 1) for j in range(k)]
        if reference is not None:
            points += [np.stack([xs, reference[:, j]], 1) for j in range(k)]
        self.key(entries, np.concatenate(points))

    def draw(self, curve: np.ndarray, title: str) -> np.ndarray:
        """``curve``: the model at ``xs`` (M, K)."""
        for j, line in enumerate(self.curves):
            line.set_ydata(curve[:, j])
        return self.render(title)


class CostSurfaceFigure(Canvas):
    """Contours of the line's cost C(m, c), the path gradient descent has taken, and the optimum.

    The cost is a quadratic bowl, so its contours are ellipses around the optimum, drawn from the Hessian's
    eigenvectors rather than traced on a grid.

    Args:
        quadratic: the cost on the training data (``LeastSquares`` of a one-input, one-output line).
        start: the starting (slope, intercept); the view spans it and the optimum.
        dpi: resolution.
    """

    def __init__(self, quadratic: LeastSquares, start: tuple[float, float], dpi: int = DPI) -> None:
        from matplotlib import colormaps
        from matplotlib.collections import LineCollection

        m_opt, c_opt = quadratic.optimum[0].tolist()
        m_lo, m_hi = sorted((start[0], m_opt))
        c_lo, c_hi = sorted((start[1], c_opt))
        half = max(m_hi - m_lo, c_hi - c_lo, 1e-3)
        m_lo, m_hi = _span(m_lo - 0.15 * half, m_hi + 0.15 * half, 0.1)
        c_lo, c_hi = _span(c_lo - 0.15 * half, c_hi + 0.15 * half, 0.1)
        super().__init__(dpi, (m_lo, m_hi), (c_lo, c_hi), "slope m", "intercept c")
        corners = torch.tensor([[m_lo, m_hi, m_lo, m_hi], [c_lo, c_lo, c_hi, c_hi]], dtype=torch.float64)
        highest = quadratic.costs(corners[0], corners[1]).max().item()  # over the view, a bowl peaks at a corner
        # contours at costs spaced geometrically above the optimum: the ellipses close in on it evenly
        gaps = (highest - quadratic.cost) * np.geomspace(3e-3, 1.0, 10)
        self.add(
            LineCollection(_ellipses(quadratic, gaps), colors=colormaps["viridis"](np.linspace(0, 0.9, 10)), lw=0.9)
        )
        self.line([m_opt], [c_opt], marker="*", ms=13, color="#d62728", ls="none")
        self.line([start[0]], [start[1]], marker="o", ms=6, mfc="none", mec="black", ls="none")
        self.path = self.line([], [], moving=True, color="#ff7f0e", lw=1.4)
        self.head = self.line([], [], moving=True, marker="o", ls="none", color="#ff7f0e", ms=5)
        entries = [("★ least squares", "#d62728"), ("○ start", "black"), ("— gradient descent", "#ff7f0e")]
        self.key(entries, np.array([[m_opt, c_opt], [start[0], start[1]]]))

    def draw(self, path: np.ndarray, title: str) -> np.ndarray:
        """``path``: the (slope, intercept) after every update so far (T, 2), the start first, or a thinned
        version of it (``_thin``)."""
        self.path.set_data(path[:, 0], path[:, 1])
        self.head.set_data(path[-1:, 0], path[-1:, 1])
        picture = self.render(title)
        self.path.set_data([], [])  # no copies of a path that grows every update kept between frames
        return picture


def _thin(path: np.ndarray, most: int) -> np.ndarray:
    """At most about ``most`` points of ``path`` (T, 2): every k-th and the last, k odd.

    An odd k keeps gradient descent's zig-zag (it swaps sides of the valley every update when lr·λ > 1)
    a zig-zag; an even k would show only one side of it.
    """
    k = math.ceil(len(path) / most)
    k += 1 - k % 2
    return path if k == 1 else np.concatenate([path[::k], path[-1:]])


def _ellipses(quadratic: LeastSquares, gaps: np.ndarray, points: int = 160) -> np.ndarray:
    """The contours C(m, c) = C* + gap of a line's cost, (len(gaps), points, 2).

    C − C* = s·dθᵀ G dθ with dθ = θ − θ*; with G = V diag(λ) Vᵀ the contour of ``gap`` is
    θ* + V diag(√(gap / (s λ))) (cos t, sin t).
    """
    eigenvalues, vectors = torch.linalg.eigh(quadratic.scale * quadratic.gram)  # (2,), (2, 2)
    t = np.linspace(0.0, 2 * np.pi, points)
    circle = np.stack([np.cos(t), np.sin(t)])  # (2, points)
    radii = np.sqrt(gaps[:, None] / eigenvalues.clamp_min(1e-300).numpy()[None, :])  # (L, 2)
    shapes = np.einsum("ij,lj,jp->lpi", vectors.numpy(), radii, circle)  # (L, points, 2)
    return shapes + quadratic.optimum[0].numpy()


class DecisionRegionsFigure(Canvas):
    """The class the model picks over a grid of two inputs, with the data coloured by class.

    Args:
        x, labels: the training data (N, 2) and its classes (N,); num_classes: K.
        extent: (x0_lo, x0_hi, x1_lo, x1_hi) of the grid; resolution: grid points per side.
        dpi: resolution.
    """

    def __init__(self, x, labels, num_classes: int, extent, resolution: int, dpi: int = DPI) -> None:
        from matplotlib.image import BboxImage

        super().__init__(dpi, extent[:2], extent[2:], "x₁", "x₂")
        colors = [COLORS[k % len(COLORS)] for k in range(num_classes)]
        # each class's colour as RGBA bytes: an image of them skips matplotlib's normalising and colour mapping
        self.palette = np.array([[round(255 * c) for c in _light(color, 0.65)] + [255] for color in colors], np.uint8)
        # the grid fills the frame: row 0 at the bottom (x₂ = extent[2]), one flat cell per grid point
        self.image = self.move(BboxImage(self.box, interpolation="nearest", origin="lower"))
        self.image.set_data(self.palette[np.zeros((resolution, resolution), int)])
        self.fig.add_artist(self.image)
        # the data goes over the regions, so it moves with them: one line of markers per class
        x, labels = x[:MAX_POINTS], labels[:MAX_POINTS]
        for k in range(num_classes):
            mine = labels == k
            self.line(x[mine, 0], x[mine, 1], moving=True, ls="none", marker="o", ms=3.2, mew=0, color=colors[k])
        self.move(self.frame)  # over the regions

    def draw(self, classes: np.ndarray, title: str) -> np.ndarray:
        """``classes``: the predicted class at each grid point (resolution, resolution), row = x₂."""
        self.image.set_data(self.palette[classes])  # (resolution, resolution, 4)
        return self.render(title)


class Figures(L.Callback):
    """Draw ``figures/fit``, ``figures/cost_surface`` and ``figures/decision_regions`` where they apply.

    Args:
        every_n_steps: at most one set of figures per this many updates; 0 turns off all but the last set.
        max_overhead: the share of training time the figures before the last may take, in (0, 1].
        at_end: draw a last set when training ends.
        dpi: dots per inch of the 5 × 3.75 inch figures.
        resolution: grid points per side of the decision regions.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_overhead: float = 0.01,
        at_end: bool = True,
        dpi: int = DPI,
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

    @property
    def sets(self) -> int:
        """How many sets of figures this run drew, the end included."""
        return self.budget.count + (1 if self.spent_end else 0)

    # ------------------------------------------------------------------ which figures apply

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget.start()
        self.spent_end = 0.0
        self._writer = None
        dm = trainer.datamodule
        if not (self.budget.enabled or self.at_end):
            return  # turned off: nothing to record either
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
        self.budget.first_cost = FIRST_FRAME_SECONDS * (self._fit + self._surface + self._regions)
        self.budget.start()
        self._built: dict[str, Any] = {}
        if self._surface:  # (slope, intercept) after every update, in float32: 8 bytes an update, no object
            self._slope_intercept = (lin.weight.detach().view(1), lin.bias.detach())  # views: SGD works in place
            if lin.weight.is_cpu:
                self._path_host, self._path_device = array("f"), None  # m₀ c₀ m₁ c₁ …
            else:  # on an accelerator a read would wait for the update: kept there, room doubling when full
                self._path_device, self._recorded = lin.weight.new_empty(1024, 2, dtype=torch.float32), 0
        self._drawn: dict[str, int] = {}  # figure → the step it was last drawn at
        self._start_step = trainer.global_step
        if self._surface:
            self._record()
        if self._fit:  # where the model's curve starts: every frame of figures/fit shows it
            k = int(pl_module.hparams.out_features)
            x = torch.cat([dm.x_train, dm.x_val])[:, 0]
            lo, hi = _span(x.min().item(), x.max().item(), 0.05)
            self._xs = torch.linspace(lo, hi, 200, dtype=x.dtype, device=x.device).reshape(-1, 1)  # (M, 1)
            with torch.no_grad(), _evaluating(pl_module):
                self._start_curve = _numpy(pl_module.model(self._xs)).reshape(-1, k)  # (M, K)
        if self.budget.enabled and self._due_figures(self._start_step):  # the decision regions' first frame
            with self.budget.timed(self._start_step):
                self._draw(trainer, pl_module, self._start_step)

    def _record(self) -> None:
        slope, intercept = self._slope_intercept
        if self._path_device is None:  # on the CPU reading two numbers costs less than any tensor op
            self._path_host.append(slope.item())
            self._path_host.append(intercept.item())
            return
        if self._recorded == len(self._path_device):
            self._path_device = torch.cat([self._path_device, torch.empty_like(self._path_device)])
        torch.cat(self._slope_intercept, out=self._path_device[self._recorded])
        self._recorded += 1

    def _path(self, most: int | None = None) -> np.ndarray:
        """The (slope, intercept) after every update so far, the start first (T, 2), float64; with ``most``,
        thinned to about that many (``_thin``)."""
        if self._path_device is None:
            recorded = np.frombuffer(self._path_host, dtype=np.float32).reshape(-1, 2)  # a view: not kept
        else:
            recorded = self._path_device[: self._recorded].cpu().numpy()
        return (recorded if most is None else _thin(recorded, most)).astype(np.float64)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._writer is None:
            return
        if self._surface:
            self._record()
        self._maybe_draw(trainer, pl_module)

    def _maybe_draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.budget.due(step) and self._due_figures(step):
            with self.budget.timed(step):
                self._draw(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._writer is None or not self.at_end or not self._due_figures(step, at_end=True):
            return
        budget = TimeBudget(1, 1.0)
        with budget.timed(step):
            self._draw(trainer, pl_module, step, at_end=True)
        self.spent_end = budget.spent  # the logger flushes the events when it closes, right after

    def _due_figures(self, step: int, at_end: bool = False) -> list[str]:
        """The figures to draw at ``step``: those that apply and are not drawn at this step yet.

        The fit and the cost surface show where training started in every frame (the starting curve, the
        starting point), so they are first drawn once it has moved, or at the end; the decision regions
        also have a frame at the start.
        """
        moved = at_end or step > self._start_step
        due = [name for name, applies in (("fit", self._fit), ("cost_surface", self._surface)) if applies and moved]
        if self._regions:
            due.append("decision_regions")
        return [name for name in due if self._drawn.get(name) != step]

    # ------------------------------------------------------------------ drawing

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, at_end: bool = False) -> None:
        dm = trainer.datamodule
        draw = {"fit": self._draw_fit, "cost_surface": self._draw_surface, "decision_regions": self._draw_regions}
        with _evaluating(pl_module):
            for name in self._due_figures(step, at_end):
                self._add(f"figures/{name}", draw[name](dm, pl_module, step), step)
                self._drawn[name] = step

    def _add(self, tag: str, image: np.ndarray, step: int) -> None:
        self._writer._get_file_writer().add_summary(image_summary(tag, image), step)

    def _draw_fit(self, dm, pl_module, step: int) -> np.ndarray:
        figure = self._built.get("fit")
        if figure is None:
            k = int(pl_module.hparams.out_features)
            x, y = _numpy(dm.x_train), _numpy(dm.y_train).reshape(-1, k)
            x_val, y_val = _numpy(dm.x_val), _numpy(dm.y_val).reshape(-1, k)
            xs = _numpy(self._xs)[:, 0].astype(np.float64)
            reference = None
            if pl_module.is_linear:
                quad = self._quadratic(dm, pl_module)
                reference = xs[:, None] * quad.weight[:, 0].numpy() + quad.bias.numpy()
            figure = FitFigure(x, y, x_val, y_val, xs, reference, self._start_curve, self.dpi)
            self._built["fit"] = figure
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
        path = self._path(MAX_PATH)  # (T, 2), thinned
        figure = self._built.get("surface")
        if figure is None:
            figure = self._built["surface"] = CostSurfaceFigure(
                self._quadratic(dm, pl_module), tuple(path[0]), self.dpi
            )
        lin = pl_module.model.linears[0]
        gap = self._quadratic(dm, pl_module).gap(lin.weight, lin.bias)  # exact, where C − C* would round
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


@contextmanager
def _evaluating(pl_module: L.LightningModule) -> Iterator[None]:
    """The model and loss in eval mode (no cache is kept, nothing of the training step is disturbed), then
    back in the modes they were in."""
    model, loss = pl_module.model, pl_module.loss
    modes = (model.training, loss.training)
    model.eval()
    try:
        yield
    finally:
        model.train(modes[0])
        loss.train(modes[1])  # full_cost restores the loss to the model's mode, which is eval here


__all__ = ["Canvas", "CostSurfaceFigure", "DecisionRegionsFigure", "FitFigure", "Figures"]
