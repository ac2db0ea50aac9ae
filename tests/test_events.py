"""The bulk scalar writer (trainer/events.py) writes what add_scalar writes, in valid records, in order."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from torch.utils.tensorboard import SummaryWriter

from trainer.events import ScalarEvents, frame, masked_crc32c, scalar_event


def _read(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_the_checksum_is_tensorboards_masked_crc32c() -> None:
    rng = random.Random(0)
    for n in [0, 1, 7, 8, 63, 64, 1000]:
        data = bytes(rng.randrange(256) for _ in range(n))
        assert masked_crc32c(data) == reference_crc(data)


def test_bulk_points_read_back_like_add_scalar(tmp_path: Path) -> None:
    ours, theirs = SummaryWriter(str(tmp_path / "ours")), SummaryWriter(str(tmp_path / "theirs"))
    events = ScalarEvents.attach(ours)
    assert events is not None
    points = [(step, {"train/cost": 1.0 / (step + 1), "train/accuracy": step / 10}) for step in range(25)]
    events.write(points[:10])
    events.write(points[10:])
    for step, values in points:
        for tag, value in values.items():
            theirs.add_scalar(tag, value, step)
    ours.close()
    theirs.close()
    a, b = _read(tmp_path / "ours"), _read(tmp_path / "theirs")
    for tag in ("train/cost", "train/accuracy"):
        assert [(e.step, e.value) for e in a.Scalars(tag)] == [(e.step, e.value) for e in b.Scalars(tag)]


def test_bulk_points_and_other_events_share_one_file_in_order(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    events = ScalarEvents.attach(writer)
    assert ScalarEvents.attach(writer) is not None  # attaching twice keeps one fast record writer
    events.write([(0, {"train/cost": 3.0})])
    writer.add_histogram("weights/w", np.arange(10.0), 0)  # framed by the swapped-in writer
    events.write([(1, {"train/cost": 2.0}), (2, {"train/cost": 1.0})])
    writer.add_scalar("train/cost", 0.5, 3)
    writer.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    read = _read(tmp_path)
    assert [(e.step, e.value) for e in read.Scalars("train/cost")] == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert [e.step for e in read.Histograms("weights/w")] == [0]


def test_points_wait_in_the_training_thread_until_a_flush_or_enough_of_them(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    events = ScalarEvents.attach(writer)
    assert ScalarEvents.attach(writer) is events  # one per writer, so the pending points are in one place
    handed: list[int] = []  # the size of every item queued on the writer thread
    queue_item = events._write
    events._write = lambda item: (handed.append(len(item.blob)), queue_item(item))
    events.write([(0, {"train/cost": 1.0})])
    assert handed == []  # no hand-off, so no writer-thread wake-up, per call
    writer.flush()
    assert len(handed) == 1 and not events._pending
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("train/cost")] == [(0, 1.0)]
    step = 1
    while len(handed) == 1 and step < 100_000:  # until HAND_OFF_POINTS points are pending
        events.write([(step, {"train/cost": float(step)})])
        step += 1
    assert len(handed) == 2 and step == 1 + ScalarEvents.HAND_OFF_POINTS
    events.write([(step, {"train/cost": float(step)})])
    writer.close()  # the close hands off the rest
    assert len(handed) == 3
    assert [e.step for e in _read(tmp_path).Scalars("train/cost")] == list(range(step + 1))


def test_the_reader_stops_at_a_record_with_a_wrong_checksum(tmp_path: Path) -> None:
    # The reader checks the checksums, so the read-back tests above would notice records framed wrongly.
    writer = SummaryWriter(str(tmp_path))
    ScalarEvents.attach(writer).write([(0, {"train/cost": 1.0})])
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    good = frame(scalar_event(2, {"train/cost": 3.0}, 0.0))
    bad = frame(scalar_event(1, {"train/cost": 2.0}, 0.0))
    bad = bad[:-1] + bytes([bad[-1] ^ 0xFF])
    intact = path.read_bytes()
    path.write_bytes(intact + good)
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("train/cost")] == [(0, 1.0), (2, 3.0)]
    path.write_bytes(intact + bad + good)
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("train/cost")] == [(0, 1.0)]


def test_a_writer_without_the_expected_internals_is_left_alone() -> None:
    class Elsewhere:
        def _get_file_writer(self):
            return object()

    assert ScalarEvents.attach(Elsewhere()) is None
