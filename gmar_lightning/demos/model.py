"""A small, reusable LightningModule around a timm Vision Transformer.

[`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier] is what the examples, the ``gmar-lightning demo`` command
and the LightningCLI config train: a timm model created by name with
[`create_vit`][gmar_lightning.model_loading.create_vit] (with any constructor overrides such as ``img_size`` or
``depth``), cross-entropy, accuracy logged as ``val_acc`` and AdamW with a linear-warmup cosine schedule.
[`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] finds the ViT as its ``model`` attribute. Loading weights
files and the other models ``gmar-lightning explain`` takes lives in [`model_loading`][gmar_lightning.model_loading],
which imports no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from gmar_lightning.heads.pruning import restore_pruning_on_load
from gmar_lightning.input_recipe import INPUT_RECIPE_KEY, datamodule_recipe
from gmar_lightning.model_loading import create_vit

__all__ = ["ViTClassifier"]


class ViTClassifier(L.LightningModule):
    """Image classification with a timm Vision Transformer: cross-entropy, accuracy, AdamW, warmup + cosine.

    Batches are ``(images, labels)`` or ``(images, labels, masks)`` (masks are ignored). Logged metrics:
    ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc`` (epoch means). The learning rate rises linearly
    for ``warmup_fraction`` of the optimiser steps and then follows a cosine down to zero.

    Args:
        model_name: A timm model name.
        num_classes: Number of classes.
        img_size: Input side the model is built for; ``None`` keeps timm's default.
        pretrained: Start from timm hub weights (needs internet access).
        checkpoint_path: Start from a local weights file instead (a mismatching head is re-initialised).
        model_kwargs: More timm constructor overrides, e.g. ``{"patch_size": 8, "embed_dim": 96}``.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, norms, tokens and position embeddings).
        warmup_fraction: Fraction of the training steps spent warming up, in ``[0, 1)``.
        label_smoothing: Cross-entropy label smoothing, in ``[0, 1)``.

    Examples:
        >>> module = ViTClassifier("vit_tiny_patch16_224", num_classes=3, img_size=32,
        ...                        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4})
        >>> module(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 4,
        img_size: int | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be positive, got {lr!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must lie in [0, 1), got {warmup_fraction!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must lie in [0, 1), got {label_smoothing!r}.")
        self.save_hyperparameters()
        self.model = create_vit(model_name, num_classes, img_size, pretrained, checkpoint_path, model_kwargs)
        # Checkpoints of a model pruned by HeadPruning load into a fresh module (resume, load_from_checkpoint).
        restore_pruning_on_load(self)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The data module's input recipe, so `gmar-lightning explain --checkpoint` feeds images as training did; a
        # GMARCallback in the fit has already stored it, with its own display settings filling the gaps.
        recipe = datamodule_recipe(self.trainer)
        if INPUT_RECIPE_KEY not in checkpoint and not recipe.is_empty():
            checkpoint[INPUT_RECIPE_KEY] = recipe.to_dict()

    def _step(self, batch: tuple[Tensor, ...] | list[Tensor], stage: str) -> Tensor:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise TypeError(f"`batch` must be (images, labels) or (images, labels, masks), got {type(batch).__name__}.")
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        accuracy = self.train_accuracy if stage == "train" else self.val_accuracy
        accuracy(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=labels.shape[0])
        self.log(f"{stage}_acc", accuracy, prog_bar=True, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def training_step(self, batch: tuple[Tensor, ...] | list[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...] | list[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        # Decaying norms, biases, tokens and position embeddings hurts small ViTs; timm's convention skips them.
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            skip = parameter.ndim <= 1 or "token" in name or "pos_embed" in name
            (no_decay if skip else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_steps = int(self.hparams.warmup_fraction * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup_steps, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warmup to 1, then a cosine down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
