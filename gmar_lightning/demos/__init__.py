"""The demo: fine-tune a timm ViT with [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] on synthetic shapes
or an image folder.

- [`job`][gmar_lightning.demos.job]: [`run_demo`][gmar_lightning.demos.job.run_demo] and
  [`DemoConfig`][gmar_lightning.demos.job.DemoConfig], behind ``gmar-lightning demo``.
- [`model`][gmar_lightning.demos.model]: [`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier],
  [`create_vit`][gmar_lightning.demos.model.create_vit], [`load_weights`][gmar_lightning.demos.model.load_weights].
- [`data`][gmar_lightning.demos.data]: the synthetic [`ShapesDataset`][gmar_lightning.demos.data.ShapesDataset] with
  object masks and its data module.
- [`image_folder`][gmar_lightning.demos.image_folder]:
  [`ImageFolderDataModule`][gmar_lightning.demos.image_folder.ImageFolderDataModule] for ``train/`` and ``val/``
  folders.
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
