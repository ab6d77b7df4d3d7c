"""The examples end to end on tiny settings: the main job, head pruning on its output, and the LightningCLI config."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gmar_lightning.cli import main as cli_main
from gmar_lightning.model_loading import checkpoint_model_settings, create_vit, load_weights
from gmar_lightning.trajectory import HeadTrajectory
from tests.scripts import load_script

# The examples run real fits.
pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_JOB = [
    "--max-train-images", "48", "--max-val-images", "32", "--epochs", "2", "--batch-size", "16",
    "--img-size", "32", "--model-kwargs", '{"embed_dim": 32, "depth": 2}', "--num-probe", "8", "--no-progress-bar",
    "--target-acc", "0",
]  # fmt: skip


def load_example(name: str) -> ModuleType:
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.fixture(scope="module")
def job_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One tiny run of examples/finetune_vit.py, shared by the tests that read its output: its result, what it
    printed, and the ``--log-dir`` it was given."""
    log_dir = tmp_path_factory.mktemp("job")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = load_example("finetune_vit").main(
            [*TINY_JOB, "--methods", "gmar_l1,rollout", "--log-dir", str(log_dir)]
        )
    return result, printed.getvalue(), log_dir


@pytest.fixture(scope="module")
def job(job_run: tuple[dict[str, Any], str, Path]) -> dict[str, Any]:
    return job_run[0]


