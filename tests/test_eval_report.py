"""Smoke test of ``benchmarks/eval_report.py``: a tiny configuration runs end to end and prints every table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "eval_report.py"


def _load_script() -> ModuleType:
    # benchmarks/ is not a package, so the script is loaded from its path.
    spec = importlib.util.spec_from_file_location("eval_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_report() -> ModuleType:
    return _load_script()


def test_tiny_run_prints_every_method_and_metric(
    eval_report: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_report.main(
        [
            *("--seeds", "2", "--train-images", "64", "--val-images", "16", "--epochs", "1"),
            *("--eval-images", "8", "--steps", "5", "--output-dir", str(tmp_path)),
        ]
    )
    printed = capsys.readouterr().out
    lines = printed.splitlines()

    header_index = next(i for i, line in enumerate(lines) if line.startswith("method") and "pointing" in line)
    header = lines[header_index]
    for metric in ("pointing ↑", "energy ↑", "deletion ↓", "insertion ↑"):
        assert metric in header
    rows = {line.split()[0]: line for line in lines[header_index + 2 : header_index + 2 + len(eval_report.METHODS)]}
    assert set(rows) == {"attention", "rollout", "grad_rollout", "gmar_l1", "gmar_l2", "random"}
    for row in rows.values():
        assert row.count("±") == 4
    # Exactly one best mark per metric column.
    assert sum(row.count("*") for row in rows.values()) == 4

    assert "Model-randomisation sanity check" in printed
    assert "Head ablation" in printed and "area under curve" in printed
    for order in ("GMAR-L1", "Michel", "random"):
        assert order in printed
    assert printed.splitlines()[0].startswith("command: python benchmarks/eval_report.py --seeds 2")
    assert "runtime:" in printed and "torch " in printed

    assert (tmp_path / "eval_ablation.png").stat().st_size > 0
    assert (tmp_path / "eval_report_output.txt").read_text(encoding="utf-8") == printed


def test_t_quantile_and_interval(eval_report: ModuleType) -> None:
    assert eval_report.t_quantile_975(2) == pytest.approx(4.302653, abs=1e-5)
    assert eval_report.t_quantile_975(5) == pytest.approx(2.570582, abs=1e-5)
    mean, half_width = eval_report.mean_interval([0.5])
    assert mean == 0.5 and math.isnan(half_width)  # no interval from one seed


def test_spearman_handles_ties_and_constant_rows(eval_report: ModuleType) -> None:
    first = torch.tensor([[1.0, 2.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    second = torch.tensor([[10.0, 20.0, 20.0, 40.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    correlations = eval_report.spearman(first, second)
    assert correlations[0].item() == pytest.approx(1.0)
    assert torch.isnan(correlations[1])
    assert correlations[2].item() == pytest.approx(-1.0)
