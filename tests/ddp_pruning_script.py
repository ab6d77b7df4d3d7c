"""Run by test_ddp.py: a 2-process CPU DDP fit (gloo) with GMARCallback and HeadPruning; each rank saves its model."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmar_lightning import GMARCallback, HeadPruning
from tests.lightning_helpers import TinyViTModule, tiny_data


def main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    pruning = HeadPruning(amount=3, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=2)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        logger=TensorBoardLogger(out_dir, name="tb"),
        callbacks=[GMARCallback(num_probe=4), pruning],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    module = TinyViTModule()
    trainer.fit(module, datamodule=tiny_data(num_train=64, num_val=32, batch_size=8))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = module.eval()(images)
    rank = trainer.global_rank
    torch.save({"state_dict": module.state_dict(), "images": images, "logits": logits}, f"{out_dir}/rank{rank}.pt")
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    report = {
        "history": pruning.history,
        "optimizer_holds_the_model_parameters": optimized == {id(p) for p in module.parameters()},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
