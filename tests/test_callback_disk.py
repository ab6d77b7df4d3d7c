"""GMARCallback on a nearly full disk: its output never takes the fit or Lightning's own logging down, and a disk that
was full for a while gets the trajectory files back. Real fits writing into a real 256 KB tmpfs (mounted as root;
skipped with the reason where mounting is not permitted), and the disk budget checked on the real file system."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmar_lightning import GMARCallback
from gmar_lightning.callback.sinks import (
    RESERVE_FRACTION,
    RESERVE_MAX_BYTES,
    DiskBudgetError,
    check_disk_budget,
    write_trajectory,
)
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the disk budget is still tested on the real file system below")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True, capture_output=True)


def val_loss_steps(log_dir: str) -> list[int]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars("val_loss")]


def fit_on(disk: Path, callbacks: list) -> tuple[pl.Trainer, TensorBoardLogger]:
    logger = TensorBoardLogger(str(disk), name="tb")
    trainer = pl.Trainer(
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        **trainer_kwargs(disk, max_epochs=3, log_every_n_steps=1),
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data())
    return trainer, logger


def test_a_256_kb_disk_completes_every_epoch_with_the_callback_as_without(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "bare") as disk:
        trainer, logger = fit_on(disk, [])
        bare_steps = val_loss_steps(logger.log_dir)
    assert trainer.current_epoch == 3 and len(bare_steps) == 3

    callback = GMARCallback(num_probe=4)
    with tmpfs(tmp_path / "gmar") as disk, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, logger = fit_on(disk, [callback])
        steps = val_loss_steps(logger.log_dir)
        trajectory = HeadTrajectory.load_npz(Path(logger.log_dir) / "head_importance.npz")
    assert trainer.current_epoch == 3 and steps == bare_steps  # Lightning's own logging is whole
    assert len(callback.trajectory) == 3 and trajectory.steps == callback.trajectory.steps  # the small files fit
    messages = [str(warning.message) for warning in caught if "GMARCallback" in str(warning.message)]
    assert len(messages) == 1 and "DiskBudgetError" in messages[0], messages  # once, not at every evaluation


class FullDiskForAWhile(pl.Callback):
    """Fills the disk with a ballast file before the validation of epoch 1 and frees it after the fit's last batch."""

    def __init__(self, disk: Path) -> None:
        self.ballast = disk / "ballast"

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1 and not trainer.sanity_checking:
            free = shutil.disk_usage(self.ballast.parent).free
            with self.ballast.open("wb") as handle, contextlib.suppress(OSError):
                handle.write(b"\0" * (free - 8192))  # all but a few blocks

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ballast.unlink(missing_ok=True)


def test_a_disk_full_for_a_while_gets_the_whole_trajectory_back_at_the_end_of_the_fit(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=2, per_head_histograms=False, save_dir=None)
    with tmpfs(tmp_path / "disk", size="4m") as disk, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        logger = TensorBoardLogger(str(disk), name="tb")
        trainer = pl.Trainer(
            callbacks=[FullDiskForAWhile(disk), callback],
            logger=logger,
            enable_checkpointing=False,
            **trainer_kwargs(disk, max_epochs=2),
        )
        pl.seed_everything(0, verbose=False)
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
        saved = HeadTrajectory.load_npz(Path(logger.log_dir) / "head_importance.npz")
    assert trainer.current_epoch == 2
    # val_loss's logging steps (one less than the global steps 3 and 6); the full epoch's row too, written at the end
    assert saved.steps == callback.trajectory.steps == [2, 5]


def test_the_disk_budget_refuses_what_would_eat_into_the_reserve_and_touches_nothing(tmp_path: Path) -> None:
    usage = shutil.disk_usage(tmp_path)
    reserve = min(RESERVE_MAX_BYTES, int(usage.total * RESERVE_FRACTION))
    check_disk_budget(tmp_path, 1024)
    with pytest.raises(DiskBudgetError, match=r"kept free for the trainer's own logs") as raised:
        check_disk_budget(tmp_path / "not" / "yet", usage.free - reserve + 2**20)
    assert raised.value.errno == 28  # ENOSPC, as a full disk reports it


def test_a_refused_trajectory_write_keeps_the_previous_pair(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        written = HeadTrajectory()
        written.append(0, 3, torch.full((2, 4), 0.25), torch.ones(2, 4))
        write_trajectory(written, disk)
        before = {path.name: path.read_bytes() for path in disk.iterdir()}
        free = shutil.disk_usage(disk).free
        (disk / "ballast").write_bytes(b"\0" * (free - 64 * 1024))  # what is left is inside the reserve
        written.append(1, 6, torch.full((2, 4), 0.25), torch.ones(2, 4))
        with pytest.raises(DiskBudgetError):
            write_trajectory(written, disk)
        (disk / "ballast").unlink()
        assert {path.name: path.read_bytes() for path in disk.iterdir()} == before
