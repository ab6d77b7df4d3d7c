"""Moved to [`gmar_lightning.demos.model`][gmar_lightning.demos.model]; this alias keeps ``gmar_lightning.models``
imports working."""

from gmar_lightning.demos.model import ViTClassifier, checkpoint_model_settings, create_vit, load_weights

__all__ = ["ViTClassifier", "checkpoint_model_settings", "create_vit", "load_weights"]
