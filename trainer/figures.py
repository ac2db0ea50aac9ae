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
frame waits for the budget; the decision regions also get a frame at the start.

Each figure is drawn by PIL (``Canvas``): the data at twice the resolution, then halved, which smooths
every line and marker's edge; the axes, ticks and text at the final resolution, in matplotlib's default
font, set from glyphs FreeType rendered once and a file keeps (``trainer.lettering``), so that a run loads
neither FreeType nor PIL's text modules. Later frames redraw only what moves; a figure drawn once keeps no
image, the figures of a set being drawn one after another in the same scratch images. The PNG is deflated
by ISA-L (``png``). A figure costs a few milliseconds, where matplotlib's figure machinery (an Axes, its
artists and a full draw) took about twice that, and a process pays no first-use cost for it: on a short
run, such as the seed's line, the end's figures were about a tenth of the training time.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from trainer import lettering
from trainer.budget import TimeBudget
from trainer.module import ConfigError
from trainer.monitor import tensorboard_writer
from trainer.optimum import LeastSquares

FIGSIZE = (5.0, 3.75)  # inches; × dpi gives the pixels
DPI = 90  # 450 × 337 pixels: readable, and a fifth fewer pixels to draw, encode and checksum than at 100
FRAME = (0.14, 0.13, 0.97, 0.91)  # left, bottom, right, top of the frame, as fractions of the figure
SUPERSAMPLE = 2  # the data is drawn at this many times the resolution, then reduced: smooth edges
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# matplotlib's viridis at 0, 0.1, …, 0.9: the contours of the cost surface, from the optimum outwards
VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70", "#7ad151", "#bddf26"]
MAX_POINTS = 1000  # scatter at most this many examples: enough to see the data, cheap to draw
MAX_PATH = 2000  # draw at most about this many updates of the path on the cost surface (a few per pixel)
TICKS = 5  # at most this many intervals between tick labels per axis
PAD = 3.5  # points between the frame and a tick label (a tick mark's length)
# What each figure's first frame is assumed to cost until a set has been timed (a full draw, its PNG and
# the event writer's checksum: a few milliseconds on a CPU): the first periodic set waits until the budget
# has earned that much.
FIRST_FRAME_SECONDS = 0.005

RGB = tuple[int, int, int]


def _rgb(color: Any) -> RGB:
    """``#rrggbb``, ``black``, a grey level as a string (``"0.45"``) or an (r, g, b) of floats in [0, 1]."""
    if isinstance(color, str):
        if color.startswith("#"):
            return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        if color == "black":
            return (0, 0, 0)
        level = round(255 * float(color))
        return (level, level, level)
    return tuple(round(255 * c) for c in color)


class Part:
    """A part of a figure's data, drawn by ``draw(pen, x, y)`` with its current (x, y): a still part is drawn
    into a frame's start, a moving one into every frame, with the data each frame gives it."""

    def __init__(self, draw: Callable[..., None], x: Any = (), y: Any = ()) -> None:
        self._draw = draw
        self.set_data(x, y)

    def paint(self, pen: Any) -> None:
        """Draw it with ``pen`` (on the data layer) at its current data."""
        self._draw(pen, self.x, self.y)

    def set_data(self, x: Any, y: Any) -> None:
        self.x, self.y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def set_ydata(self, y: Any) -> None:
        self.y = np.asarray(y, dtype=np.float64)


