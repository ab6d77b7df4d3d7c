"""Speed of ``explain`` on a hierarchical model: Swin-T's windowed rollout against one plain training step.

Measured in one run, as medians of interleaved repeats (a noisy machine slows both sides alike): one training step
(forward + backward to the parameters, fused attention, train mode) and one batched ``explain(method="gmar_l1")``
(unfused attention, eval mode, the shifted-window and patch-merging token plan), on
``swin_tiny_patch4_window7_224`` at 224 px with a batch of 16, random init.

Run: ``python benchmarks/bench_swin.py`` (``--device cuda`` on a GPU; ``--repeats``, ``--batch``, ``--image-size``).
"""

from __future__ import annotations

import os

# Passive OpenMP waiting, as in bench_engine.py (spin-waiting measures the shared VM, not the code).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time

import timm
import torch
from bench_engine import build, operations, synchronize
from tqdm import tqdm

MODEL = "swin_tiny_patch4_window7_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"model={MODEL} batch={args.batch} image={args.image_size}px device={args.device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} timm={timm.__version__}"
    )
    model, images, labels = build(MODEL, args.batch, args.image_size, args.device)
    ops = {name: op for name, op in operations(model, images, labels).items() if name in ("train_step", "explain")}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for repeat in tqdm(range(args.repeats + 1), desc="repeats", unit="round"):
        for name, op in ops.items():  # interleaved; round 0 is the warm-up
            synchronize(args.device)
            start = time.perf_counter()
            op()
            synchronize(args.device)
            if repeat:
                samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    for name, seconds in times.items():
        print(f"  time {name:<11} {seconds:8.3f} s (median of {args.repeats})")
    print(f"RATIO explain time / train-step time {times['explain'] / times['train_step']:6.2f}")


if __name__ == "__main__":
    main()
