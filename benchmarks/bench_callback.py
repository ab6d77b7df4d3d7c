"""Cost of one GMARCallback evaluation (explain + render + log) against the explanation alone on the same probe batch.

Target: with 16 probe images and default logging (TensorBoard, the default ``methods=("gmar_l1", "grad_rollout")``
from one pass), the callback's total time per evaluation is at most 1.5x the time of that pass alone
(``explain_many`` of the same methods). Both are measured in one run as medians of interleaved repeats: the callback
inside real ``trainer.validate()`` calls (its ``on_validation_epoch_end`` is timed), ``explain_many`` directly on the
same model and probe.

Run: ``python benchmarks/bench_callback.py`` (ViT-S/16 at 224 px, random init); ``--model``/``--image-size`` to vary.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: the default spin-wait costs ~8 ms per parallel op on small shared VMs (see bench_engine.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from gmar_lightning import GMARCallback, explain_many


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


class TimedGMARCallback(GMARCallback):
    """GMARCallback that records how long each of its end-of-validation evaluations takes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds: list[float] = []

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        super().on_validation_epoch_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-probe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.image_size, num_classes=10)
    images = torch.randn(args.num_probe, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.num_probe,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.num_probe)
    module = Classifier(model)
    callback = TimedGMARCallback(num_probe=args.num_probe, on_error="raise")

    explain_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as log_root:
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=TensorBoardLogger(log_root, name="bench"),
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(module, loader, verbose=False)  # warm-up: takes the probe, first figures, TB writer
        explain_many(model, images, callback.methods)
        callback.seconds.clear()
        for _ in range(args.repeats):
            trainer.validate(module, loader, verbose=False)
            start = time.perf_counter()
            explain_many(model, images, callback.methods)
            explain_seconds.append(time.perf_counter() - start)

    callback_time, explain_time = statistics.median(callback.seconds), statistics.median(explain_seconds)
    print(
        f"model={args.model} image={args.image_size}px probe={args.num_probe} threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} torch={torch.__version__} timm={timm.__version__} "
        f"methods={','.join(callback.methods)}"
    )
    print(f"  time callback evaluation {callback_time:8.3f} s (median of {args.repeats})")
    print(f"  time explain alone       {explain_time:8.3f} s (median of {args.repeats})")
    ratio = callback_time / explain_time
    met = ratio <= 1.5
    print(f"RATIO callback evaluation / explain alone   {ratio:6.2f}  (target <= 1.5: {'met' if met else 'MISSED'})")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