class Canvas:
    """A figure drawn by PIL, whose still parts are drawn once.

    Three layers make a frame: the picture outside the frame (tick marks, tick labels, axis labels), at
    the final resolution; the data inside the frame, drawn at ``SUPERSAMPLE`` times the resolution and
    reduced (a box filter: every edge antialiased); and over the data the frame's outline, the key and the
    title, set at each render.
    ``render`` starts each frame from the still parts of the data (``still``) and the picture around it
    (``around``), both kept as draw calls: drawn straight into the first frame, in scratch images shared
    by every figure of the size; kept as images of the figure's own from the second frame. It draws the
    moving parts over the data, reduces it, and sets it into the picture with the title. So a frame is the
    same whether or not others came before, and a figure drawn once, as a short run's are at its end, keeps
    no image at all: the figures of a set draw one after another in the same memory.

    Data coordinates run from ``xlim`` and ``ylim`` at the frame's edges; ``label`` also places text in
    fractions of the frame.

    Args:
        dpi: resolution; xlim, ylim: the data coordinates at the frame's edges; xlabel, ylabel: axis labels.
    """

    def __init__(self, dpi: int, xlim: tuple[float, float], ylim: tuple[float, float], xlabel: str, ylabel: str):
        self.dpi = dpi
        self.width, self.height = int(FIGSIZE[0] * dpi), int(FIGSIZE[1] * dpi)  # as matplotlib sizes a canvas
        # the frame in pixels from the top left: [left, right) × [top, bottom)
        self.left, self.right = round(FRAME[0] * self.width), round(FRAME[2] * self.width)
        self.top, self.bottom = round((1 - FRAME[3]) * self.height), round((1 - FRAME[1]) * self.height)
        self.xlim, self.ylim = xlim, ylim
        self.data_size = ((self.right - self.left) * SUPERSAMPLE, (self.bottom - self.top) * SUPERSAMPLE)
        self.around: list[Callable[[_Pen], None]] = []  # draw calls (by a pen) outside the frame
        self.picture = None  # the picture around the data, from a figure's second frame on (``render``)
        self._above = None  # that picture above the frame, where each frame's title is set
        self.still: list[Part] = []  # drawn into every frame's data, under what moves
        self.data = None  # the still parts drawn once, from a figure's second frame on (``render``)
        self.moving: list[Part] = []
        self._frames = 0  # rendered so far
        self.over: list[tuple] = []  # the text set over the data (the key): (where, text, fill, font, anchor)
        self._axis_labels(xlabel, ylabel)

    @staticmethod
    def _paint(parts: list[Part], pen: Any) -> None:
        for part in parts:
            part.paint(pen)

    # ------------------------------------------------------------------ coordinates

    def points(self, size: float) -> float:
        """``size`` points in pixels of the data layer."""
        return size * self.dpi / 72 * SUPERSAMPLE

    def to_data_pixels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Data coordinates → (P, 2) pixel coordinates in the data layer (from its top left)."""
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        width, height = self.data_size
        return np.stack([(np.asarray(x) - x0) * (width / (x1 - x0)), (y1 - np.asarray(y)) * (height / (y1 - y0))], -1)

    def _frame_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Fractions of the frame ((0, 0) bottom left) → pixels of the picture."""
        return self.left + u * (self.right - self.left), self.bottom - v * (self.bottom - self.top)

    def _data_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Data coordinates → pixels of the picture."""
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        return self._frame_pixel((x - x0) / (x1 - x0), (y - y0) / (y1 - y0))

    # ------------------------------------------------------------------ what is drawn

    def line(self, x, y, color: Any = "black", lw: float = 1.0, ls: str = "-", moving: bool = False) -> Part | None:
        """A polyline through (x, y) in data coordinates, ``lw`` points wide; ``ls``: ``-``, ``--`` or ``:``."""
        fill, width = _rgb(color), max(1, round(self.points(lw)))
        dash = {"-": None, "--": (3.7, 1.6), ":": (1.0, 1.65)}[ls]  # matplotlib's, in line widths
        lengths = None if dash is None else (dash[0] * width, dash[1] * width)

        def draw(pen: Any, x: np.ndarray, y: np.ndarray) -> None:
            for xy in self._drawable(self.to_data_pixels(x, y)):
                if lengths is None:
                    pen.line(xy.ravel().tolist(), fill=fill, width=width)
                else:
                    for segment in _dashes(xy, *lengths).tolist():
                        pen.line(segment, fill=fill, width=width)

        return self._place(draw, x, y, moving)

    def markers(
        self, x, y, color: Any, size: float, edge: float = 0.0, hollow: bool = False, star: bool = False, moving=False
    ) -> Part | None:
        """A marker at each (x, y): a disc ``size`` points across (a ring with ``hollow``, a five-pointed
        star with ``star``), with an outline ``edge`` points wide."""
        fill = _rgb(color)
        radius, outline = self.points(size) / 2, max(1, round(self.points(edge))) if edge else 0
        if star:  # ten corners, the inner ones at 0.38 of the radius, the first pointing up
            turns = np.pi / 2 + np.arange(10) * np.pi / 5
            reach = np.where(np.arange(10) % 2 == 0, radius * 1.15, radius * 0.44)
            shape = np.stack([np.cos(turns) * reach, -np.sin(turns) * reach], 1)

        def draw(pen: Any, x: np.ndarray, y: np.ndarray) -> None:
            xy = self.to_data_pixels(x, y)
            margin = 2 * radius + 2
            near = np.all(np.isfinite(xy), 1) & np.all((xy > -margin) & (xy < np.array(self.data_size) + margin), 1)
            for px, py in xy[near].tolist():  # only the markers that can show
                if star:
                    pen.polygon((shape + (px, py)).ravel().tolist(), fill=fill)
                elif hollow:
                    pen.ellipse((px - radius, py - radius, px + radius, py + radius), outline=fill, width=outline)
                else:
                    pen.ellipse((px - radius, py - radius, px + radius, py + radius), fill=fill)

        return self._place(draw, x, y, moving)

    def _drawable(self, xy: np.ndarray) -> list[np.ndarray]:
        """The runs of finite points of the polyline ``xy`` (P, 2) in data-layer pixels, with at least two
        points each, their coordinates held within a few frames of the data layer (a diverging model's curve
        can reach 1e30, or inf: PIL draws in integers). Clamping moves only points far outside the frame; the
        part of a segment that shows keeps its place to within a pixel, since the curves are finely sampled."""
        finite = np.all(np.isfinite(xy), 1)
        bound = 4.0 * max(self.data_size)
        xy = np.clip(xy, -bound, bound)
        if finite.all():
            return [xy] if len(xy) > 1 else []
        edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))  # run starts, ends
        return [xy[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a > 1]

    def _place(self, draw: Callable[..., None], x, y, moving: bool) -> Part | None:
        """Keep as a still part of the data, or as a moving one, whose data each frame may change."""
        part = Part(draw, x, y)
        (self.moving if moving else self.still).append(part)
        return part if moving else None

    def label(
        self,
        x: float,
        y: float,
        text: str,
        offset=(0.0, 0.0),
        place: str = "frame",
        anchor: str = "la",
        size: float = 10.0,
        color: Any = "black",
        vertical: bool = False,
    ) -> None:
        """Text at (x, y), moved by ``offset`` points (x right, y up).

        ``place``: ``frame`` (fractions of the frame), ``data``, ``xdata`` (x in data, y in the frame) or
        ``ydata``. Text inside the frame (the key) is set over the data at every render, after what moves;
        any other joins the picture around the frame (``around``).
        ``anchor``: PIL's text anchor, e.g. ``mt`` (the middle of the top edge), ``rm``, ``ls``; ``size`` in
        points; ``vertical``: turned a quarter left, then placed by its right edge and middle.
        """
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        u = (x - x0) / (x1 - x0) if place in ("data", "xdata") else x
        v = (y - y0) / (y1 - y0) if place in ("data", "ydata") else y
        px, py = self._frame_pixel(u, v)
        px, py = px + offset[0] * self.dpi / 72, py - offset[1] * self.dpi / 72
        fill, font = _rgb(color), _font(size * self.dpi / 72)
        if 0 < u < 1 and 0 < v < 1 and not vertical:  # inside the frame: over the data, at each render
            self.over.append(((px, py), text, fill, font, anchor))
        elif vertical:
            self.around.append(lambda pen: pen.vertical((px, py), text, fill, font))
        else:
            self.around.append(lambda pen: pen.text((px, py), text, fill=fill, font=font, anchor=anchor))

    def _axis_labels(self, xlabel: str, ylabel: str) -> None:
        """Tick marks at round values (as matplotlib's ``MaxNLocator`` picks them), their labels, and the axis
        labels."""
        tick = max(1, round(PAD * self.dpi / 72))
        x_values, x_labels = _ticks(*self.xlim)
        y_values, y_labels = _ticks(*self.ylim)
        marks = []  # (x₀, y₀, x₁, y₁) of each tick mark
        for value, text in zip(x_values, x_labels, strict=True):
            px = round(self._data_pixel(value, self.ylim[0])[0])
            marks.append((px, self.bottom, px, self.bottom + tick))  # down from the frame
            self.label(value, 0, text, (0, -PAD - 2), "xdata", anchor="ma")
        for value, text in zip(y_values, y_labels, strict=True):
            py = round(self._data_pixel(self.xlim[0], value)[1])
            marks.append((self.left - tick, py, self.left, py))  # left of the frame
            self.label(0, value, text, (-PAD - 2, 0), "ydata", anchor="rm")

        def tick_marks(pen: _Pen) -> None:
            for mark in marks:
                pen.line(mark, fill=(0, 0, 0), width=1)

        self.around.append(tick_marks)
        width = max(_font(10 * self.dpi / 72).length(text) for text in y_labels) * 72 / self.dpi  # points
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

    def render(self, title: str, data: Any = None) -> np.ndarray:
        """The figure titled ``title``: an (H, W, 3) uint8 RGB array of its own.

        ``data``: the data layer to start from (an image of ``data_size``), or None for the still parts. The
        data is drawn in a scratch image shared by every figure of this size, and set into the picture in
        place: a new image costs ten times as much as writing over one, in first touches of its memory.
        The still parts and the picture around the data are drawn straight into the first frame (the
        picture too in a shared scratch image); from the second on, they are drawn once into images of
        the figure's own (``data``, ``picture``), which each frame starts from.
        """
        from PIL import Image

        layer = _scratch(self.data_size, "data")
        first = not self._frames
        if data is None and self.data is None and not first:  # a second frame: more may follow
            self.data = Image.new("RGB", self.data_size, "white")
            self._paint(self.still, _Pen(self.data))
        start = self.data if data is None else data
        if start is None:  # the first frame: the still parts drawn straight into it
            layer.paste((255, 255, 255), (0, 0, *self.data_size))
            pen = _Pen(layer)
            self._paint(self.still, pen)
        else:
            layer.paste(start, (0, 0))
            pen = _Pen(layer)
        self._paint(self.moving, pen)
        self._frames += 1
        if first:  # the picture around the data, drawn straight into the shared one
            picture = _scratch((self.width, self.height), "picture")
            picture.paste((255, 255, 255), (0, 0, self.width, self.height))
            pen = _Pen(picture)
            self._draw_around(pen)
        else:
            if self.picture is None:  # a second frame: kept from here on
                self.picture = Image.new("RGB", (self.width, self.height), "white")
                self._draw_around(_Pen(self.picture))
                self._above = self.picture.crop((0, 0, self.width, self.top))  # what each title is set on
            picture = self.picture
            pen = _Pen(picture)
            picture.paste(self._above, (0, 0))  # the last frame's title gone
        picture.paste(layer.reduce(SUPERSAMPLE), (self.left, self.top))
        pen.rectangle((self.left, self.top, self.right, self.bottom), outline=(0, 0, 0), width=1)  # over the data
        for where, text, fill, font, anchor in self.over:
            pen.text(where, text, fill=fill, font=font, anchor=anchor)
        x, y = self._frame_pixel(0.5, 1.0)
        pen.text((x, y - 6 * self.dpi / 72), title, fill=(0, 0, 0), font=_font(12 * self.dpi / 72), anchor="ms")
        return np.asarray(picture)  # a copy of the pixels (read-only): later frames leave it as it is

    def _draw_around(self, pen: _Pen) -> None:
        for draw in self.around:
            draw(pen)


@functools.cache
def _scratch(size: tuple[int, int], role: str) -> Any:
    """The RGB image of ``size`` that renders draw their frames' ``role`` in (``data``: the data layer;
    ``picture``: a first frame's whole picture), one per size, role and process."""
    from PIL import Image

    return Image.new("RGB", size)


def _dashes(xy: np.ndarray, on: float, off: float) -> np.ndarray:
    """The dashes of a pattern of ``on`` then ``off`` pixels along the polyline ``xy`` (P, 2), each as the
    straight segment between its ends (a dash is a few pixels long): (D, 4) rows of x₀ y₀ x₁ y₁."""
    along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])  # the length to each vertex
    starts = np.arange(0.0, along[-1], on + off)
    ends = np.minimum(starts + on, along[-1])
    at = np.concatenate([starts, ends])
    x, y = np.interp(at, along, xy[:, 0]), np.interp(at, along, xy[:, 1])
    n = len(starts)
    return np.stack([x[:n], y[:n], x[n:], y[n:]], 1)


