"""Speed and memory of ``explain`` against one plain training step, as ratios measured in one run.

Targets (ViT-S/16 shape, random init, batch 16, 224 px):

* ``explain(gmar_l1)`` time <= 0.75x one training step (forward + backward to parameters, fused attention);
* batched ``explain`` >= 10x faster than a per-image loop on a GPU (reported, with no target, on CPU, where a batch
  of our own per-image calls does the same arithmetic; ``bench_anchors.py`` compares with what users would run);
* peak memory of ``explain`` <= 1.0x the training step's.

Times are medians of interleaved repeats, so a noisy machine slows both sides alike. Peak memory is measured in a fresh
subprocess per operation: on CUDA with ``torch.cuda.max_memory_allocated``, on CPU as the growth of the process's peak
resident set (``VmHWM``, reset just before) over the state with model and batch loaded.

Run: ``python benchmarks/bench_engine.py`` (``--device cuda`` on a GPU; ``--model``/``--batch``/``--repeats`` to vary;
``--json PATH`` writes the numbers).
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs about 8 ms per parallel op on small shared VMs (2 vCPUs): that measures the
# VM, not the code, and halves the speed of both sides. Passive waiting is set before torch loads; override by
# exporting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from peak_memory import peak_bytes

from gmar_lightning import explain


def build(
    model_name: str, batch: int, image_size: int, device: str
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=image_size).to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    return model, images, labels


def operations(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], None]]:
    def train_step() -> None:
        model.train()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def explain_batched() -> None:
        explain(model, images, method="gmar_l1")

    def explain_loop() -> None:
        for index in range(images.shape[0]):
            explain(model, images[index : index + 1], method="gmar_l1")

    return {"train_step": train_step, "explain": explain_batched, "explain_per_image": explain_loop}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_operations(args: argparse.Namespace) -> dict[str, float]:
    model, images, labels = build(args.model, args.batch, args.image_size, args.device)
    ops = operations(model, images, labels)
    for op in ops.values():  # warm-up: allocator, kernels, lazy init
        op()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.repeats):
        for name, op in ops.items():  # interleaved, so load changes hit every operation alike
            synchronize(args.device)
            start = time.perf_counter()
            op()
            synchronize(args.device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_of(args: argparse.Namespace, name: str) -> int:
    """Run one operation in this process (called in a fresh subprocess) and return its peak extra bytes."""
    model, images, labels = build(args.model, args.batch, args.image_size, args.device)
    op = operations(model, images, labels)[name]
    return peak_bytes(op, torch.device(args.device))


def measure_memory(args: argparse.Namespace, name: str) -> int:
    command = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--batch", str(args.batch)]
    command += ["--image-size", str(args.image_size), "--device", args.device]
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so RSS follows live tensors.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the times, peaks and ratios here")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory_of(args, args.memory_of)}))
        return

    print(
        f"model={args.model} batch={args.batch} image={args.image_size}px device={args.device} "
        f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
        f"torch={torch.__version__} timm={timm.__version__}"
    )
    times = time_operations(args)
    for name, seconds in times.items():
        print(f"  time {name:<18} {seconds:8.3f} s (median of {args.repeats})")
    train_peak, explain_peak = measure_memory(args, "train_step"), measure_memory(args, "explain")
    print(f"  peak train_step {train_peak / 2**20:10.1f} MiB")
    print(f"  peak explain    {explain_peak / 2**20:10.1f} MiB")

    loop_target = 10.0 if args.device.startswith("cuda") else None
    ratios = [
        ("explain time / train-step time", times["explain"] / times["train_step"], "<=", 0.75),
        ("per-image loop time / batched time", times["explain_per_image"] / times["explain"], ">=", loop_target),
        ("explain peak memory / train-step peak", explain_peak / train_peak, "<=", 1.0),
    ]
    failures = 0
    for label, value, relation, target in ratios:
        if target is None:
            print(f"RATIO {label:<40} {value:6.2f}  (no target on this device)")
            continue
        met = value <= target if relation == "<=" else value >= target
        failures += not met
        print(f"RATIO {label:<40} {value:6.2f}  (target {relation} {target}: {'met' if met else 'MISSED'})")
    if args.json:
        peaks = {"train_step": train_peak, "explain": explain_peak}
        results = [
            {"label": label, "value": value, "relation": rel, "target": target} for label, value, rel, target in ratios
        ]
        args.json.write_text(json.dumps({"times": times, "peaks": peaks, "ratios": results}, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
