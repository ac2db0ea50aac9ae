"""Data modules whose tensors live on the training device and are batched by index.

No per-sample Dataset or collate: each module builds its whole dataset as two tensors when it is
created (so its widths are known before the model is built, and bad input fails before anything runs),
moves them to the device once in ``setup``, and hands Lightning an ``IndexBatches`` iterable that slices
them. Shapes: N examples, I features, K targets; classification targets are (N,) class indices.

Batch size: ``None`` (or ≥ N) is the whole training set each step — plain gradient descent; 1 is
stochastic gradient descent; k is a mini-batch of k. Batches are drawn at random, reshuffled every epoch
from ``seed``, and so reproducible.

Under DDP ``batch_size`` is per device: a step takes one global batch of ``batch_size × world_size``
examples from the epoch's order (the very batch one process would take with that batch size), and each
rank keeps its own contiguous share of it (``shard``). Every rank draws the same order from (seed, epoch),
so no sampler and no communication is needed, nothing is padded or repeated, and the shares of one step
differ in size by at most one (a last global batch smaller than the world leaves some ranks empty).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from trainer.steps import StepGroups


class DataError(ValueError):
    """Bad data or data settings; the message says what, where, and what to do instead."""


class IndexBatches:
    """An epoch of batches sliced from device-resident tensors, in a seeded random order.

    Args:
        x: inputs (N, I); y: targets (N, K) or (N,).
        batch_size: examples per step on this device; ``None`` or ≥ N is the whole set (no shuffle: the
            order of a full batch does not change its mean gradient).
        shuffle: draw a fresh random order each epoch (from ``seed`` and the epoch number).
        seed: the base of every epoch's order.
        rank, world_size: this process's place under DDP. A step's global batch is
            ``min(batch_size × world_size, N)`` examples of the epoch's order, and this rank yields its
            ``shard`` of it; every rank yields the same number of batches per epoch.

    It keeps its place: ``state_dict()`` holds the epoch and the batches already taken in it, so a
    checkpoint resumes mid-epoch on exactly the next batch.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int | None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"IndexBatches: rank {rank} is outside a world of {world_size} processes")
        self.x, self.y = x, y
        n = x.shape[0]
        self.rank, self.world_size = rank, world_size
        per_device = n if batch_size is None else batch_size
        self.global_batch_size = min(per_device * world_size, n)  # what one process would take per step
        self.shuffle = shuffle and self.global_batch_size < n
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches already yielded in the current epoch

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    @property
    def batch_size(self) -> int:
        """The examples of one step over all ranks (on one process, simply the batch size)."""
        return self.global_batch_size

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.global_batch_size) if self.num_examples else 0

    def order(self, epoch: int) -> Tensor | None:
        """This epoch's permutation of the examples (drawn on the CPU, so the same on every device and
        every rank; one host-to-device copy per epoch)."""
        if not self.shuffle:
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen).to(self.x.device)

    def shard(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's positions [a, b) of the global batch at positions [start, stop) of the order.

        The m = stop − start positions are cut in ``world_size`` contiguous pieces, the first m mod W one
        longer (the cut of ``torch.tensor_split``), so together the ranks take each example exactly once.
        """
        m, w, r = stop - start, self.world_size, self.rank
        q, extra = divmod(m, w)
        a = start + r * q + min(r, extra)
        return a, a + q + (1 if r < extra else 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A new epoch starts once the last one has handed out all its batches. Lightning stops asking
        # after len(self) batches, so the epoch cannot advance when the generator runs out.
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        return self._batches(self.epoch, self.position)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch)
        bs, n = self.global_batch_size, self.num_examples
        for i in range(start, len(self)):
            self.position = i + 1
            a, b = self.shard(i * bs, min((i + 1) * bs, n))
            if order is None:
                yield self.x[a:b], self.y[a:b]
            else:
                idx = order[a:b]
                yield self.x[idx], self.y[idx]

    def repeat_epochs(self, k: int) -> tuple[Tensor, Tensor]:
        """The whole training set as one batch: the batch of each of the next k epochs, which is the same
        every epoch (no shuffle), handed out once with the epoch count advanced by k, as k iterations of
        ``iter(self)`` would leave it. Raises ValueError when an epoch has more than one batch."""
        if len(self) != 1:
            raise ValueError(f"repeat_epochs needs one batch per epoch; an epoch here has {len(self)}")
        batch = next(iter(self))  # the next epoch's
        self.epoch += k - 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "global_batch": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        saved = int(state.get("global_batch", self.global_batch_size))
        if saved != self.global_batch_size and 0 < self.position < len(self):
            # The batches taken so far were of another size (another batch_size or world size): the
            # position no longer names a batch of this epoch, so the run goes on from the next epoch.
            warnings.warn(
                f"resuming with a global batch of {self.global_batch_size} examples where the checkpoint used "
                f"{saved}: the interrupted epoch {self.epoch} is skipped and training goes on from the next one",
                stacklevel=2,
            )
            self.position = len(self)


class TensorData(L.LightningDataModule):
    """The common part: a train/val split of (x, y), widths, device placement and batching.

    Subclasses implement ``make() -> (x, y)`` on the CPU; ``x`` float (N, I), ``y`` float (N, K) for
    regression or long (N,) class indices for classification.

    Args:
        batch_size: examples per update on each device; ``None`` is the whole training set (gradient
            descent). Under DDP the effective batch is ``batch_size × world_size`` (at most N), shared out
            by ``IndexBatches``; validation and test are not sharded (each rank evaluates every example).
        val_fraction: the share of examples held out for validation, in [0, 1).
        seed: the seed of the data, the split and every epoch's batch order.
        shuffle: reshuffle the training batches every epoch.
    """

    classification: bool = False
    steps_per_call: int = 1  # batches handed to each training_step call; the model sets it (trainer/steps.py)

    def __init__(
        self, batch_size: int | None = None, val_fraction: float = 0.2, seed: int = 0, shuffle: bool = True
    ) -> None:
        super().__init__()
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
            raise DataError(
                f"data.batch_size = {batch_size!r} is invalid: use a positive integer, or null for the whole dataset"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction = {val_fraction!r} is invalid: use a value in [0, 1)")
        self.batch_size, self.val_fraction, self.seed, self.shuffle = batch_size, val_fraction, seed, shuffle
        self.rank, self.world_size = 0, 1  # learnt from the trainer in setup
        x, y = self.make()
        self._split(x, y)

    def make(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _split(self, x: Tensor, y: Tensor) -> None:
        n = x.shape[0]
        n_val = int(round(self.val_fraction * n))
        if n - n_val < 1:
            raise DataError(
                f"data.val_fraction = {self.val_fraction} leaves no training data from {n} examples: "
                "lower val_fraction or add examples"
            )
        # A seeded random split; with nothing held out the given order is kept.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)) if n_val else torch.arange(n)
        train, val = perm[n_val:], perm[:n_val]
        self.x_train, self.y_train = x[train], y[train]
        self.x_val, self.y_val = x[val], y[val]
        self.prepare(self.x_train)
        self.x_train, self.x_val = self.transform(self.x_train), self.transform(self.x_val)

    def prepare(self, x_train: Tensor) -> None:
        """Fit any feature transform on the training split (CSVData standardizes)."""

    def transform(self, x: Tensor) -> Tensor:
        return x

    @property
    def in_features(self) -> int:
        """I, the width of the model's input."""
        return self.x_train.shape[1]

    @property
    def out_features(self) -> int:
        """K, the width of the model's output: targets for regression, classes for classification."""
        if self.classification:
            return self.num_classes
        return self.y_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max().item(), self.y_val.max().item() if self.y_val.numel() else 0)) + 1

    @property
    def task(self) -> str:
        return "classification" if self.classification else "regression"

    @property
    def effective_batch_size(self) -> int:
        """The examples of one update over all ranks: ``batch_size × world_size``, at most N."""
        n = self.x_train.shape[0]
        return min((n if self.batch_size is None else self.batch_size) * self.world_size, n)

    def setup(self, stage: str | None = None) -> None:
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
        if self.trainer is not None:
            device = self.trainer.strategy.root_device
            if str(self.trainer.precision).startswith("64"):
                dtype = torch.float64
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        for name in ("x_train", "y_train", "x_val", "y_val"):
            t = getattr(self, name)
            setattr(self, name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
        if stage == "fit" and self.trainer is not None:
            self._log_effective_batch()

    def _log_effective_batch(self) -> None:
        """Say once (rank 0) how many examples each update averages over, and log it as a scalar."""
        n, total, world = self.x_train.shape[0], self.effective_batch_size, self.world_size
        devices = f"{world} device{'s' if world > 1 else ''}"
        if total == n:
            how = f"the whole training set, split over {devices}" if world > 1 else "the whole training set"
        else:
            how = f"batch_size {self.batch_size} per device × {devices}, of {n} training examples"
        rank_zero_info(f"effective batch: {total} examples per update ({how})")
        for logger in self.trainer.loggers:
            logger.log_metrics({"data/effective_batch_size": float(total)}, step=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A batch cut from the tensors ``setup`` put on the device goes on as it is. Lightning's default
        walks the batch and calls ``.to()`` on each tensor on every batch, which a small model feels."""
        if isinstance(batch, tuple) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> IndexBatches | StepGroups:
        batches = IndexBatches(
            self.x_train,
            self.y_train,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        return batches if self.steps_per_call == 1 else StepGroups(batches, self.steps_per_call)

    def _eval_batches(self, x: Tensor, y: Tensor) -> IndexBatches | list:
        return IndexBatches(x, y, self.batch_size, shuffle=False) if x.shape[0] else []

    def val_dataloader(self) -> IndexBatches | list:
        return self._eval_batches(self.x_val, self.y_val)

    def test_dataloader(self) -> IndexBatches | list:
        x, y = (self.x_val, self.y_val) if self.x_val.shape[0] else (self.x_train, self.y_train)
        return self._eval_batches(x, y)

    def predict_dataloader(self) -> IndexBatches:
        return self._eval_batches(self.x_train, self.y_train)


def _points(values: Sequence[float]) -> Tensor:
    """A column (N, 1) of the given numbers."""
    return torch.tensor([float(v) for v in values]).reshape(-1, 1)


class LineData(TensorData):
    """Points on the seed's line y = slope·x + intercept + noise, or the points given.

    Args:
        slope, intercept: the line the points are drawn around.
        noise: the std of the Gaussian noise added to y.
        n: how many points, with x uniform on ``x_range``.
        x, y: the points themselves (both or neither), e.g. from the YAML; they override the rest.
        batch_size, val_fraction, seed, shuffle: as ``TensorData`` (val_fraction defaults to 0: the seed
            fits every point).
    """

    def __init__(
        self,
        slope: float = 2.0,
        intercept: float = -1.0,
        noise: float = 0.3,
        n: int = 100,
        x_range: tuple[float, float] = (-2.0, 2.0),
        x: list[float] | None = None,
        y: list[float] | None = None,
        batch_size: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.slope, self.intercept, self.noise, self.n, self.x_range = slope, intercept, noise, n, x_range
        self.points = (x, y)
        super().__init__(batch_size, val_fraction, seed, shuffle)

    def make(self) -> tuple[Tensor, Tensor]:
        xs, ys = self.points
        if (xs is None) != (ys is None):
            raise DataError("data.x and data.y go together: give both lists of points, or neither")
        if xs is not None:
            if len(xs) != len(ys) or not xs:
                raise DataError(f"data.x has {len(xs)} points and data.y {len(ys)}: give the same number, at least 1")
            return _points(xs), _points(ys)
        if self.n <= 0:
            raise DataError(f"data.n = {self.n} is invalid: use a positive number of points")
        gen = torch.Generator().manual_seed(self.seed)
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(self.n, 1, generator=gen)  # (N, 1)
        y = self.slope * x + self.intercept + self.noise * torch.randn(self.n, 1, generator=gen)  # (N, 1)
        return x, y


REGRESSION_FUNCTIONS = {
    "sine": lambda x: torch.sin(x),
    "logistic": lambda x: 0.1 + 0.8 * torch.sigmoid(3.0 * x),  # in (0, 1): a sigmoid output can reach it
    "quadratic": lambda x: 0.5 * x * x - 1.0,
}


class RegressionData(TensorData):
    """One-dimensional regression: y = f(x) + noise, for the one-neuron chain and MLP regression.

    Args:
        function: ``sine``, ``logistic`` (targets in (0, 1)) or ``quadratic``.
        n, noise, x_range: how many points, the std of the noise, and the span of x.
    """

    def __init__(
        self,
        function: str = "sine",
        n: int = 256,
        noise: float = 0.05,
        x_range: tuple[float, float] = (-3.0, 3.0),
        batch_size: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if function not in REGRESSION_FUNCTIONS:
            raise DataError(f"data.function = {function!r} is unknown: choose one of {', '.join(REGRESSION_FUNCTIONS)}")
        self.function, self.n, self.noise, self.x_range = function, n, noise, x_range
        super().__init__(batch_size, val_fraction, seed, shuffle)

    def make(self) -> tuple[Tensor, Tensor]:
        if self.n <= 0:
            raise DataError(f"data.n = {self.n} is invalid: use a positive number of points")
        gen = torch.Generator().manual_seed(self.seed)
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(self.n, 1, generator=gen)  # (N, 1)
        y = REGRESSION_FUNCTIONS[self.function](x) + self.noise * torch.randn(self.n, 1, generator=gen)
        return x, y


class ClassificationData(TensorData):
    """Two-dimensional classes: ``moons`` (2 classes), ``spirals`` (``classes`` arms) or ``blobs``.

    Args:
        dataset: ``moons``, ``spirals`` or ``blobs``.
        n: examples in all; noise: the std of the jitter; classes: for spirals and blobs.
    """

    classification = True
    DATASETS = ("moons", "spirals", "blobs")

    def __init__(
        self,
        dataset: str = "moons",
        n: int = 512,
        noise: float = 0.1,
        classes: int = 3,
        batch_size: int | None = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if dataset not in self.DATASETS:
            raise DataError(f"data.dataset = {dataset!r} is unknown: choose one of {', '.join(self.DATASETS)}")
        if classes < 2:
            raise DataError(f"data.classes = {classes} is invalid: classification needs at least 2 classes")
        self.dataset, self.n, self.noise, self.classes = dataset, n, noise, classes
        super().__init__(batch_size, val_fraction, seed, shuffle)

    def make(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            raise DataError(f"data.n = {self.n} is invalid: use at least 2 examples")
        gen = torch.Generator().manual_seed(self.seed)
        k = 2 if self.dataset == "moons" else self.classes
        label = torch.arange(self.n) % k  # balanced classes
        t = torch.rand(self.n, generator=gen)
        if self.dataset == "moons":
            angle = math.pi * t
            upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
            lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
            x = torch.where(label.unsqueeze(1) == 0, upper, lower)
        elif self.dataset == "spirals":
            radius = t
            angle = 4.0 * t + label * (2 * math.pi / k)
            x = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], 1)
        else:
            centres = torch.stack(
                [torch.tensor([math.cos(2 * math.pi * c / k), math.sin(2 * math.pi * c / k)]) for c in range(k)]
            )
            x = centres[label]
        x = x + self.noise * torch.randn(self.n, 2, generator=gen)  # (N, 2)
        return x, label


class CSVData(TensorData):
    """A CSV file with a header: ``targets`` names the target column(s), every other column is a feature.

    Args:
        path: the CSV file.
        targets: the target column name(s).
        standardize: scale the features by the training split's mean and std (targets stay as they are).
        classification: the single target column holds class labels (any text); they become indices
            0..K−1 in sorted order (``classes`` keeps the labels).
        delimiter: the field separator.

    Raises:
        DataError: a missing or unreadable file, no rows, a ragged row, a cell that is not a finite
            number (with its row, column and text), a missing target column, or one class only.
    """

    def __init__(
        self,
        path: str,
        targets: list[str] | str = "y",
        standardize: bool = True,
        classification: bool = False,
        val_fraction: float = 0.2,
        batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        delimiter: str = ",",
    ) -> None:
        self.path = Path(path)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.standardize, self.delimiter = standardize, delimiter
        self.classification = classification
        self.classes: list[str] = []
        self.feature_names: list[str] = []
        super().__init__(batch_size, val_fraction, seed, shuffle)

    def _read(self) -> tuple[list[str], list[tuple[int, list[str]]]]:
        where = f"data.path = {str(self.path)!r}"
        if self.path.is_dir():
            raise DataError(f"{where} is a directory; give the path of a CSV file in it")
        if not self.path.is_file():
            raise DataError(f"{where}: no such file; give the path of a CSV file with a header row")
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                rows = [(i, row) for i, row in enumerate(csv.reader(f, delimiter=self.delimiter), start=1)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{where}: cannot be read ({exc}); give a readable UTF-8 CSV file") from None
        rows = [(i, row) for i, row in rows if row and any(cell.strip() for cell in row)]
        if not rows:
            raise DataError(f"{where}: the file is empty; it needs a header row and at least one data row")
        (_, header), body = rows[0], rows[1:]
        header = [h.strip() for h in header]
        if not body:
            raise DataError(f"{where}: the header has no rows under it; add at least one data row")
        return header, body

    def make(self) -> tuple[Tensor, Tensor]:
        header, body = self._read()
        name = self.path.name
        missing = [t for t in self.targets if t not in header]
        if missing:
            raise DataError(
                f"{name}: no target column {', '.join(map(repr, missing))}; the columns are {', '.join(header)}"
            )
        if self.classification and len(self.targets) != 1:
            raise DataError(f"data.targets = {self.targets}: classification takes exactly one target column")
        target_cols = [header.index(t) for t in self.targets]
        feature_cols = [j for j in range(len(header)) if j not in target_cols]
        if not feature_cols:
            raise DataError(f"{name}: every column is a target; at least one column must be a feature")
        self.feature_names = [header[j] for j in feature_cols]
        features, targets = [], []
        for line, row in body:
            if len(row) != len(header):
                raise DataError(
                    f"{name}, row {line}: {len(row)} cells where the header has {len(header)}; "
                    "make every row as long as the header"
                )
            features.append([self._number(row[j], line, header[j]) for j in feature_cols])
            if self.classification:
                targets.append(row[target_cols[0]].strip())
            else:
                targets.append([self._number(row[j], line, header[j]) for j in target_cols])
        x = torch.tensor(features, dtype=torch.float64)
        if self.classification:
            self.classes = sorted(set(targets), key=_label_key)
            if len(self.classes) < 2:
                raise DataError(
                    f"{name}: the target column {self.targets[0]!r} holds one class only ({self.classes[0]!r}); "
                    "classification needs at least two"
                )
            index = {c: i for i, c in enumerate(self.classes)}
            y = torch.tensor([index[t] for t in targets], dtype=torch.long)
        else:
            y = torch.tensor(targets, dtype=torch.float64).to(torch.get_default_dtype())
        return x.to(torch.get_default_dtype()), y

    def _number(self, text: str, line: int, column: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise DataError(
                f"{self.path.name}, row {line}, column {column!r}: {text!r} is not a number; "
                "every feature (and regression target) cell must be numeric"
            ) from None
        if not math.isfinite(value):
            raise DataError(
                f"{self.path.name}, row {line}, column {column!r}: {text!r} is not finite; "
                "remove or fill the row (NaN and inf cannot be trained on)"
            )
        return value

    def prepare(self, x_train: Tensor) -> None:
        self.mean = x_train.mean(0) if self.standardize else torch.zeros(x_train.shape[1])
        std = x_train.std(0, correction=0) if self.standardize else torch.ones(x_train.shape[1])
        self.std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is

    def transform(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classification else 0


def _label_key(label: str) -> tuple[int, float | str]:
    """Sort numeric labels numerically and the rest as text."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
