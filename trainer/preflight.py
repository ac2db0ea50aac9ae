"""Checks made before a run starts, so that a run that cannot work fails before anything is written.

- ``check_devices``: the accelerator exists, and there are as many devices as asked for.
- ``load_checkpoint``: ``--ckpt_path`` is a readable Lightning checkpoint, loaded with ``weights_only=True``
  (tensors and plain values only: a pickle that would run code is refused, and none of it runs).
- ``check_checkpoint_matches``: the checkpoint holds the model this config builds (names, shapes, settings).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError, DeviceError

GPU_NAMES = ("cuda", "gpu")

# Settings that change the model a checkpoint holds; for fit also those the restored optimizer state fixes.
MODEL_KEYS = ("hidden", "activation", "output_activation", "loss", "reduction", "in_features", "out_features")
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay")


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _requested(devices: Any, available: int) -> tuple[int, int | None] | None:
    """(how many devices, the highest index asked for, or None) from a Trainer ``devices`` value."""
    if devices is None or devices == "auto":
        return None
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:
            indices = [int(d) for d in text.split(",") if d.strip().isdigit()]
            return (len(indices), max(indices)) if indices else None
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return (available, None) if devices == -1 else (devices, None)
    if isinstance(devices, (list, tuple)) and all(isinstance(d, int) for d in devices) and devices:
        return len(devices), max(devices)
    return None


def check_devices(accelerator: Any, devices: Any) -> None:
    """Raise ``DeviceError`` for a CUDA accelerator without a GPU, or more devices than this machine has.

    Args:
        accelerator: the Trainer's ``accelerator`` (``cpu``, ``cuda``/``gpu``, ``auto``, …); others are
            left to Lightning.
        devices: the Trainer's ``devices`` (an int, -1 for all, ``auto``, a list of indices or ``"0,1"``).

    A CPU device is a process: asking for more than there are cores is refused too, since the processes
    would only take turns on the same cores.
    """
    name = accelerator.lower() if isinstance(accelerator, str) else None
    has_gpu = torch.cuda.is_available()
    if name in GPU_NAMES and not has_gpu:
        raise DeviceError(
            f"trainer.accelerator = {accelerator!r}, but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False): use accelerator: cpu, or auto to take a GPU only where there is one"
        )
    if name in GPU_NAMES or (name == "auto" and has_gpu):
        kind, available = "CUDA GPU", torch.cuda.device_count()
    elif name in ("cpu", "auto"):
        kind, available = "CPU core", _cpu_cores()
    else:
        return
    asked = _requested(devices, available)
    if asked is None:
        return
    count, highest = asked
    if count > available or (highest is not None and kind == "CUDA GPU" and highest >= available):
        there = f"{available} {kind}{'s' if available != 1 else ''}"
        what = f"{count} {kind}s" if highest is None else f"{kind} index {highest}"
        raise DeviceError(
            f"trainer.devices = {devices!r} asks for {what}, but this machine has {there}: "
            f"use trainer.devices ≤ {available}, or -1 for all of them"
        )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``, or raise ``CheckpointError`` saying why not.

    Raises:
        CheckpointError: the path is missing or a directory, the file is empty, truncated or corrupt, it
            holds pickled objects other than tensors and plain values (refused unread: nothing in it runs),
            or it is not a Lightning checkpoint.
    """
    where = f"--ckpt_path {str(path)!r}"
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{where}: no such file; give a checkpoint written by `trainer fit` "
            "(<save_dir>/<name>/version_N/checkpoints/last.ckpt), or `last` for the newest run of this config"
        )
    if p.is_dir():
        raise CheckpointError(f"{where} is a directory; give the checkpoint file in it, e.g. {p / 'last.ckpt'}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{where}: the file is empty; use another checkpoint, e.g. a step*.ckpt beside it")
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it asks to call {found.group(1)}" if found else "it is corrupt, or holds pickled objects"
        raise CheckpointError(
            f"{where} was refused unread: {what}, and a checkpoint may hold only tensors and plain values "
            "(loaded with weights_only=True, so none of it ran); use a checkpoint written by `trainer fit`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        raise CheckpointError(
            f"{where} cannot be read: it is truncated or corrupt; use another checkpoint, e.g. a step*.ckpt beside it"
        ) from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{where} is not a Lightning checkpoint (it has no state_dict); give one written by `trainer fit`"
        )
    return dict(checkpoint)


def check_checkpoint_matches(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    hparams: Mapping[str, Any],
    resume: bool,
) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint`` holds the model the config builds.

    Args:
        checkpoint: as ``load_checkpoint`` returns it.
        path: for the message.
        state_dict: the freshly built model's ``state_dict()``.
        hparams: the freshly built model's hyperparameters.
        resume: ``fit`` resumes training: the optimizer state and the progress must be there, and the lr,
            momentum and weight decay must agree (the restored optimizer state would silently keep the old ones).
    """
    where = f"--ckpt_path {str(path)!r}"
    beside = Path(path).resolve().parent.parent / "config.yaml"
    hint = f"use the config that made it ({beside})" if beside.is_file() else "use the config that made it"
    saved = checkpoint["state_dict"]
    missing = [k for k in state_dict if k not in saved]
    extra = [k for k in saved if k not in state_dict]
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has {', '.join(extra)}"] if extra else [])
        raise CheckpointError(f"{where} holds another model: it {' and '.join(parts)}; {hint}")
    for key, tensor in state_dict.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where} holds a model of other shapes: {key} is {tuple(saved[key].shape)} there and "
                f"{tuple(tensor.shape)} in this config; {hint}"
            )
    saved_hp = checkpoint.get("hyper_parameters") or {}
    keys = MODEL_KEYS + (OPTIMIZER_KEYS if resume else ())
    differ = [k for k in keys if k in saved_hp and k in hparams and _norm(saved_hp[k]) != _norm(hparams[k])]
    if differ:
        pairs = ", ".join(f"model.{k} = {saved_hp[k]!r} there, {hparams[k]!r} here" for k in differ)
        raise CheckpointError(f"{where} was trained with other settings ({pairs}); {hint}, or start a new run")
    if resume:
        absent = [k for k in ("optimizer_states", "loops") if k not in checkpoint]
        if absent:
            raise CheckpointError(
                f"{where} cannot resume training: it has no {' or '.join(absent)} (a weights-only checkpoint); "
                "use last.ckpt of the run, or start a new run"
            )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


__all__ = ["check_checkpoint_matches", "check_devices", "load_checkpoint"]