@functools.cache
def _font_file() -> str | None:
    """matplotlib's default font, DejaVu Sans, from its own data folder (matplotlib comes with Lightning's
    dependencies); None where it is not found."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:
        return None
    return str(path) if path.is_file() else None


def _font(pixels: float) -> lettering.Face:
    """DejaVu Sans (PIL's own font where it is missing) at ``pixels`` per em, its glyphs from the glyph
    cache (``trainer.lettering``)."""
    return lettering.face(_font_file(), pixels)


TEXT_POINTS = (9.0, 10.0, 12.0)  # the sizes of the figures' text: the key, the ticks and axis labels, the title


def prepare_glyphs(dpi: int = DPI) -> None:
    """Put the glyphs of the figures' text sizes in the glyph cache, as a machine's first run does."""
    for points in TEXT_POINTS:
        _font(points * dpi / 72)


class _Pen:
    """What a figure draws with on one RGB image: PIL's drawing core (``Image.core.draw``, what ``ImageDraw``
    calls), with ``ImageDraw``'s arguments for the calls the figures make, and ``trainer.lettering`` for the
    text. Importing ``ImageDraw`` would load FreeType (it imports PIL's text modules), which the glyph cache
    spares a run."""

    def __init__(self, image: Any) -> None:
        from PIL import Image

        self.core = Image.core.draw(image.im, 0)

    def ink(self, fill: RGB) -> int:
        """The drawing core's ink for the colour ``fill`` (the same for every RGB image: kept in ``_INKS``)."""
        ink = _INKS.get(fill)
        if ink is None:
            ink = _INKS[fill] = self.core.draw_ink(fill)
        return ink

    def line(self, xy: Any, fill: RGB, width: int = 1) -> None:
        self.core.draw_lines(xy, self.ink(fill), width)

    def polygon(self, xy: Any, fill: RGB) -> None:
        self.core.draw_polygon(xy, self.ink(fill), 1)

    def ellipse(self, box: Any, fill: RGB | None = None, outline: RGB | None = None, width: int = 1) -> None:
        if fill is not None:
            self.core.draw_ellipse(box, self.ink(fill), 1)
        if outline is not None and outline != fill and width:
            self.core.draw_ellipse(box, self.ink(outline), 0, width)

    def rectangle(self, box: Any, outline: RGB, width: int = 1) -> None:
        self.core.draw_rectangle(box, self.ink(outline), 0, width)

    def text(self, at: tuple[float, float], text: str, fill: RGB, font: lettering.Face, anchor: str = "la") -> None:
        lettering.draw_text(self.core, at, text, font, self.ink(fill), anchor)

    def vertical(self, at: tuple[float, float], text: str, fill: RGB, font: lettering.Face) -> None:
        """``text`` turned a quarter left, the right edge and middle of its ink at ``at``."""
        lettering.draw_vertical(self.core, at, text, font, self.ink(fill))


_INKS: dict[RGB, int] = {}


# The step sizes matplotlib's MaxNLocator tries, in units of the power of ten below the range ÷ intervals
_STEPS = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])


