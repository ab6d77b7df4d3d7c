"""Memory arithmetic of explaining a large ViT against one training step of the same batch, from the model's layers.

Default: a ViT-L/14 (``vit_large_patch14_dinov2`` shape with a 1000-class head, random init) probe of 16 images at
518 px. The model is built on the meta device (no weights, no memory), its layers are probed as ``explain`` probes them,
and the engine's estimates are printed: the activations a training step keeps for its backward pass (the default
``memory_budget``), the recomputed path's forward, the materialised path's (every layer's attention kept), the query
rows per block and the micro-batch each path takes under that budget, beside this machine's memory.

With ``--measure`` it also runs the case on this CPU, each operation in a fresh process (peak resident set growth,
as ``bench_engine.py`` measures it): ``explain(gmar_l1)`` of the whole probe, and one training step at batches 1 and 2.
A training step of the whole probe does not fit this machine, so its peak is extrapolated from those two, linear in
the batch (activations grow with it, weights and their gradients do not), and printed as such.

Run: ``python benchmarks/bench_large.py`` (``--model``, ``--image-size``, ``--batch``, ``--budget-gib`` to vary;
``--measure`` to run it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from peak_memory import peak_bytes, run_fresh

from gmar_lightning import explain, families, recompute
from gmar_lightning.engine import _free_memory, _memory_budget, _micro_batch
from gmar_lightning.methods import METHOD_TABLE
from gmar_lightning.options import ExplainOptions

GIB = 2**30
TRAINING_BATCHES = (1, 2)


def peak_of(args: argparse.Namespace) -> dict[str, float]:
    """In this (fresh) process: the peak extra bytes and seconds of one training step or one explain call."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.image_size, num_classes=1000)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch,))
    budget = int(args.budget_gib * GIB) if args.budget_gib else None

    def train_step() -> None:
        model.train()
        F.cross_entropy(model(images), labels).backward()

    def explain_probe() -> None:
        explain(model.eval(), images, method="gmar_l1", memory_budget=budget)

    start = time.perf_counter()
    peak = peak_bytes(train_step if args.peak_of == "train_step" else explain_probe, torch.device("cpu"))
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start}


def measured(args: argparse.Namespace, operation: str, batch: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--model", args.model, "--image-size", str(args.image_size)]
    command += ["--batch", str(batch), "--peak-of", operation]
    if args.budget_gib:
        command += ["--budget-gib", str(args.budget_gib)]
    return run_fresh(command)


def measure(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    explained = measured(args, "explain", args.batch)
    steps = {batch: measured(args, "train_step", batch) for batch in TRAINING_BATCHES}
    (small, small_step), (large, large_step) = steps.items()
    per_image = (large_step["peak_bytes"] - small_step["peak_bytes"]) / (large - small)
    fixed = small_step["peak_bytes"] - small * per_image
    training = fixed + args.batch * per_image
    print(f"MEASURED on this CPU, fresh process per operation (load average {load:.1f} -> {os.getloadavg()[0]:.1f})")
    for batch, step in steps.items():
        peak, seconds = step["peak_bytes"] / GIB, step["seconds"]
        print(f"  training step, batch {batch:2d}                    {peak:8.2f} GiB  {seconds:7.1f} s")
    print(f"  training step, batch {args.batch:2d} (extrapolated)       {training / GIB:8.2f} GiB")
    print(
        f"  explain(gmar_l1), batch {args.batch:2d}                 {explained['peak_bytes'] / GIB:8.2f} GiB  "
        f"{explained['seconds']:7.1f} s"
    )
    print(f"RATIO measured explain peak / training-step peak  {explained['peak_bytes'] / training:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_large_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--budget-gib", type=float, help="a memory_budget instead of the default (a training step, at most available)"
    )
    parser.add_argument("--measure", action="store_true", help="also run explain and training steps on this CPU")
    parser.add_argument("--peak-of", choices=["train_step", "explain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print(json.dumps(peak_of(args)))
        return
    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False, img_size=args.image_size, num_classes=1000)
    size = (args.image_size, args.image_size)
    probe = families.probe(model, size)
    estimate = recompute.per_image_bytes(probe)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    module = probe.layers[0][0].module
    tokens = probe.plan.attention_steps[0].mixing.num_tokens
    batch = args.batch
    training = estimate.training * batch
    # The budget explain would take on this CPU: the option or a training step, capped by the available memory.
    options = ExplainOptions(memory_budget=int(args.budget_gib * GIB) if args.budget_gib else None)
    budget = _memory_budget(probe, batch, options, torch.device("cpu"))
    recomputed = recompute.applies(probe, METHOD_TABLE["gmar_l1"], ExplainOptions())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    print(
        f"model={args.model} image={args.image_size}px batch={batch} layers={len(probe.layers)} tokens={tokens} "
        f"heads={module.num_heads} head_dim={module.head_dim} parameters={parameters / 1e6:.0f}M"
    )
    print(f"  this machine's memory                         {memory / GIB:8.1f} GiB")
    grads = 4 * parameters / GIB
    print(f"  training step: 17 activations x B x N x D x L {training / GIB:8.1f} GiB (+ {grads:.1f} GiB grads)")
    print(f"  recomputed explain forward: 10 activations    {estimate.recomputed * batch / GIB:8.1f} GiB")
    print(f"  materialised explain: 10 activations + B H N^2 {estimate.materialised * batch / GIB:8.1f} GiB")
    available = _free_memory(torch.device("cpu")) or 0
    print(f"  memory_budget (at most available {available / GIB:.1f} GiB)   {budget / GIB:8.1f} GiB")
    step = _micro_batch(probe, batch, budget, recomputed)
    left = max(budget - step * estimate.recomputed, 1)
    block = recompute.block_shape(left, step, module.num_heads, tokens, block=recompute.CPU_BLOCK_ELEMENTS)
    print(
        f"  recomputed path (timm ViT attention: {recomputed}): {step} images per pass, blocks of {block.images} "
        f"image(s) x {block.rows} query rows"
    )
    step_materialised = _micro_batch(probe, batch, budget, False)
    print(f"  materialised path: {step_materialised} images per pass")
    ratio = estimate.recomputed * step / training
    print(f"RATIO estimated explain forward / training step   {ratio:.2f}")
    if args.measure:
        measure(args)


if __name__ == "__main__":
    main()
