"""Run by test_ddp.py: a real 2-process CPU DDP fit (gloo) with GMARCallback; each rank reports what it saw."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmar_lightning import GMARCallback
from tests.lightning_helpers import TinyViTModule, tiny_data


def main(out_dir: str, all_ranks: bool) -> None:
    pl.seed_everything(0, verbose=False)
    callback = GMARCallback(num_probe=4, methods=("gmar_l1", "rollout"), explain_on_all_ranks=all_ranks or None)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=TensorBoardLogger(out_dir, name="tb"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    trainer.fit(TinyViTModule(), datamodule=tiny_data(num_train=64, num_val=32, batch_size=8))
    weights = torch.cat([p.detach().flatten() for p in trainer.lightning_module.parameters()])
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "trajectory_epochs": callback.trajectory.epochs,
        "head_weights": callback.trajectory.weights.double().flatten().tolist() if len(callback.trajectory) else [],
        "maps": {method: maps.flatten().tolist() for method, maps in callback.map_history.maps.items()},
        "has_probe": callback.probe is not None,
        "probe_images": None if callback.probe is None else callback.probe.images.double().flatten().tolist(),
        "weights_sum": float(weights.double().sum()),
        "weights_abs_sum": float(weights.double().abs().sum()),
        "log_dir": trainer.logger.log_dir if trainer.is_global_zero else None,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], all_ranks=len(sys.argv) > 2 and sys.argv[2] == "all_ranks")
