"""The demo: fine-tune a timm ViT with :class:`~gmar_lightning.GMARCallback` on synthetic shapes or an image folder.

- :mod:`~gmar_lightning.demos.job`: :func:`run_demo` and :class:`DemoConfig`, behind ``gmar-lightning demo``.
- :mod:`~gmar_lightning.demos.model`: :class:`ViTClassifier`, :func:`create_vit`, :func:`load_weights`.
- :mod:`~gmar_lightning.demos.data`: the synthetic :class:`ShapesDataset` with object masks and its data module.
- :mod:`~gmar_lightning.demos.image_folder`: :class:`ImageFolderDataModule` for ``train/`` and ``val/`` folders.
"""

from gmar_lightning.demos.data import ShapesDataModule, ShapesDataset
from gmar_lightning.demos.image_folder import ImageFolderDataModule
from gmar_lightning.demos.job import DemoConfig, run_demo
from gmar_lightning.demos.model import ViTClassifier, create_vit, load_weights

__all__ = [
    "DemoConfig",
    "ImageFolderDataModule",
    "ShapesDataModule",
    "ShapesDataset",
    "ViTClassifier",
    "create_vit",
    "load_weights",
    "run_demo",
]
