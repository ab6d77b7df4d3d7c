"""PiT (pooling-based ViT): stages of global self-attention over ``[class token(s), patch grid]``, pooled between.

Between stages a depthwise strided convolution pools the patch grid (each pooled token averages the tokens under its
kernel) and a linear layer carries the class (and distillation) token over to the next stage, token to itself.
"""

from __future__ import annotations

import torch
from torch import nn

from gmar_lightning.capture import TIMM_ADAPTER, AttentionLayer
from gmar_lightning.families import Probe, require_pooling
from gmar_lightning.families.grids import conv_map, conv_output, global_mixing
from gmar_lightning.mixing import AttentionStep, TokenMap, TokenPlan
from gmar_lightning.tokens import TokenLayout


def matches(model: nn.Module) -> bool:
    from timm.models.pit import PoolingVisionTransformer

    return isinstance(model, PoolingVisionTransformer)


def check(model: nn.Module) -> None:
    """The classifier reads the class token (and, distilled, the mean of class and distillation heads)."""
    require_pooling(model, model.global_pool, ("token",))


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    num_prefix = int(model.cls_token.shape[1])  # 2 when distilled
    grid = first_grid = conv_output(image_size, model.patch_embed.conv)
    steps: list[AttentionStep | TokenMap] = []
    layers = []
    for stage_index, stage in enumerate(model.transformers):
        if stage.pool is not None:
            token_map, grid = conv_map(grid, stage.pool.conv, num_prefix_tokens=num_prefix)
            steps.append(token_map)
        for block_index, block in enumerate(stage.blocks):
            layers.append(
                [AttentionLayer(f"transformers.{stage_index}.blocks.{block_index}.attn", block.attn, TIMM_ADAPTER)]
            )
            steps.append(AttentionStep(len(layers) - 1, global_mixing(num_prefix + grid[0] * grid[1])))
    readout = torch.zeros(num_prefix + grid[0] * grid[1])
    readout[:num_prefix] = 1.0 / num_prefix  # distilled PiT averages its class and distillation heads
    names = [layer[0].name for layer in layers]
    return Probe(layers, names, TokenPlan(tuple(steps), readout, num_prefix, first_grid))
