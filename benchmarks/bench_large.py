"""Memory arithmetic of explaining a large ViT against one training step of the same batch, from the model's layers.

Default: a ViT-L/14 (``vit_large_patch14_dinov2`` shape with a 1000-class head, random init) probe of 16 images at
518 px. The model is built on the meta device (no weights, no memory), its layers are probed as ``explain`` probes them,
and the engine's estimates are printed: the activations a training step keeps for its backward pass (the default
``memory_budget``), the recomputed path's forward, the materialised path's (every layer's attention kept), the query
rows per block and the micro-batch each path takes under that budget, beside this machine's memory.

Run: ``python benchmarks/bench_large.py`` (``--model``, ``--image-size``, ``--batch``, ``--budget-gib`` to vary).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from gmar_lightning import families, recompute
from gmar_lightning.engine import _micro_batch
from gmar_lightning.methods import METHOD_TABLE
from gmar_lightning.options import ExplainOptions

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_large_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, help="a memory_budget instead of the default (a training step)")
    args = parser.parse_args()
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
    budget = int(args.budget_gib * GIB) if args.budget_gib else training
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
    print(f"  memory_budget                                 {budget / GIB:8.1f} GiB")
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


if __name__ == "__main__":
    main()
