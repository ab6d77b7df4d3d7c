"""Fine-tune a timm ViT with GMARCallback and watch its attention heads specialise in TensorBoard.

By default this trains a small ViT (4 layers, 96 wide, 4 heads, patch 8, 64 px) from scratch on the synthetic
shapes dataset; it stops once validation accuracy reaches 0.9, about three minutes on 2 CPU cores. Examples::

    python examples/finetune_vit.py
    python examples/finetune_vit.py --methods gmar_l1,rollout --epochs 20 --logger csv
    python examples/finetune_vit.py --data-dir /data/pets --model vit_small_patch16_224 --checkpoint vit_s.pth

Run ``python examples/finetune_vit.py --help`` for every option; ``gmar-lightning demo`` runs the same job.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs, slowing training many
# times over; passive waiting changes no result. libgomp reads this once, when torch loads it, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from typing import Any

from gmar_lightning.cli import add_demo_arguments, config_from_args
from gmar_lightning.demos.job import run_demo


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, train, and return ``{"val_acc", "log_dir", "trajectory_path", ...}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_arguments(parser)
    return run_demo(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"finetune_vit.py: error: {error}", file=sys.stderr)
        sys.exit(2)
