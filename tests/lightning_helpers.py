"""A tiny ViT classifier LightningModule and data for callback tests (32 px, patch 8, 2 blocks)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning.demos.data import ShapesDataModule


class TinyViTModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        logits = self(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training and a logged ``val_loss`` around the subclass's ``forward`` (images -> logits), as users
    write a fine-tuning module; subclasses build the model in ``__init__``."""

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def tiny_data(num_train: int = 48, num_val: int = 24, batch_size: int = 16) -> ShapesDataModule:
    return ShapesDataModule(num_train=num_train, num_val=num_val, image_size=32, batch_size=batch_size)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = {
        "default_root_dir": str(tmp_path),
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 1,
        "deterministic": True,
    }
    kwargs.update(overrides)
    return kwargs
