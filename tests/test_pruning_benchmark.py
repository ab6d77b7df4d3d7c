"""Smoke test of ``benchmarks/pruning.py --quick``: every order, stage and fraction is measured and printed."""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

import pytest
import torch

from gmar_lightning.heads import prune_heads, weight_magnitude_importance
from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pruning.py"


def _load_script() -> ModuleType:
    return load_script(SCRIPT, "pruning_benchmark")


def test_quick_run_prints_accuracy_for_every_order_and_the_speed_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmark = _load_script()
    result = benchmark.main(["--quick", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "command: python benchmarks/pruning.py --quick --output-dir " + str(tmp_path)
    for stage in ("as pruned", "after 2 pruning steps, each with a 1-epoch recovery fine-tune\n"):
        assert f"heads removed least important first, {stage}" in printed
    header = next(line for line in printed.splitlines() if line.startswith("fraction removed"))
    assert header.split()[2:] == list(benchmark.ORDERS)
    assert "best order at 50% removed, recovered:" in printed
    assert printed.count("0.500 ( 8 heads)") == 2
    results, speed = result["results"], result["speed"]
    assert len(results) == 2 and all(len(r.accuracy["recovered"]["GMAR"]) == 2 for r in results)
    # The speed table: fewer heads, fewer parameters and FLOPs, exactly as the per-head cost predicts.
    assert speed.heads == [8, 4]
    assert speed.parameters == speed.predicted_parameters
    assert speed.flops == pytest.approx(speed.predicted_flops, rel=1e-9)
    assert speed.flops == sorted(speed.flops, reverse=True)
    assert all(len(times) == 2 for times in speed.seconds + speed.cpu_seconds)
    assert (tmp_path / "pruning_benchmark.png").stat().st_size > 0
    assert (tmp_path / "pruning_output.txt").read_text(encoding="utf-8") == printed
    assert "training (cached model)" not in printed
    assert len(list((tmp_path / "models").glob("seed*.pth"))) == 2


def test_trained_models_are_kept_and_reused_only_with_the_same_training_settings(tmp_path: Path) -> None:
    benchmark = _load_script()
    options = ["--output-dir", str(tmp_path), "--train-images", "8", "--epochs", "1", "--image-size", "32"]
    args = benchmark.build_parser().parse_args(options)
    split = benchmark.load_split(args, 8, 0, 0, "train")
    trained, cached = benchmark.trained_model(args, split, 0)
    assert not cached
    kept, cached = benchmark.trained_model(args, split, 0)
    assert cached and kept.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(kept.state_dict()[key], value) for key, value in trained.state_dict().items())
    assert not benchmark.trained_model(args, split, 1)[1]  # another seed
    assert not benchmark.trained_model(benchmark.build_parser().parse_args([*options, "--lr", "1e-3"]), split, 0)[1]
    assert not benchmark.trained_model(benchmark.build_parser().parse_args([*options, "--retrain"]), split, 0)[1]


def test_publish_needs_the_full_configuration() -> None:
    with pytest.raises(SystemExit, match="--publish needs the full configuration"):
        _load_script().main(["--quick", "--publish"])


def test_gradual_pruning_removes_the_requested_heads_in_equal_steps_ranking_the_pruned_model_again(
    tmp_path: Path,
) -> None:
    benchmark = _load_script()
    options = ["--output-dir", str(tmp_path), "--image-size", "32", "--recovery-epochs", "1", "--distill-alpha", "0.5"]
    args = benchmark.build_parser().parse_args([*options, "--prune-steps", "2"])
    train_split = benchmark.load_split(args, 16, 0, 0, "train")
    eval_split = benchmark.load_split(args, 8, 0, 16, "importance")
    model = benchmark.build_model(args, 0)
    scores = torch.arange(16.0).reshape(4, 4)  # layer-major: head (0, 0) is the least important
    splits = (train_split, eval_split)
    pruned = benchmark.gradual_prune_and_recover(copy.deepcopy(model), "magnitude", 5, splits, args, 0, scores)

    # By hand: step one removes 5 * 1 // 2 = 2 heads by the given scores, then the fine-tune distils from the
    # unpruned model; step two removes the 3 heads of smallest weight magnitude in the fine-tuned model.
    expected = copy.deepcopy(model)
    prune_heads(expected, {0: [0, 1]})
    benchmark.recover(expected, train_split, args, 0, copy.deepcopy(model).eval())
    magnitude = weight_magnitude_importance(expected).flatten()
    expected_kept = torch.ones(16, dtype=torch.bool)
    expected_kept[:2] = False
    expected_kept[magnitude.nan_to_num(float("inf")).argsort()[:3]] = False
    assert benchmark.present_heads(pruned).flatten().tolist() == expected_kept.tolist()
    assert int(expected_kept.sum()) == 11

    # One step removes the 5 least important heads by the given scores at once.
    one_step = benchmark.build_parser().parse_args([*options, "--prune-steps", "1"])
    once = benchmark.gradual_prune_and_recover(copy.deepcopy(model), "magnitude", 5, splits, one_step, 0, scores)
    assert benchmark.present_heads(once).tolist() == (scores >= 5).tolist()


def test_first_seed_and_orders_choose_what_is_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benchmark = _load_script()
    options = ["--quick", "--output-dir", str(tmp_path), "--first-seed", "100", "--orders", "random,Michel"]
    result = benchmark.main([*options, "--prune-steps", "2"])
    printed = capsys.readouterr().out
    assert "seed 100: validation accuracy" in printed and "seed 101: validation accuracy" in printed
    assert "seed 0:" not in printed
    header = next(line for line in printed.splitlines() if line.startswith("fraction removed"))
    assert header.split()[2:] == ["random", "Michel"]
    assert set(result["results"][0].accuracy["recovered"]) == {"random", "Michel"}
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["--orders", "GMAR,lottery"])
