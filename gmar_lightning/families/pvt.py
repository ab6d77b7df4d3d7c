"""PVT v2 and Twins: stages of convolutional patch embeddings, spatial-reduction and locally-grouped attention.

Spatial-reduction attention attends from every token to pooled key tokens (a strided convolution, or PVT v2-li's
adaptive average pooling to 7x7); each pooled key's relevance flows back to the tokens of its cell. Twins'
locally-grouped attention is window attention without a shift. Each stage's patch embedding is a convolution; a new
token's relevance flows back to the tokens under its kernel. Overlapping cells (PVT v2's 3x3 stride-2 embeddings,
adaptive cells that share a row) count a token once (`coverage_map`).

The convolutions of PVT v2's MLPs and Twins' positional encoding also
mix neighbouring tokens; rollout follows attention only, as for every ViT (docs/method.md).
"""

from __future__ import annotations

import torch
from torch import nn

from gmar_lightning.capture import TIMM_ADAPTER, AttentionLayer
from gmar_lightning.families import Probe, require_pooling
from gmar_lightning.families.grids import (
    adaptive_cells,
    conv_map,
    conv_output,
    coverage_map,
    grid_cells,
    pair,
    pool_cells,
    window_mixing,
)
from gmar_lightning.mixing import AttentionMixing, AttentionStep, TokenMap, TokenPlan
from gmar_lightning.tokens import TokenLayout


def _classes() -> tuple[type, ...]:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.twins import Twins

    return PyramidVisionTransformerV2, Twins


def matches(model: nn.Module) -> bool:
    return isinstance(model, _classes())


def check(model: nn.Module) -> None:
    """Only average pooling over the last stage has a linear read-out."""
    require_pooling(model, getattr(model, "global_pool", None), ("avg",))


def reduction_mixing(grid: tuple[int, int], attention: nn.Module) -> AttentionMixing:
    """Spatial-reduction attention: all tokens query the keys pooled by ``sr`` (or ``pool``); none: global."""
    num_tokens = grid[0] * grid[1]
    if getattr(attention, "pool", None) is not None:  # PVT v2-li: adaptive average pooling, then a 1x1 convolution
        size = pair(attention.pool.output_size)
        rows, cols = adaptive_cells(grid[0], size[0]), adaptive_cells(grid[1], size[1])
    elif getattr(attention, "sr", None) is not None:
        ratio = pair(attention.sr.kernel_size)
        stride = pair(attention.sr.stride)
        out = conv_output(grid, attention.sr)
        rows = pool_cells(grid[0], out[0], ratio[0], stride[0], 0)
        cols = pool_cells(grid[1], out[1], ratio[1], stride[1], 0)
    else:
        return AttentionMixing(num_tokens)
    return AttentionMixing(num_tokens, key_map=coverage_map(grid_cells(rows, cols, grid[1]), num_tokens))


def _stages(model: nn.Module) -> list[tuple[nn.Conv2d, list[tuple[str, nn.Module]]]]:
    """Per stage: the convolution that embeds its tokens, and its attention modules with their names."""
    from timm.models.twins import Twins

    if isinstance(model, Twins):
        return [
            (embed.proj, [(f"blocks.{i}.{j}.attn", block.attn) for j, block in enumerate(blocks)])
            for i, (embed, blocks) in enumerate(zip(model.patch_embeds, model.blocks, strict=True))
        ]
    stages = []
    for i, stage in enumerate(model.stages):
        embed = model.patch_embed if stage.downsample is None else stage.downsample
        stages.append((embed.proj, [(f"stages.{i}.blocks.{j}.attn", b.attn) for j, b in enumerate(stage.blocks)]))
    return stages


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    steps: list[AttentionStep | TokenMap] = []
    layers, names = [], []
    grid, first_grid = None, None
    for conv, attentions in _stages(model):
        if grid is None:
            grid = first_grid = conv_output(image_size, conv)
        else:
            token_map, grid = conv_map(grid, conv)
            steps.append(token_map)
        for name, attention in attentions:
            layers.append([AttentionLayer(name, attention, TIMM_ADAPTER)])
            names.append(name)
            if hasattr(attention, "ws"):  # Twins' locally-grouped attention: windows without a shift
                mixing = window_mixing(grid, (attention.ws, attention.ws))
            else:
                mixing = reduction_mixing(grid, attention)
            steps.append(AttentionStep(len(layers) - 1, mixing))
    num_tokens = grid[0] * grid[1]
    readout = torch.full((num_tokens,), 1.0 / num_tokens)
    return Probe(layers, names, TokenPlan(tuple(steps), readout, 0, first_grid))
