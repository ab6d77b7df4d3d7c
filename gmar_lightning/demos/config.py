"""The settings of the demo job, [`DemoConfig`][gmar_lightning.demos.config.DemoConfig], and its default model.

They live apart from [`job`][gmar_lightning.demos.job] because they import no Lightning: the ``gmar-lightning``
parser builds the ``demo`` subcommand's options from them, and ``gmar-lightning explain`` or ``report`` must not pay
for importing Lightning (seconds) to build that parser. Only running the demo imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gmar_lightning.render import DEFAULT_ALPHA, DEFAULT_CMAP

__all__ = ["DEFAULT_IMG_SIZE", "DEFAULT_MODEL", "DEFAULT_MODEL_KWARGS", "LOGGERS", "DemoConfig"]

DEFAULT_MODEL = "vit_tiny_patch16_224"
"""The timm architecture behind the default model;
[`DEFAULT_MODEL_KWARGS`][gmar_lightning.demos.config.DEFAULT_MODEL_KWARGS] shrinks it."""

DEFAULT_MODEL_KWARGS: dict[str, Any] = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
"""Constructor overrides of the default model: 4 layers, 96 wide, 4 heads, patch 8."""

DEFAULT_IMG_SIZE = 64
"""The input side of the default model."""
LOGGERS = ("tensorboard", "wandb", "csv")
"""The loggers the demo can log to (``DemoConfig.logger``)."""


@dataclass
class DemoConfig:
    """Settings of [`run_demo`][gmar_lightning.demos.job.run_demo]; the command-line options map one to one onto these
    fields.

    Attributes:
        data_dir: An ``ImageFolder`` root with ``train/`` and ``val/`` subfolders; ``None`` trains on shapes.
        model: A timm model name; ``None`` is the small default ViT
            ([`DEFAULT_MODEL`][gmar_lightning.demos.config.DEFAULT_MODEL] with
            [`DEFAULT_MODEL_KWARGS`][gmar_lightning.demos.config.DEFAULT_MODEL_KWARGS]).
        model_kwargs: timm constructor overrides, merged over the defaults for the default model.
        img_size: Input side; ``None`` is 64 for the default model and the model's own size otherwise.
        checkpoint: A local weights file to start from (a head for another class count is re-initialised); a demo
            checkpoint of the same model (``checkpoints/last.ckpt``) resumes that run instead. One line says which.
        pretrained: Start from timm hub weights (needs internet access).
        epochs: Training epochs.
        batch_size: Images per batch.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_train_images: Training images (shapes: generated count, default 3000; ImageFolder: a seeded subset).
        max_val_images: Validation images (shapes: default 500).
        num_workers: DataLoader worker processes.
        logger: ``"tensorboard"``, ``"wandb"`` or ``"csv"``.
        log_dir: Root directory of the logs.
        accelerator: Passed to ``Trainer``.
        devices: Passed to ``Trainer`` (``"auto"``, a count or a list such as ``"0,1"``).
        strategy: Passed to ``Trainer``.
        precision: Passed to ``Trainer``, e.g. ``"bf16-mixed"``.
        methods: Explanation methods logged by the callback.
        num_probe: Validation images the callback explains at each evaluation.
        every_n_epochs: Explain every n-th epoch.
        cmap: Matplotlib colour map of the overlays.
        alpha: Weight of the map in blended overlays.
        mode: How the overlays draw maps: ``"blended"``, ``"masked"`` or ``"heat_map"``.
        outlier_percentile: Saturate each map's top percent before drawing it.
        target_acc: Stop once validation accuracy reaches this (the run says so); ``None`` trains every epoch.
        seed: Seed of the data, the model initialisation and the training order.
        progress_bar: Show Lightning's progress bar.
    """

    data_dir: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    epochs: int = 16
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    max_train_images: int | None = None
    max_val_images: int | None = None
    num_workers: int = 0
    logger: str = "tensorboard"
    log_dir: str = "runs"
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    precision: str | None = None
    methods: list[str] = field(default_factory=lambda: ["gmar_l1", "grad_rollout"])
    num_probe: int = 16
    every_n_epochs: int = 1
    cmap: str = DEFAULT_CMAP
    alpha: float = DEFAULT_ALPHA
    mode: str = "blended"
    outlier_percentile: float = 0.0
    target_acc: float | None = 0.9
    seed: int = 0
    progress_bar: bool = True
