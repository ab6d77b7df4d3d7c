"""``benchmarks/bench_anchors.py``: the vit-explain anchors' discard step, and a tiny end-to-end run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.scripts import benchmark_script


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_script("bench_anchors") as module:
        yield module


@pytest.mark.parametrize("keep_first", [True, False])
def test_discard_zeroes_the_lowest_fraction_of_all_entries(bench: ModuleType, keep_first: bool) -> None:
    fused = torch.rand(7, 7, generator=torch.Generator().manual_seed(0))
    fused[0, 0] = -1.0  # the smallest entry, so sparing flat index 0 shows
    expected = fused.clone()
    count = int(49 * 0.9)  # 44 of the 49 entries, ranked over the whole matrix
    for flat_index in sorted(range(49), key=lambda i: float(fused.view(-1)[i]))[:count]:
        if not (keep_first and flat_index == 0):
            expected.view(-1)[flat_index] = 0
    bench.discard_lowest(fused, 0.9, keep_first=keep_first)
    assert torch.equal(fused, expected)
    assert int((fused != 0).sum()) == 49 - count + int(keep_first)


def test_discard_ratio_zero_leaves_the_matrix_alone(bench: ModuleType) -> None:
    fused = torch.rand(5, 5)
    before = fused.clone()
    bench.discard_lowest(fused, 0.0, keep_first=True)
    assert torch.equal(fused, before)


def test_tiny_run_checks_the_anchors_without_discard_and_times_them_with_it(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "anchors.json"
    bench.main(["--quick", "--batches", "2", "--sizes", "48", "--discard-ratio", "0.5", "--json", str(output)])
    printed = capsys.readouterr().out
    checks = [line for line in printed.splitlines() if "CHECK" in line]
    assert len(checks) == 2 and all(line.endswith("(same)") for line in checks), checks
    assert "discard_ratio=0.5" in printed.splitlines()[0]
    result = json.loads(output.read_text())
    assert result["discard_ratio"] == 0.5
    (case,) = result["cases"]
    assert {"anchor_rollout", "anchor_grad_rollout", "anchor_generic_rule", "floor"} <= set(case["times"])


def test_a_training_step_that_adds_no_resident_peak_prints_no_peak_ratio(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a small CPU case measures in a process whose freed heap serves its tensors (a pytest-xdist worker that ran
    # other files first): no peak growth for any operation. It once ended the run with a ZeroDivisionError.
    names = ["anchor_rollout", "explain_rollout", "explain_grad_rollout", "explain_gmar_l1", "floor", "train_step"]
    bench.print_case({"tokens": 10, "times": dict.fromkeys(names, 0.1), "peaks": dict.fromkeys(names, 0)}, 1)
    ratios = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("RATIO")]
    assert len(ratios) == 2 and all(line.endswith("/ train step  1.00   peak / train step   n/a") for line in ratios)


def test_discard_ratio_out_of_range_is_refused_in_one_line(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--discard-ratio", "1.5"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "--discard-ratio" in line and "error" in line]
    assert "pass a fraction in [0, 1)" in line
