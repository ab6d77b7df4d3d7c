"""Swin Transformer v1, v2 and v2-cr: attention inside shifted windows, patch merging between stages.

Each block's windows are mapped back to the tokens of its stage's grid, including the cyclic shift and the padding
to whole windows; each merged token averages its 2x2 children. The classifier averages the last stage's tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gmar_lightning.capture import TIMM_ADAPTER, AttentionLayer
from gmar_lightning.families import Probe, require_pooling
from gmar_lightning.families.grids import merge_map, window_mixing
from gmar_lightning.mixing import AttentionStep, TokenMap, TokenPlan
from gmar_lightning.tokens import TokenLayout, patch_grid


def _swin_classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    return SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr


def matches(model: nn.Module) -> bool:
    return isinstance(model, _swin_classes())


def check(model: nn.Module) -> None:
    """Only average pooling over the last stage has a linear read-out."""
    require_pooling(model, getattr(getattr(model.head, "global_pool", None), "pool_type", None), ("avg",))


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    stages = model.layers if hasattr(model, "layers") else model.stages
    stage_name = "layers" if hasattr(model, "layers") else "stages"
    grid = patch_grid(model, image_size)
    first_grid = grid
    steps: list[AttentionStep | TokenMap] = []
    layers, names = [], []
    for index, stage in stages.named_children():
        if not isinstance(stage.downsample, nn.Identity):
            steps.append(merge_map(grid))
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        for block_index, block in stage.blocks.named_children():
            name = f"{stage_name}.{index}.blocks.{block_index}.attn"
            layers.append([AttentionLayer(name, block.attn, TIMM_ADAPTER)])
            names.append(name)
            mixing = window_mixing(grid, tuple(block.window_size), tuple(block.shift_size))
            steps.append(AttentionStep(len(layers) - 1, mixing))
    num_tokens = grid[0] * grid[1]
    readout = torch.full((num_tokens,), 1.0 / num_tokens)
    return Probe(layers, names, TokenPlan(tuple(steps), readout, 0, first_grid))
