"""Moved to [`gmar_lightning.demos`][gmar_lightning.demos] (the job, its model and data) and
[`gmar_lightning.cli`][gmar_lightning.cli] (the argparse helpers); this alias keeps ``gmar_lightning.demo`` imports
working."""

from gmar_lightning._checks import parse_methods
from gmar_lightning.cli import add_demo_arguments, add_model_arguments, config_from_args, positive_int
from gmar_lightning.demos.image_folder import ImageFolderDataModule
from gmar_lightning.demos.job import DEFAULT_MODEL, DEFAULT_MODEL_KWARGS, DemoConfig, run_demo

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_KWARGS",
    "DemoConfig",
    "ImageFolderDataModule",
    "add_demo_arguments",
    "add_model_arguments",
    "config_from_args",
    "parse_methods",
    "positive_int",
    "run_demo",
]
