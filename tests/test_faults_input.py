"""Bad input through the real command: one clear line, a non-zero exit, no traceback, nothing written.

Every case runs ``python -m trainer fit …`` in its own process (forked from a server that did the imports
once; ``HANDGRAD_TEST_SUBPROCESS=1`` runs each as a plain subprocess instead) against a runs root that
already holds an earlier run, and checks that the root — that run included — is byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _fork_cli import ForkingCLI
from _util import run_cli

from trainer.preflight import _cpu_cores

QUIET = ("--progress_bar.refresh_rate", "0")


@dataclass
class Ctx:
    root: Path  # the runs root, holding an earlier run
    files: Path  # scratch files (CSVs, broken checkpoints), outside the root
    ckpt: Path  # the earlier run's last.ckpt: hidden [4], tanh


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root with its size, mtime and content hash."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = ForkingCLI(tmp_path_factory.mktemp("cli-io"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def ctx(cli, tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("runs")
    files = tmp_path_factory.mktemp("files")
    earlier = cli(
        "fit", "--config", "configs/line.yaml", "--trainer.logger.init_args.save_dir", str(root), *QUIET,
        "--trainer.max_steps", "4", "--convergence.tol", "0", "--model.hidden", "[4]", "--model.activation", "tanh",
        "--model.slope", "null", "--model.intercept", "null",
    )  # fmt: skip
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    ckpt = root / "line" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return Ctx(root, files, ckpt)


def _write(ctx: Ctx, name: str, text: str | bytes) -> str:
    path = ctx.files / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _csv(name: str, text: str | bytes, *extra: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        path = _write(ctx, name, text)
        return ["--config", "configs/csv.yaml", "--data.path", path, "--data.targets", "[y]", *extra]

    return build


def _line(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["--config", "configs/line.yaml", *args]


def _yaml(name: str, text: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["--config", "configs/line.yaml", "--config", _write(ctx, name, text)]


def _like_earlier(*args: str) -> list[str]:
    """The earlier run's model settings, so only what a case changes differs."""
    return ["--config", "configs/line.yaml", "--model.slope", "null", "--model.intercept", "null", *args]


