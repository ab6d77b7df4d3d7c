"""A Lightning data module over ``train/`` and ``val/`` ``ImageFolder`` splits, for fine-tuning on your own images."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from gmar_lightning.demos.data import make_loader
from gmar_lightning.input_recipe import InputRecipe

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(L.LightningDataModule):
    """``train/`` and ``val/`` ``ImageFolder`` splits resized to the model's input and normalised with its stats.

    Training images get a random resized crop and horizontal flip; validation images are only resized.

    Args:
        data_dir: Root holding ``train/<class>/*`` and ``val/<class>/*``.
        img_size: Side the images are resized to.
        mean: Per-channel normalisation mean (the model's timm data config).
        std: Per-channel normalisation std.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        max_train_images: Keep a seeded random subset of this many training images.
        max_val_images: Keep the first this many validation images (in a seeded random order).
        seed: Seed of the subsets.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 64,
        num_workers: int = 0,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        root = Path(data_dir)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"`--data-dir` {str(root)!r} has no {split}/ folder; lay images out as {split}/<class>/<image>."
                )
        normalize = transforms.Normalize(mean, std)
        train_transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(img_size, scale=(0.6, 1.0), antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        val_transform = transforms.Compose(
            [transforms.Resize((img_size, img_size), antialias=True), transforms.ToTensor(), normalize]
        )
        train = ImageFolder(str(root / "train"), transform=train_transform)
        val = ImageFolder(str(root / "val"), transform=val_transform)
        if train.classes != val.classes:
            raise ValueError(
                f"`--data-dir` train/ and val/ must hold the same class folders, got {train.classes} and {val.classes}."
            )
        self.classes: list[str] = list(train.classes)
        self.input_recipe = InputRecipe(
            img_size=img_size,
            mean=mean,
            std=std,
            resize="squash",
            interpolation="bilinear",
            class_names=tuple(train.classes),
        )
        """The validation transform: both sides resized to ``img_size``, normalised with ``mean`` and ``std``."""
        self.train_dataset = _subset(train, max_train_images, seed)
        self.val_dataset = _subset(val, max_val_images, seed)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader[tuple[Tensor, int]]:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, int]]:
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(self, dataset: Dataset[tuple[Tensor, int]], shuffle: bool) -> DataLoader[tuple[Tensor, int]]:
        return make_loader(dataset, self.batch_size, shuffle, self.num_workers)


def _subset(dataset: Dataset[tuple[Tensor, int]], limit: int | None, seed: int) -> Dataset[tuple[Tensor, int]]:
    size = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= size:
        return dataset
    # A seeded random subset, so a small limit still covers every class.
    indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(indices.tolist()))
