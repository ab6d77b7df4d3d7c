"""GMARCallback keeps one trajectory row per validation and never loses a row: gradient accumulation with mid-epoch
validation, every-n-epoch validation, and a fit killed with SIGKILL after a checkpoint and resumed. Real fits of a
tiny ViT on CPU; the steps are read back from TensorBoard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmar_lightning import GMARCallback
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def scalar_steps(log_dir: str | Path, tag: str) -> list[int]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


class ValidationSteps(pl.Callback):
    """Records ``trainer.global_step`` at the end of every fit-time validation after the sanity check."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("every_n", [1, 2])
@pytest.mark.parametrize("interval", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_one_row_per_validation_at_val_losss_steps(
    tmp_path: Path, accumulate: int, interval: float, every_n: int
) -> None:
    callback = GMARCallback(num_probe=2, max_images=2, per_head_histograms=False)
    validations = ValidationSteps()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        callbacks=[callback, validations],
        logger=logger,
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            accumulate_grad_batches=accumulate,
            val_check_interval=interval,
            check_val_every_n_epoch=every_n,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        ),
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data(num_train=32, num_val=4, batch_size=4))

    val_steps = scalar_steps(logger.log_dir, "val_loss")
    assert len(val_steps) == len(validations.steps) > 0
    assert callback.trajectory.validations == list(range(len(val_steps)))
    # One step convention (issue 21): rows are keyed by the step val_loss is logged at, not trainer.global_step.
    assert callback.trajectory.steps == val_steps
    assert scalar_steps(logger.log_dir, "gmar/entropy/layer_00") == val_steps


# A fit that checkpoints every 4 steps, before the validation at that step (ModelCheckpoint saves at the end of the
# training batch), into a fixed TensorBoard folder; with KILL_AT_STEP it SIGKILLs itself right after the validation at
# that step has written its row, the moment a preemption loses the most.
PREEMPTED_FIT = """
import os, signal, sys
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from gmar_lightning import GMARCallback
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

root, max_epochs, kill_at, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume"

class KillAfterValidation(pl.Callback):
    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == kill_at and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

checkpoint = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=4, save_last=True)
trainer = pl.Trainer(
    callbacks=[GMARCallback(num_probe=2, per_head_histograms=False), KillAfterValidation(), checkpoint],
    logger=TensorBoardLogger(root, name="tb", version=0),
    **trainer_kwargs(root, max_epochs=max_epochs, num_sanity_val_steps=0),
)
pl.seed_everything(0, verbose=False)
trainer.fit(TinyViTModule(), datamodule=tiny_data(num_train=32, num_val=4, batch_size=8),
            ckpt_path=os.path.join(root, "ckpt", "last.ckpt") if resume else None)
"""


def run_fit(root: Path, max_epochs: int, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    arguments = [str(root), str(max_epochs), str(kill_at), "resume" if resume else ""]
    command = [sys.executable, "-c", PREEMPTED_FIT, *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_a_resume_after_sigkill_keeps_every_row_written_before_the_kill(tmp_path: Path) -> None:
    killed = run_fit(tmp_path, max_epochs=6, kill_at=12, resume=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "tb" / "version_0"
    before = HeadTrajectory.load_npz(run_dir / "head_importance.npz")
    # Rows carry val_loss's logging step, one less than the global step each validation follows: the checkpoint at
    # global step 12 was saved before the validation logged at step 11.
    assert before.steps == [3, 7, 11]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 12
    events_before = sorted(path.name for path in run_dir.glob("events.out.tfevents.*"))

    resumed = run_fit(tmp_path, max_epochs=6, kill_at=-1, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = HeadTrajectory.load_npz(run_dir / "head_importance.npz")
    assert after.steps == [3, 7, 11, 15, 19, 23]
    assert after.validations == list(range(6))
    assert torch.equal(after.weights[:3], before.weights)
    assert set(events_before) <= {path.name for path in run_dir.glob("events.out.tfevents.*")}  # nothing deleted
    # TensorBoard and the files tell the same story: one GMAR point per row, at val_loss's steps.
    assert sorted(set(scalar_steps(run_dir, "gmar/entropy/layer_00"))) == sorted(set(scalar_steps(run_dir, "val_loss")))
    assert len(set(scalar_steps(run_dir, "gmar/entropy/layer_00"))) == len(after)