def _earlier(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: _like_earlier(*args)


def _ckpt(make: Callable[[Ctx], str], *model: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: [*_like_earlier(*(model or ("--model.hidden", "[4]", "--model.activation", "tanh"))),
                        "--ckpt_path", make(ctx)]  # fmt: skip


class _Marker:
    """Unpickling this creates the file at ``path`` (by calling ``open(path, "w")``): a stand-in for any code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _marker(ctx: Ctx) -> Path:
    return ctx.files / "code-ran"


def _evil_zip(ctx: Ctx) -> str:
    checkpoint = torch.load(ctx.ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _Marker(str(_marker(ctx)))
    path = ctx.files / "evil.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def _evil_raw(ctx: Ctx) -> str:
    path = ctx.files / "evil-raw.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": _Marker(str(_marker(ctx)))}, protocol=2))
    return str(path)


def _truncated(ctx: Ctx) -> str:
    data = ctx.ckpt.read_bytes()
    return _write(ctx, "truncated.ckpt", data[: len(data) // 2])


def _tensor_file(ctx: Ctx) -> str:
    path = ctx.files / "tensor.ckpt"
    torch.save(torch.zeros(3), path)
    return str(path)


GOOD_CSV = "a,b,y\n1,2,3\n4,5,6\n7,8,10\n"

# (id, the arguments after `fit`, words the one line must contain)
CASES = [
    ("lr-negative", _line("--model.lr", "-0.1"), ["model.lr = -0.1", "finite number > 0"]),
    ("lr-zero", _line("--model.lr", "0"), ["model.lr = 0.0", "> 0"]),
    ("lr-nan-yaml", _yaml("nan.yaml", "model:\n  lr: .nan\n"), ["model.lr = nan", "finite number > 0"]),
    ("lr-inf", _line("--model.lr", ".inf"), ["model.lr = inf", "finite"]),
    ("momentum-one", _line("--model.momentum", "1"), ["model.momentum = 1.0", "[0, 1)"]),
    ("momentum-negative", _line("--model.momentum", "-0.5"), ["model.momentum = -0.5", "[0, 1)"]),
    ("weight-decay-negative", _line("--model.weight_decay=-1e-4"), ["model.weight_decay = -0.0001", "≥ 0"]),
    ("batch-size-zero", _line("--data.init_args.batch_size", "0"), ["data.batch_size = 0", "positive integer"]),
    ("batch-size-negative", _line("--data.init_args.batch_size", "-3"), ["data.batch_size = -3", "null"]),
    ("hidden-width-zero", _earlier("--model.hidden", "[4, 0]"), ["model.hidden[1] = 0", "integer ≥ 1"]),
    (
        "activation-unknown",
        _earlier("--model.hidden", "[4]", "--model.activation", "swish"),
        ["model.activation = 'swish'", "identity, relu, sigmoid, tanh"],
    ),
    (
        "output-activation-unknown",
        _line("--model.output_activation", "softplus"),
        ["model.output_activation = 'softplus'", "identity, relu, sigmoid, tanh (or null)"],
    ),
    ("loss-unknown", _line("--model.loss", "hinge"), ["model.loss = 'hinge'", "squared_error, cross_entropy"]),
    ("reduction-unknown", _line("--model.reduction", "median"), ["model.reduction = 'median'", "mean, sum"]),
    ("val-fraction-one", _line("--data.init_args.val_fraction", "1"), ["data.val_fraction = 1.0", "[0, 1)"]),
    ("val-fraction-negative", _line("--data.init_args.val_fraction", "-0.2"), ["data.val_fraction = -0.2"]),
    (
        "val-fraction-leaves-nothing",
        _line("--data.init_args.n", "2", "--data.init_args.val_fraction", "0.9"),
        ["data.val_fraction = 0.9 leaves no training data from 2 examples", "lower val_fraction"],
    ),
    (
        "csv-missing",
        lambda ctx: ["--config", "configs/csv.yaml", "--data.path", str(ctx.files / "nope.csv")],
        ["data.path", "nope.csv", "no such file"],
    ),
    (
        "csv-directory",
        lambda ctx: ["--config", "configs/csv.yaml", "--data.path", str(ctx.files)],
        ["data.path", "is a directory"],
    ),
    ("csv-not-text", _csv("binary.csv", b"a,y\n\xff\xfe\x00\x81,1\n"), ["binary.csv", "cannot be read", "UTF-8"]),
    ("csv-empty", _csv("empty.csv", ""), ["empty.csv", "the file is empty", "header row"]),
    ("csv-header-only", _csv("header.csv", "a,b,y\n"), ["header.csv", "no rows under it"]),
    (
        "csv-non-numeric",
        _csv("text.csv", "a,b,y\n1,2,3\n4,five,6\n"),
        ["text.csv, row 3, column 'b'", "'five' is not a number"],
    ),
    ("csv-nan", _csv("nan.csv", "a,b,y\n1,2,3\n4,nan,6\n"), ["nan.csv, row 3, column 'b'", "'nan' is not finite"]),
    ("csv-inf", _csv("inf.csv", "a,b,y\n1,2,3\n4,5,-inf\n"), ["inf.csv, row 3, column 'y'", "'-inf' is not finite"]),
    ("csv-too-many-cells", _csv("long.csv", "a,b,y\n1,2,3\n4,5,6,7\n"), ["long.csv, row 3: 4 cells", "has 3"]),
    ("csv-too-few-cells", _csv("short.csv", "a,b,y\n1,2,3\n4,5\n"), ["short.csv, row 3: 2 cells", "has 3"]),
    (
        "csv-no-target-column",
        _csv("cols.csv", GOOD_CSV, "--data.targets", "[price]"),
        ["cols.csv: no target column 'price'", "the columns are a, b, y"],
    ),
    (
        "csv-one-class",
        _csv(
            "oneclass.csv",
            "a,b,y\n1,2,cat\n4,5,cat\n7,8,cat\n",
            "--data.classification",
            "true",
            "--model.loss",
            "cross_entropy",
        ),
        ["oneclass.csv", "'y' holds one class only ('cat')", "at least two"],
    ),  # fmt: skip
    (
        "ckpt-missing",
        _ckpt(lambda ctx: str(ctx.files / "gone.ckpt")),
        ["--ckpt_path", "gone.ckpt", "no such file", "last"],
    ),
    ("ckpt-directory", _ckpt(lambda ctx: str(ctx.files)), ["--ckpt_path", "is a directory"]),
    ("ckpt-empty", _ckpt(lambda ctx: _write(ctx, "empty.ckpt", b"")), ["empty.ckpt", "the file is empty"]),
    (
        "ckpt-corrupt",
        _ckpt(lambda ctx: _write(ctx, "noise.ckpt", bytes(range(256)) * 8)),
        ["noise.ckpt", "refused unread", "weights_only=True"],
    ),
    ("ckpt-truncated", _ckpt(_truncated), ["truncated.ckpt", "cannot be read", "truncated or corrupt"]),
    ("ckpt-not-lightning", _ckpt(_tensor_file), ["tensor.ckpt", "not a Lightning checkpoint", "no state_dict"]),
    (
        "ckpt-other-model",
        lambda ctx: [*_line()(ctx), "--ckpt_path", str(ctx.ckpt)],
        ["holds another model", "model.2.weight", "config.yaml"],
    ),
    (
        "ckpt-other-shapes",
        _ckpt(lambda ctx: str(ctx.ckpt), "--model.hidden", "[5]", "--model.activation", "tanh"),
        ["holds a model of other shapes", "model.0.weight is (4, 1) there and (5, 1) in this config"],
    ),
    (
        "ckpt-other-settings",
        _ckpt(lambda ctx: str(ctx.ckpt), "--model.hidden", "[4]", "--model.activation", "sigmoid"),
        ["trained with other settings", "model.activation = 'tanh' there, 'sigmoid' here"],
    ),
    (
        "ckpt-other-lr-on-resume",
        _ckpt(lambda ctx: str(ctx.ckpt), "--model.hidden", "[4]", "--model.activation", "tanh", "--model.lr", "0.5"),
        ["model.lr = 0.01 there, 0.5 here"],
    ),
    (
        "ckpt-pickle-runs-code",
        _ckpt(_evil_zip),
        ["evil.ckpt", "refused unread", "asks to call io.open", "none of it ran"],
    ),
    ("ckpt-raw-pickle-runs-code", _ckpt(_evil_raw), ["evil-raw.ckpt", "refused unread", "none of it ran"]),
    (
        "ckpt-weights-only-false",
        lambda ctx: [*_ckpt(lambda c: str(c.ckpt))(ctx), "--weights_only", "false"],
        ["--weights_only false is refused"],
    ),
    (
        "ddp-more-cpu-devices-than-cores",
        _line("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", str(_cpu_cores() + 1)),
        [f"trainer.devices = '{_cpu_cores() + 1}' asks for {_cpu_cores() + 1} CPU cores", f"≤ {_cpu_cores()}"],
    ),
    ("convergence-tol-negative", _line("--convergence.tol", "-1"), ["convergence.tol = -1.0", "≥ 0"]),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            "accelerator-cuda-without-gpu",
            _line("--trainer.accelerator", "cuda"),
            ["trainer.accelerator = 'cuda'", "no CUDA GPU", "accelerator: cpu"],
        )
    )


def _fit(cli, ctx: Ctx, args: list[str], env: dict[str, str] | None = None):
    return cli("fit", *args, "--trainer.logger.init_args.save_dir", str(ctx.root), *QUIET, env=env)


def assert_one_clear_line(result, words: list[str]) -> str:
    """Exit 2, the last line of stderr is the only `error:` line, it holds every word, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert result.returncode == 2, (result.returncode, errors[0])
    return errors[0]


@pytest.mark.parametrize("make_args, words", [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, ctx, make_args, words):
    args = make_args(ctx)
    before = snapshot(ctx.root)
    result = _fit(cli, ctx, args)
    assert_one_clear_line(result, words)
    assert snapshot(ctx.root) == before
    assert not _marker(ctx).exists(), "unpickling the checkpoint ran code"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_gpus_than_there_are(cli, ctx):
    n = torch.cuda.device_count()
    before = snapshot(ctx.root)
    result = _fit(cli, ctx, _line("--trainer.accelerator", "cuda", "--trainer.devices", str(n + 1))(ctx))
    assert_one_clear_line(result, [f"asks for {n + 1} CUDA GPUs", f"≤ {n}"])
    assert snapshot(ctx.root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_csv(cli, ctx):
    path = Path(_write(ctx, "locked.csv", GOOD_CSV))
    path.chmod(0)
    result = _fit(cli, ctx, ["--config", "configs/csv.yaml", "--data.path", str(path), "--data.targets", "[y]"])
    assert_one_clear_line(result, ["locked.csv", "cannot be read", "Permission denied"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model.lr", "abc"], ['Parser key "model.lr"', "Expected a <class 'float'>", "abc"]),
        (["--model.learning_rate", "0.1"], ["unrecognized arguments", "--model.learning_rate"]),
        (["--model.hidden", "[1.5]"], ['Parser key "model.hidden"']),
    ],
    ids=["wrong-type", "unknown-key", "width-not-an-integer"],
)
def test_type_errors_and_unknown_keys_keep_lightningclis_messages(cli, ctx, args, words):
    before = snapshot(ctx.root)
    result = _fit(cli, ctx, ["--config", "configs/line.yaml", *args])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "usage:" in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr[-1500:])
    assert snapshot(ctx.root) == before


def test_an_unknown_key_in_yaml_keeps_lightningclis_message(cli, ctx):
    result = _fit(cli, ctx, _yaml("typo.yaml", "model:\n  learning_rate: 0.1\n")(ctx))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "learning_rate" in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_full_traceback(cli, ctx, how):
    args = _line("--model.lr", "-1")(ctx) + (["--debug"] if how == "flag" else [])
    result = _fit(cli, ctx, args, env={"HANDGRAD_DEBUG": "1"} if how == "env" else None)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "trainer.module.ConfigError: model.lr = -1.0 is invalid" in result.stderr


def test_a_plain_subprocess_gives_the_same_line(ctx, tmp_path):
    """The forked runner against ``[sys.executable, "-m", "trainer"]`` itself, for one data and one model case."""
    marker = _marker(ctx)
    for make_args, words in [(CASES[2][1], CASES[2][2]), (_ckpt(_evil_zip), ["refused unread"])]:
        before = snapshot(ctx.root)
        result = run_cli("fit", *make_args(ctx), "--trainer.logger.init_args.save_dir", str(ctx.root), *QUIET)
        assert_one_clear_line(result, words)
        assert snapshot(ctx.root) == before
    assert not marker.exists()


def test_the_refused_pickle_would_have_run_code(tmp_path):
    """The guard is real: such a file, loaded without weights_only, does create the marker."""
    target = tmp_path / "code-ran"
    evil = pickle.dumps({"state_dict": {}, "x": _Marker(str(target))}, protocol=2)
    pickle.loads(evil)  # the unsafe load the command refuses to do
    assert target.exists()
