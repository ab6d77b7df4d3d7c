"""Hugging Face transformers Swin and Swin v2: attention inside shifted windows, patch merging between stages.

The same token mapping as timm's Swin family (`gmar_lightning.families.swin`): each block's windows
are mapped back to the tokens of its stage's grid, including the cyclic shift and the padding to whole windows, and
each merged token averages its 2x2 children (padding children dropped); the classifier (and ``SwinModel``'s
``pooler_output``) averages the last stage's tokens. Two details are transformers' own:

- Swin pads the stage's grid to whole windows *before* the cyclic shift (timm shifts, then pads), so the shift rolls
  the padded grid and padding slots move with it.
- Swin v1 clamps a block's window to the grid and drops its shift when the grid is no larger than the window, at
  every call (``SwinLayer.set_shift_and_window_size``); Swin v2 fixes both when the model is built.

The patch embedding pads the image to whole patches, so the first grid is ``ceil(H / patch)`` by ``ceil(W / patch)``.
The attention weights are element 1 of each block's attention module's output under eager attention (Swin), or under
``output_attentions`` (Swin v2's older modeling code); `families.hf` switches both for the call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gmar_lightning.capture import AttentionLayer
from gmar_lightning.families import Probe
from gmar_lightning.families.grids import merge_map
from gmar_lightning.families.hf import attention_layers, eager_attention, is_transformers_vit
from gmar_lightning.mixing import AttentionMixing, AttentionStep, TokenMap, TokenPlan
from gmar_lightning.tokens import TokenLayout

__all__ = ["matches", "padded_window_tokens", "probe"]


def matches(model: nn.Module) -> bool:
    """A transformers Swin or Swin v2 (classifier or bare ``*Model``)."""
    return is_transformers_vit(model) and model.config.model_type in ("swin", "swinv2")


def padded_window_tokens(grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """``[W, window * window]`` the token in each slot of each window when the grid is padded to whole windows at the
    bottom and right first, then rolled by ``-shift`` (transformers' order); padding slots are ``-1``.

    Examples:
        >>> padded_window_tokens((3, 3), 2, 1).tolist()
        [[4, 5, 7, 8], [-1, 3, -1, 6], [-1, -1, 1, 2], [-1, -1, -1, 0]]
    """
    height, width = grid
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    padded = torch.full((padded_h, padded_w), -1, dtype=torch.long)
    padded[:height, :width] = torch.arange(height * width).view(height, width)
    rolled = torch.roll(padded, shifts=(-shift, -shift), dims=(0, 1))
    blocks = rolled.view(padded_h // window, window, padded_w // window, window).permute(0, 2, 1, 3)
    return blocks.reshape(-1, window * window)


def _window_and_shift(block: nn.Module, grid: tuple[int, int], version_1: bool) -> tuple[int, int]:
    window, shift = int(block.window_size), int(block.shift_size)
    if version_1 and min(grid) <= window:  # what SwinLayer.set_shift_and_window_size does before attending
        return min(grid), 0
    return window, shift


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    config = model.config
    patch = config.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    grid = (math.ceil(image_size[0] / patch_h), math.ceil(image_size[1] / patch_w))
    first_grid = grid
    backbone = model if hasattr(model, "encoder") else getattr(model, model.base_model_prefix)
    version_1 = config.model_type == "swin"
    captured = {layer.module: layer for layer in attention_layers(model)}
    steps: list[AttentionStep | TokenMap] = []
    layers: list[list[AttentionLayer]] = []
    for stage in backbone.encoder.layers:
        for block in stage.blocks:
            attention = block.attention if version_1 else block.attention.self
            layers.append([captured[attention]])
            window, shift = _window_and_shift(block, grid, version_1)
            tokens = padded_window_tokens(grid, window, shift)
            steps.append(AttentionStep(len(layers) - 1, AttentionMixing(grid[0] * grid[1], tokens, tokens)))
        if stage.downsample is not None:
            steps.append(merge_map(grid))
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    num_tokens = grid[0] * grid[1]
    readout = torch.full((num_tokens,), 1.0 / num_tokens)
    return Probe(
        layers,
        [layer[0].name for layer in layers],
        TokenPlan(tuple(steps), readout, 0, first_grid),
        context=lambda: eager_attention(model),
    )
