"""Train with LightningCLI and a YAML config that adds GMARCallback through ``class_path``/``init_args``.

Examples::

    python examples/lightning_cli.py fit --config examples/cli_config.yaml
    python examples/lightning_cli.py fit --config examples/cli_config.yaml --trainer.max_epochs 3 --model.lr 0.001
    python examples/lightning_cli.py fit --print_config          # every option with its default

Any ``LightningModule``/``LightningDataModule`` pair works the same way; this one trains
:class:`gmar_lightning.demos.model.ViTClassifier` on :class:`gmar_lightning.demos.data.ShapesDataModule`.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning.pytorch.cli import ArgsType, LightningCLI

from gmar_lightning.demos.data import ShapesDataModule
from gmar_lightning.demos.model import ViTClassifier


def main(args: ArgsType = None) -> LightningCLI:
    """Run LightningCLI; ``args`` (a list of strings) replaces the command line, as in tests."""
    return LightningCLI(ViTClassifier, ShapesDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
