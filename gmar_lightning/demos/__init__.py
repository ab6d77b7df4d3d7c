"""The demo: fine-tune a timm ViT with [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] on synthetic shapes
or an image folder.

- [`job`][gmar_lightning.demos.job]: [`run_demo`][gmar_lightning.demos.job.run_demo], behind
  ``gmar-lightning demo``.
- [`config`][gmar_lightning.demos.config]: its settings, [`DemoConfig`][gmar_lightning.demos.config.DemoConfig], and
  the default model.
- [`model`][gmar_lightning.demos.model]: [`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier].
- [`data`][gmar_lightning.demos.data]: the synthetic [`ShapesDataset`][gmar_lightning.demos.data.ShapesDataset] with
  object masks and its data module.
- [`image_folder`][gmar_lightning.demos.image_folder]:
  [`ImageFolderDataModule`][gmar_lightning.demos.image_folder.ImageFolderDataModule] for ``train/`` and ``val/``
  folders.

Import from the modules: this package imports none of them, so that
[`config`][gmar_lightning.demos.config] loads without Lightning (the ``gmar-lightning`` parser reads it for every
command, and only the demo needs Lightning).
"""