def _ticks(lo: float, hi: float) -> tuple[np.ndarray, list[str]]:
    """Round values inside [lo, hi] and their labels: the multiples of the smallest step (1, 1.5, 2, 2.5, 3,
    4, 5, 6 or 8 times a power of ten) that makes at most ``TICKS`` intervals, as matplotlib's MaxNLocator
    picks them; every label with the decimals the finest needs, and a true minus sign."""
    raw = (hi - lo) / TICKS
    steps = _STEPS * 10.0 ** math.floor(math.log10(raw))
    first = int(np.nonzero(steps >= raw * (1 - 1e-12))[0][0])
    tolerance = 1e-9 * (hi - lo)
    for step in steps[: first + 1][::-1]:  # the smallest large enough, or smaller while too few show
        values = np.arange(math.ceil((lo - tolerance) / step), math.floor((hi + tolerance) / step) + 1) * step
        if len(values) >= 2:
            break
    values = np.where(np.abs(values) < tolerance, 0.0, values)  # no "−0"
    plain = values.tolist()  # a handful of numbers: Python's round beats numpy's per-call overhead
    decimals = next((d for d in range(8) if all(abs(round(v, d) - v) <= tolerance for v in plain)), 8)
    return values, [f"{v:.{decimals}f}".replace("-", "−") for v in plain]


