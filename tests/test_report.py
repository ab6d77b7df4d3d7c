"""The HTML run report, built through ``gmar-lightning report`` from files a run wrote."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image

from gmar_lightning import GMARCallback
from gmar_lightning.callback.records import EvaluationRecord
from gmar_lightning.callback.sinks import FileSink
from gmar_lightning.cli import main
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs


def _run_dir_with_trajectory(root: Path, epochs: int = 3) -> Path:
    run_dir = root / "run"
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        weights = torch.rand(2, 4, generator=generator).softmax(dim=-1)
        trajectory.append(epoch, 10 * (epoch + 1), weights, weights * 3)
    trajectory.save_npz(run_dir / "head_importance.npz")
    return run_dir


def test_report_writes_plots_and_a_self_contained_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir_with_trajectory(tmp_path)
    # What a CSV-logged run holds: the logger's hparams.yaml and metrics.csv, and a FileSink's overlay PNGs.
    (run_dir / "hparams.yaml").write_text("model_name: vit_tiny_patch16_224\nlr: 0.001\n")
    (run_dir / "metrics.csv").write_text("epoch,step,train_loss,val_acc\n0,9,1.2,\n0,9,,0.5\n1,19,,0.875\n2,29,,0.75\n")
    sink = FileSink(run_dir / "gmar")
    for step in (10, 20, 30):
        # The callback logs two probe images per overlay image; the report shows each method's first page.
        images = {
            "gmar/overlay/gmar_l1": torch.rand(3, 16, 16),
            "gmar/overlay/gmar_l1/images_3-4": torch.rand(3, 16, 16),
            "gmar/evolution/gmar_l1": torch.rand(3, 8, 16),
            "gmar/evolution/gmar_l1/images_3-4": torch.rand(3, 8, 16),
        }
        sink.log_evaluation(EvaluationRecord(step, 2, images=images))
    assert main(["report", str(run_dir)]) == 0
    assert "(overlays of 1 method)" in capsys.readouterr().out

    report_dir = run_dir / "report"
    for name in ("head_importance.png", "trajectory.png", "specialisation.png"):
        with Image.open(report_dir / name) as plot:
            assert plot.format == "PNG" and min(plot.size) > 100
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    # 3 plots, the first and the latest overlays, the latest evolution figure
    assert page.count('src="data:image/png;base64,') == 6
    assert "gmar/gmar_evolution_gmar_l1.png at step 30" in page
    assert "gmar/gmar_overlay_gmar_l1.png" in page and "images_3-4" not in page
    assert "first evaluation (step 10)" in page and "latest evaluation (step 30)" in page
    assert "<strong>0.750</strong> at the end (best 0.875)" in page
    assert "<td>model_name</td><td><code>vit_tiny_patch16_224</code></td>" in page
    assert "blocks.1.attn" in page and "epoch 2" in page.lower()
    # Self-contained: no image or script is fetched from anywhere.
    assert 'src="http' not in page and 'href="http' not in page and 'src="file' not in page


def test_report_accepts_the_npz_file_and_an_output_folder(tmp_path: Path) -> None:
    run_dir = _run_dir_with_trajectory(tmp_path, epochs=1)
    output = tmp_path / "elsewhere"
    assert main(["report", str(run_dir / "head_importance.npz"), "--output", str(output), "--title", "My run"]) == 0
    assert "<title>My run</title>" in (output / "report.html").read_text(encoding="utf-8")
    assert not (run_dir / "report").exists()


def test_report_follows_no_link_out_of_the_run_folder(tmp_path: Path) -> None:
    run_dir = _run_dir_with_trajectory(tmp_path)
    FileSink(run_dir / "gmar").log_evaluation(
        EvaluationRecord(10, 0, images={"gmar/overlay/gmar_l1": torch.rand(3, 16, 16)})
    )
    secret = tmp_path / "private" / "holiday.png"
    secret.parent.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(secret)
    (run_dir / "gmar" / "step_000020").mkdir()
    (run_dir / "gmar" / "step_000020" / "gmar_overlay_gmar_l1.png").symlink_to(secret)
    (run_dir / "hparams.yaml").symlink_to(tmp_path / "private" / "secrets.yaml")
    (tmp_path / "private" / "secrets.yaml").write_text("api_key: hunter2\n")
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "report.html").read_text(encoding="utf-8")
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "latest evaluation (step 10)" in page and "step 20" not in page
    assert "hunter2" not in page


def _fit(tmp_path: Path, logger: Logger, num_train: int = 48) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[GMARCallback(num_probe=4)], logger=logger, **trainer_kwargs(tmp_path))
    trainer.fit(TinyViTModule(), datamodule=tiny_data(num_train=num_train))


def _assert_reads_the_run(page: str, title: str) -> None:
    assert f"<title>{title}</title>" in page
    assert "first evaluation (step " in page and "latest evaluation (step " in page  # the overlays
    assert "gmar/overlay/gmar_l1" in page or "gmar_overlay_gmar_l1.png" in page
    assert re.search(r"Validation accuracy: <strong>\d\.\d{3}</strong> at the end", page)


@pytest.mark.integration
def test_report_reads_a_wandb_run_like_a_tensorboard_run(
    tmp_path: Path, offline_wandb: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="gmar-test", name="shapes")
    _fit(tmp_path, logger, num_train=32)
    files_dir, run_id = Path(logger.experiment.dir), logger.experiment.id
    offline_wandb.finish()
    assert main(["report", str(files_dir)]) == 0
    assert "(overlays of 2 methods)" in capsys.readouterr().out  # the default gmar_l1 and grad_rollout
    page = (files_dir / "report" / "report.html").read_text(encoding="utf-8")
    _assert_reads_the_run(page, f"GMAR report: shapes (W&amp;B run {run_id})")
    # The trainer's steps, at which Lightning logged val_acc too (2 batches an epoch), not W&B's row counter (0, 2).
    steps = [int(step) for step in re.findall(r"evaluation \(step (\d+)\)</figcaption>", page)]
    assert steps == [1, 3] * 2  # the first and the latest evaluation of each method


@pytest.mark.integration
def test_report_reads_an_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to its file store
    logger = MLFlowLogger(experiment_name="gmar-test", run_name="shapes", save_dir=str(tmp_path / "mlruns"))
    _fit(tmp_path, logger)
    logger.finalize("success")
    artifacts = tmp_path / "mlruns" / logger.experiment_id / logger.run_id / "artifacts"
    assert main(["report", str(artifacts)]) == 0
    page = (artifacts / "report" / "report.html").read_text(encoding="utf-8")
    _assert_reads_the_run(page, f"GMAR report: shapes (MLflow run {logger.run_id})")


@pytest.mark.integration
def test_report_reads_a_csv_run(tmp_path: Path) -> None:
    _fit(tmp_path, CSVLogger(tmp_path / "logs", name="shapes"))
    assert main(["report", str(tmp_path / "logs" / "shapes" / "version_0")]) == 0
    page = (tmp_path / "logs" / "shapes" / "version_0" / "report" / "report.html").read_text(encoding="utf-8")
    _assert_reads_the_run(page, "GMAR report: shapes/version_0")
