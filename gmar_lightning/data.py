"""Moved to [`gmar_lightning.demos.data`][gmar_lightning.demos.data]; this alias keeps ``gmar_lightning.data`` imports
working."""

from gmar_lightning.demos.data import SHAPES, ShapesDataModule, ShapesDataset, denormalize, make_loader

__all__ = ["SHAPES", "ShapesDataModule", "ShapesDataset", "denormalize", "make_loader"]
