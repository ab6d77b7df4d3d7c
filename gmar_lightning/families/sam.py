"""SAM-style ViTs (timm ``VisionTransformerSAM``): windowed blocks interleaved with global blocks on one patch grid.

A windowed block pads the grid at the bottom and right to whole windows and partitions it row-major, without a
shift; a global block attends over all patches. There are no prefix tokens and the classifier averages the grid.
The convolutional neck before the classifier also mixes neighbouring tokens; rollout follows attention only.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from gmar_lightning.capture import TIMM_ADAPTER, AttentionLayer
from gmar_lightning.families import Probe, require_pooling
from gmar_lightning.families.grids import global_mixing, window_mixing
from gmar_lightning.mixing import AttentionStep, TokenPlan
from gmar_lightning.tokens import TokenLayout, patch_grid


def matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return isinstance(model, VisionTransformerSAM)


def check(model: nn.Module) -> None:
    """Only average pooling over the grid has a linear read-out."""
    require_pooling(model, getattr(getattr(model.head, "global_pool", None), "pool_type", None), ("avg",))


def _split_heads(probabilities: Tensor, heads: int) -> Tensor:
    return probabilities.unflatten(0, (-1, heads))


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    grid = patch_grid(model, image_size)
    num_tokens = grid[0] * grid[1]
    layers, steps = [], []
    for index, block in enumerate(model.blocks):
        # The probabilities arrive as [B * W * H, n, n], heads folded into the batch.
        layout = partial(_split_heads, heads=block.attn.num_heads)
        layers.append([AttentionLayer(f"blocks.{index}.attn", block.attn, TIMM_ADAPTER, layout=layout)])
        window = block.window_size
        mixing = window_mixing(grid, (window, window)) if window > 0 else global_mixing(num_tokens)
        steps.append(AttentionStep(index, mixing))
    readout = torch.full((num_tokens,), 1.0 / num_tokens)
    names = [layer[0].name for layer in layers]
    return Probe(layers, names, TokenPlan(tuple(steps), readout, 0, grid))