def test_main_job_logs_to_tensorboard_and_writes_head_importance(job: dict[str, Any]) -> None:
    run_dir = Path(job["log_dir"])
    assert 0.0 <= job["val_acc"] <= 1.0 and job["wall_time_s"] > 0
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert job["tensorboard_command"] == f"tensorboard --logdir {run_dir} --samples_per_plugin images=1000"
    assert Path(job["checkpoint_path"]).is_file()
    assert job["trajectory_path"] == str(run_dir / "head_importance.npz")
    trajectory = HeadTrajectory.load_npz(job["trajectory_path"])
    assert trajectory.epochs == [0, 1] and tuple(trajectory.weights.shape) == (2, 2, 4)
    assert torch.allclose(trajectory.weights.sum(dim=-1), torch.ones(2, 2))
    header = (run_dir / "head_importance.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "validation,epoch,step,layer,layer_name,head,weight,score"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()
    assert {"gmar/overlay/gmar_l1", "gmar/overlay/rollout"} <= set(tags["images"])
    assert "gmar/head_weights/layer_00" in tags["histograms"]
    assert {"val_acc", "gmar/entropy/layer_01"} <= set(tags["scalars"])


def test_main_job_prints_where_the_logs_are(job_run: tuple[dict[str, Any], str, Path]) -> None:
    result, printed, log_dir = job_run
    assert f"tensorboard --logdir {result['log_dir']} --samples_per_plugin images=1000" in printed
    assert str(log_dir) in result["log_dir"]


def test_main_job_stops_once_the_target_accuracy_is_reached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Any accuracy reaches 0.01, so the run must stop after its first epoch and say so.
    options = [*TINY_JOB, "--epochs", "3", "--target-acc", "0.01", "--log-dir", str(tmp_path)]
    result = load_example("finetune_vit").main(options)
    assert result["epochs"] == 1 and result["stopped_early"] and result["val_acc"] >= 0.01
    assert "Stopped after epoch 1 of 3: val_acc reached the target 0.01" in capsys.readouterr().out
    assert HeadTrajectory.load_npz(result["trajectory_path"]).epochs == [0]


def test_main_job_trains_every_epoch_without_a_target(job: dict[str, Any]) -> None:
    assert job["epochs"] == 2 and not job["stopped_early"]


def test_head_pruning_ranks_and_ablates_the_run(job: dict[str, Any], tmp_path: Path) -> None:
    output = tmp_path / "pruning"
    result = load_example("head_pruning").main([job["log_dir"], "--output", str(output), "--batch-size", "16"])

    with Image.open(output / "ablation.png") as plot:
        assert plot.format == "PNG"
    ranking = json.loads((output / "ranking.json").read_text(encoding="utf-8"))
    assert ranking == result["ranking"]
    assert set(ranking["orders"]) == {
        "gmar_least_important_first",
        "gmar_most_important_first",
        "michel_least_important_first",
        "random_seed0",
    }
    every_head = sorted([layer, head] for layer in range(2) for head in range(4))
    for order in ranking["orders"].values():
        assert sorted(order) == every_head
    assert ranking["orders"]["gmar_most_important_first"] == ranking["orders"]["gmar_least_important_first"][::-1]
    trajectory = HeadTrajectory.load_npz(job["trajectory_path"])
    least = ranking["orders"]["gmar_least_important_first"][0]
    assert trajectory.weights[-1, least[0], least[1]] == trajectory.weights[-1].min()
    # Same model and data for every order: masking nothing, and masking everything, must agree across orders.
    curves = ranking["curves"].values()
    assert len({curve["accuracy"][0] for curve in curves}) == 1
    assert len({curve["accuracy"][-1] for curve in curves}) == 1
    assert all(curve["num_masked"] == [0, 1, 2, 3, 4, 5, 6, 7, 8] for curve in curves)
    # Then half the heads are removed for real, fine-tuned, measured and saved with their pruning spec.
    pruned = result["pruned"]
    assert pruned["heads_removed"] == 4 and sum(pruned["heads_per_layer"]) == 4
    assert pruned["parameters_after"] < pruned["parameters_before"] and pruned["speedup"] > 0
    accuracies = ("accuracy_before", "accuracy_pruned", "accuracy_recovered", "accuracy_unpruned_recovered")
    assert all(0.0 <= pruned[key] <= 1.0 for key in accuracies)
    assert not [key for key in pruned if "throughput" in key]  # a ratio of interleaved timings, no raw speed
    assert json.loads((output / "pruned_model.json").read_text(encoding="utf-8")) == pruned
    settings = checkpoint_model_settings(Path(job["checkpoint_path"]))
    fresh = create_vit(
        settings["model_name"], settings["num_classes"], settings["img_size"], model_kwargs=settings["model_kwargs"]
    )
    assert load_weights(fresh, pruned["path"], strict=True) == []
    assert [block.attn.num_heads for block in fresh.blocks] == pruned["heads_per_layer"]


def test_demo_command_with_csv_logger_feeds_the_report(tmp_path: Path) -> None:
    assert cli_main(["demo", *TINY_JOB, "--epochs", "1", "--logger", "csv", "--log-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / "gmar_demo" / "version_0"
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "head_importance.npz").is_file()
    overlays = sorted((run_dir / "gmar").glob("step_*/gmar_overlay_gmar_l1.png"))
    assert overlays

    assert cli_main(["report", str(tmp_path)]) == 0
    page = (run_dir / "report" / "report.html").read_text(encoding="utf-8")
    assert f"latest evaluation (step {int(overlays[-1].parent.name.removeprefix('step_'))})" in page


def test_main_job_trains_on_an_image_folder(tmp_path: Path) -> None:
    generator = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(("bright", "dark")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 128, (40, 48, 3), dtype=np.uint8) + 127 * (1 - label)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    options = [
        "--data-dir", str(tmp_path / "data"), "--model", "vit_tiny_patch16_224", "--img-size", "32",
        "--model-kwargs", '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}', "--epochs", "1",
        "--batch-size", "4", "--num-probe", "4", "--no-progress-bar", "--log-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    result = load_example("finetune_vit").main(options)
    trajectory = HeadTrajectory.load_npz(result["trajectory_path"])
    assert tuple(trajectory.weights.shape) == (1, 2, 4)
    checkpoint = torch.load(result["checkpoint_path"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 2
    assert checkpoint["state_dict"]["model.head.weight"].shape == (2, 32)


def test_two_demo_runs_with_wandb_and_one_log_dir_keep_their_own_files(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    results = [
        load_example("finetune_vit").main([*TINY_JOB, "--epochs", "1", "--logger", "wandb", "--log-dir", str(tmp_path)])
        for _ in range(2)
    ]
    offline_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    first_npz = Path(results[0]["trajectory_path"]).read_bytes()
    for result in results:
        run_dir = Path(result["log_dir"])
        assert run_dir in offline_runs and result["view_command"] == f"wandb sync {run_dir}"
        assert result["trajectory_path"] == str(run_dir / "files" / "head_importance.npz")
        assert result["checkpoint_path"] == str(run_dir / "checkpoints" / "last.ckpt")
        assert Path(result["checkpoint_path"]).is_file() and not Path(result["trajectory_path"]).is_symlink()
        assert result["tensorboard_command"] is None
    assert results[0]["log_dir"] != results[1]["log_dir"]
    assert Path(results[0]["trajectory_path"]).read_bytes() == first_npz
    assert not list(tmp_path.glob("head_importance*"))


def test_lightning_cli_config_trains_with_the_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")  # LightningCLI's own requirement; absent where only Lightning is installed
    # LightningCLI writes config.yaml into the log dir; run from tmp so nothing lands in the checkout.
    monkeypatch.chdir(tmp_path)
    load_example("lightning_cli").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "cli_config.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--model.img_size=32",
            "--data.image_size=32",
            "--data.num_train=32",
            "--data.num_val=16",
            "--data.batch_size=16",
        ]
    )
    run_dir = tmp_path / "runs" / "gmar_cli" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    trajectory = HeadTrajectory.load_npz(run_dir / "head_importance.npz")
    assert trajectory.epochs == [0] and tuple(trajectory.weights.shape) == (1, 4, 4)
    assert (run_dir / "head_importance.csv").is_file()
