"""``trainer check --config FILE``: a table per parameter, exit 1 on a wrong backward."""

from __future__ import annotations

import pytest
from tb_helpers import ROOT, command, run_main

from models.activations import ReLU


def _rows(out: str) -> dict[str, str]:
    """tensor name → its table line."""
    rows = {}
    for line in out.splitlines():
        if line.endswith(("  yes", "  NO")):
            rows[line.split()[0]] = line
    return rows


def test_the_line_passes_as_a_command():
    result = command("check", "--config", "configs/line.yaml")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert list(rows) == ["input", "0.weight", "0.bias"]
    assert "(slope)" in rows["0.weight"] and "(intercept)" in rows["0.bias"]
    assert all(line.endswith("yes") for line in rows.values())


def test_the_mlp_passes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["check", "--config", str(ROOT / "configs/mlp_classification.yaml")])
    assert exit_info.value.code == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["input", "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_overrides_reach_the_checked_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["check", "--config", str(ROOT / "configs/chain.yaml"), "--model.hidden", "[3, 2]"])
    assert exit_info.value.code == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["input", "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert rows["0.weight"].split()[1] == "3×1" and rows["2.weight"].split()[1] == "2×3"


def test_a_broken_backward_fails_and_is_named(capsys, monkeypatch):
    correct = ReLU.backward
    monkeypatch.setattr(ReLU, "backward", lambda self, g: correct(self, g) * 1.001)
    with pytest.raises(SystemExit) as exit_info:
        run_main(["check", "--config", str(ROOT / "configs/mlp_classification.yaml")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    for name in ("input", "0.weight", "0.bias", "2.weight", "2.bias"):
        assert rows[name].endswith("NO"), rows[name]
    for name in ("4.weight", "4.bias"):  # above every ReLU: still right
        assert rows[name].endswith("yes"), rows[name]
    assert "FAILED" in captured.err and "0.weight" in captured.err and "4.weight" not in captured.err
