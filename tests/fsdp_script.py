"""Run by test_sharded.py under ``torchrun --nproc_per_node 2``: the engine on an FSDP2-sharded ViT (``fully_shard``,
gloo on CPU), every rank explaining the same batch in lockstep, against the same model unsharded."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmar_lightning import METHODS, explain
from tests.models import make_images, make_model


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, images = make_model("vit"), make_images("vit", batch=3)  # seeded: the same on every rank
    options = [
        {"recompute_attention": True},
        {"recompute_attention": False},
        {"head_norm": "global", "memory_budget": 1},
    ]
    unsharded = [explain(model, images, method=method, **kw) for method in METHODS for kw in options]
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    sharded = [explain(model, images, method=method, **kw) for method in METHODS for kw in options]
    differences = {
        f"{result.method} {kw}": {
            "maps": float((result.token_maps - reference.token_maps).abs().max()),
            "logits": float((result.logits - reference.logits).abs().max()),
            "weights": None
            if reference.head_weights is None
            else float((result.head_weights - reference.head_weights).abs().max()),
        }
        for result, reference, kw in zip(sharded, unsharded, options * len(METHODS), strict=True)
    }
    # Every parameter is sharded again after the calls (a DTensor holding about half of it on each rank).
    gathered = [name for name, parameter in model.named_parameters() if not hasattr(parameter, "to_local")]
    local = sum(parameter.to_local().numel() for parameter in model.parameters() if hasattr(parameter, "to_local"))
    full = sum(parameter.numel() for parameter in model.parameters())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"differences": differences, "gathered": gathered, "local": local, "full": full}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
