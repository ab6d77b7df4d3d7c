"""``benchmarks/eval_report.py``: the ``--quick`` configuration runs every part end to end; the statistics are right."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "eval_report.py"


def _load_script() -> ModuleType:
    return load_script(SCRIPT, "eval_report")


@pytest.fixture(scope="module")
def eval_report() -> ModuleType:
    return _load_script()


@pytest.mark.integration
def test_quick_run_prints_every_section_method_and_metric(
    eval_report: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_report.main(["--quick", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"command: python benchmarks/eval_report.py --quick --output-dir {tmp_path}"
    assert "seeds=2" in lines[1] and "runtime:" in printed and "torch " in printed

    def table_rows(header_start: str, header_contains: str) -> dict[str, str]:
        index = next(i for i, line in enumerate(lines) if line.startswith(header_start) and header_contains in line)
        rows = {}
        for line in lines[index + 2 :]:
            if "±" not in line:  # a blank line or the caption of the next table
                break
            rows[line.split("  ")[0].strip()] = line
        return rows

    localisation = table_rows("method", "patch pointing")
    assert set(localisation) == {*eval_report.METHODS, "area share"}
    faithfulness = table_rows("method", "ROAD MoRF")
    assert set(faithfulness) == set(eval_report.FAITHFULNESS_METHODS)
    assert all(row.count("±") == 6 for row in faithfulness.values())
    sensitivity = table_rows("method", "right object")
    assert set(sensitivity) == set(eval_report.METHODS)
    # Raw attention and rollout never look at the target: the same map for both classes.
    for method in ("attention", "rollout"):
        assert sensitivity[method].split()[-3] == "1.000"  # the ρ column: mean, ±, half-width
    cascade = table_rows("method", "logits")
    assert set(cascade) == {*eval_report.CASCADE_METHODS, "input_grad (patch sums)"}
    for section in ("A. Localisation", "B. Faithfulness", "C. Paired", "D. Paired", "E. Class sensitivity"):
        assert section in printed
    for section in ("F. Cascading", "G. Independent", "H. Head ablation", "I. Leave-one-head-out"):
        assert section in printed
    assert "GMAR-L1 LIF − random" in printed and "GMAR-L1 − Michel" in printed

    assert (tmp_path / "eval_ablation.png").stat().st_size > 0
    assert (tmp_path / "eval_report_output.txt").read_text(encoding="utf-8") == printed


def test_quick_and_publish_exclude_each_other(eval_report: ModuleType) -> None:
    with pytest.raises(SystemExit, match="--quick and --publish"):
        eval_report.main(["--quick", "--publish"])


def _result(eval_report: ModuleType, scores: dict[str, float]) -> object:
    return eval_report.SeedResult(
        val_accuracy=1.0,
        pair_accuracy=1.0,
        per_image={},
        scores={method: {"m": value} for method, value in scores.items()},
        cascade={},
        curves={},
        head_correlations={},
    )


def test_best_mark_needs_a_paired_interval_that_excludes_zero(eval_report: ModuleType) -> None:
    # a beats b by exactly 0.01 in every seed (paired interval [0.01, 0.01]) although their per-method intervals,
    # driven by the seed-to-seed swing they share, overlap widely.
    results = [_result(eval_report, {"a": base + 0.01, "b": base, "c": 0.0}) for base in (0.2, 0.5, 0.8, 0.3)]
    assert eval_report.best_methods(results, ["a", "b", "c"], "m", higher=True) == {"a"}
    assert eval_report.best_methods(results, ["a", "b", "c"], "m", higher=False) == {"c"}
    # A difference that changes sign between seeds earns no mark.
    mixed = [_result(eval_report, {"a": value, "b": 0.5}) for value in (0.6, 0.4, 0.7, 0.45)]
    assert eval_report.best_methods(mixed, ["a", "b"], "m", higher=True) == set()
    assert "!" in eval_report.paired_table(results, {"m": True}, [("a", "b")])
    assert "!" not in eval_report.paired_table(mixed, {"m": True}, [("a", "b")])


def test_t_quantile_and_interval(eval_report: ModuleType) -> None:
    assert eval_report.t_quantile_975(2) == pytest.approx(4.302653, abs=1e-5)
    assert eval_report.t_quantile_975(5) == pytest.approx(2.570582, abs=1e-5)
    mean, half_width = eval_report.mean_interval([0.5])
    assert mean == 0.5 and math.isnan(half_width)  # no interval from one seed
    mean, half_width = eval_report.mean_interval([1.0, math.nan, 3.0])  # undefined values are left out
    assert mean == 2.0 and half_width == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2), abs=1e-4)


def test_the_package_spearman_ranks_pixel_maps_with_ties(eval_report: ModuleType) -> None:
    # The report correlates whole 64 x 64 maps; with ties (flat upsampled regions) the ranks are averaged.
    generator = torch.Generator().manual_seed(0)
    first = (torch.rand(3, 4096, generator=generator) * 50).floor()
    second = first.clone()
    second[1] = -second[1]
    second[2] = torch.rand(4096, generator=generator)
    correlations = eval_report.spearman(first, second)
    assert correlations[0].item() == pytest.approx(1.0) and correlations[1].item() == pytest.approx(-1.0)
    assert abs(correlations[2].item()) < 0.1
    assert torch.isnan(eval_report.spearman(torch.ones(1, 4096), first[:1]))[0]


def test_reinitialised_copy_replaces_exactly_the_chosen_groups(eval_report: ModuleType) -> None:
    args = eval_report.build_parser().parse_args(["--quick"])
    trained, fresh = eval_report.build_model(args, 0), eval_report.build_model(args, 1)
    groups = dict(eval_report.parameter_groups(trained))
    assert list(groups) == ["logits", "block 3", "block 2", "block 1", "block 0", "embed"]
    copy = eval_report.reinitialised_copy(trained, fresh, groups["block 3"])
    for name, value in copy.state_dict().items():
        source = fresh if name.startswith("blocks.3.") else trained
        assert torch.equal(value, source.state_dict()[name]), name


def test_ablation_curves_share_their_ends_without_changing_a_number(
    eval_report: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gmar_lightning.heads import head_ablation_curve, random_order

    args = eval_report.build_parser().parse_args(["--quick"])
    model = eval_report.build_model(args, 0).eval()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 64, 64, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1])
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    orders = {"first": random_order(4, 4, seed=1), "second": random_order(4, 4, seed=2)}
    shared = eval_report.ablation_curves(model, batches, orders, seed=0)
    for name, order in orders.items():
        separate = head_ablation_curve(
            model, batches, order, eval_report.ABLATION_FRACTIONS, order_name=name, progress=False
        )
        assert shared[name] == separate
        assert separate.loss[0] != separate.loss[-1]  # the ends differ, so swapping them would show
    # Only fractions from 0 to 1 have ends that every order shares.
    monkeypatch.setattr(eval_report, "ABLATION_FRACTIONS", (0.25, 0.5, 1.0))
    with pytest.raises(ValueError, match="ABLATION_FRACTIONS must run from 0 to 1"):
        eval_report.ablation_curves(model, batches, orders, seed=0)


@pytest.mark.integration
def test_quick_run_of_one_chosen_seed_reports_intervals_as_not_available(
    eval_report: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_report.main(["--quick", "--seed-list", "3", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "seed_list=[3]" in printed.splitlines()[1]
    assert "seed 3: accuracy" in printed and "seed 0:" not in printed
    assert "over 1 seeds (n/a: one seed)" in printed
    accuracy = next(line for line in printed.splitlines() if line.startswith("accuracy over seeds:"))
    assert accuracy.count("± n/a") == 2
    assert "runtime:" in printed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seed-list", "1", "1"], "--seed-list must hold distinct seeds"),
        (["--seed-list", "-1"], "--seed-list must hold distinct seeds"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--seed-list", "0", "--publish"], "leave out --seed-list"),
    ],
)
def test_bad_seed_choices_are_one_line(eval_report: ModuleType, arguments: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        eval_report.main(arguments)