def png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) (or RGBA, (H, W, 4)) uint8 array as the bytes of an RGB PNG file.

    Every row unfiltered (filter type 0), deflated at level 1 (``_deflater``): a figure is mostly flat
    colour, which deflate packs well as it is. A third of the time of PIL's encoder, which tries every
    filter on every row, for files no larger.
    """
    height, width = rgb.shape[:2]
    deflate = _deflater().compressobj(1)
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


@functools.cache
def _deflater() -> Any:
    """The zlib-compatible module that deflates the PNGs: ISA-L's (``isal``, a dependency) where it imports,
    else Python's ``zlib``. On a 450 × 337 figure at level 1, ISA-L took 0.08 ms against zlib's 0.50 ms,
    for a stream no larger (12.8 against 13.0 kB); both write the zlib format PNG asks for."""
    try:
        from isal import isal_zlib
    except ImportError:  # a platform without its wheels: the same stream format, six times the time
        return zlib
    return isal_zlib


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
    return tuple(c / 255 + (1 - c / 255) * amount for c in _rgb(color))


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
        for j in range(k):
            color = COLORS[j % len(COLORS)]
            self.markers(x[:MAX_POINTS, 0], y[:MAX_POINTS, j], _light(color, 0.35), 3.6)
            if len(x_val):
                self.markers(x_val[:MAX_POINTS, 0], y_val[:MAX_POINTS, j], color, 3.3, edge=0.6, hollow=True)
            if reference is not None:
                self.line(xs, reference[:, j], "0.45", 1.0, "--")
            if start is not None:
                self.line(xs, start[:, j], color, 1.5, ":")
        self.curves = [self.line(xs, np.zeros_like(xs), COLORS[j % len(COLORS)], 2.0, moving=True) for j in range(k)]
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
        gaps = (highest - quadratic.cost) * np.geomspace(3e-3, 1.0, len(VIRIDIS))
        for contour, color in zip(_ellipses(quadratic, gaps), VIRIDIS, strict=True):
            self.line(contour[:, 0], contour[:, 1], color, 0.9)
        self.markers([m_opt], [c_opt], "#d62728", 13, star=True)
        self.markers([start[0]], [start[1]], "black", 6, edge=1.0, hollow=True)
        self.path = self.line([], [], "#ff7f0e", 1.4, moving=True)
        self.head = self.markers([], [], "#ff7f0e", 5, moving=True)
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
        super().__init__(dpi, extent[:2], extent[2:], "x₁", "x₂")
        colors = [COLORS[k % len(COLORS)] for k in range(num_classes)]
        # each class's colour, light: one flat cell per grid point, filling the frame
        self.palette = np.array([_rgb(_light(color, 0.65)) for color in colors], np.uint8)
        # the data goes over the regions, so it moves with them: one set of markers per class
        x, labels = x[:MAX_POINTS], labels[:MAX_POINTS]
        for k in range(num_classes):
            mine = labels == k
            self.markers(x[mine, 0], x[mine, 1], colors[k], 3.2, moving=True)

    def draw(self, classes: np.ndarray, title: str) -> np.ndarray:
        """``classes``: the predicted class at each grid point (resolution, resolution), row = x₂."""
        from PIL import Image

        cells = Image.fromarray(np.ascontiguousarray(self.palette[classes[::-1]]))  # row 0 at the top: x₂ high
        return self.render(title, cells.resize(self.data_size, Image.Resampling.NEAREST))


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
        self._periodic = self.budget.enabled
        self.budget.start()
        self._built: dict[str, Any] = {}
        if self._surface:  # (slope, intercept) after every call, in float32: 8 bytes a call, no object
            self._recorded = array("f", (lin.weight.item(), lin.bias.item()))  # m₀ c₀ m₁ c₁ …, the start first
            # read by each training_step call with its costs (views: SGD works in place)
            pl_module.read_each_call(lin.weight, lin.bias)
        self._drawn: dict[str, int] = {}  # figure → the step it was last drawn at
        self._start_step = trainer.global_step
        if self._fit:  # where the model's curve starts: every frame of figures/fit shows it
            k = int(pl_module.hparams.out_features)
            x = torch.cat([dm.x_train, dm.x_val])[:, 0]
            lo, hi = _span(x.min().item(), x.max().item(), 0.05)
            # numpy's linspace: torch's first float64 linspace of a process takes 0.4 ms
            self._xs = torch.from_numpy(np.linspace(lo, hi, 200)).to(x.device, x.dtype).reshape(-1, 1)  # (M, 1)
            with torch.no_grad(), _evaluating(pl_module):
                self._start_curve = _numpy(pl_module.model(self._xs)).reshape(-1, k)  # (M, K)
        if self.budget.enabled and self._due_figures(self._start_step):  # the decision regions' first frame
            with self.budget.timed(self._start_step):
                self._draw(trainer, pl_module, self._start_step)

    def path(self, most: int | None = None) -> np.ndarray:
        """The (slope, intercept) after every ``training_step`` call so far, the start first (T, 2), float64;
        with ``most``, thinned to about that many (``_thin``)."""
        recorded = np.frombuffer(self._recorded, dtype=np.float32).reshape(-1, 2)  # a view: not kept
        return (recorded if most is None else _thin(recorded, most)).astype(np.float64)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._writer is None:
            return
        if self._surface and outputs is not None:  # None: a call that made no update
            self._recorded.extend(outputs["read"])
        if self._periodic and self.budget.affordable():  # only then read the step (a chain of properties)
            self._maybe_draw(trainer, pl_module)

    def _maybe_draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.budget.due(step) and self._due_figures(step):
            with self.budget.timed(step):
                self._draw(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_reading(pl_module)
        step = trainer.global_step
        if self._writer is None or not self.at_end or not self._due_figures(step, at_end=True):
            return
        budget = TimeBudget(1, 1.0)
        with budget.timed(step):
            self._draw(trainer, pl_module, step, at_end=True)
        self.spent_end = budget.spent  # the logger flushes the events when it closes, right after

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_reading(pl_module)

    def _stop_reading(self, pl_module: L.LightningModule) -> None:
        if self._writer is not None and self._surface:
            pl_module.read_each_call()

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

    @staticmethod
    def _quadratic(dm, pl_module) -> LeastSquares:
        return LeastSquares.of(dm.x_train, dm.y_train, pl_module.hparams.reduction)  # the monitor's solve

    def _draw_surface(self, dm, pl_module, step: int) -> np.ndarray:
        path = self.path(MAX_PATH)  # (T, 2), thinned
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
