"""Single-sequence ViTs (timm VisionTransformer, DeiT, BEiT, EVA and relatives): global self-attention per block.

One token space throughout: the prefix tokens, then the patch grid. A block with parallel attention branches
(``x + sum_i attn_i(x)``, e.g. ``vit_small_patch16_18x2_224``) is one rollout layer whose heads are the heads of all
its branches.
"""

from __future__ import annotations

from torch import nn

from gmar_lightning.capture import attention_modules, find_attention_layers
from gmar_lightning.families import Probe
from gmar_lightning.families.grids import global_mixing
from gmar_lightning.mixing import AttentionStep, TokenPlan
from gmar_lightning.tokens import TokenLayout, infer_token_layout, patch_grid


def matches(model: nn.Module) -> bool:
    """A patch embedding and a sequence of blocks."""
    return hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), nn.Module)


def check(model: nn.Module) -> None:
    """The read-out must be known (no attention or max pooling)."""
    infer_token_layout(model)


def linear_readout(model: nn.Module) -> bool:
    """Token and average pooling read a mean of the last block's tokens; a latent attention pool does not."""
    return getattr(model, "attn_pool", None) is None


def block_layers(model: nn.Module) -> tuple[list, list[str]]:
    """The attention modules of each block that has any, and one name per block (the module's, or the block's)."""
    layers, names = [], []
    for name, block in model.blocks.named_children():
        branches = attention_modules(block, prefix=f"blocks.{name}")
        if branches:
            layers.append(branches)
            names.append(branches[0].name if len(branches) == 1 else f"blocks.{name}")
    if not layers:  # attention outside `blocks`: one layer per module, as the capture finds them
        layers = [[layer] for layer in find_attention_layers(model)]
        names = [layer[0].name for layer in layers]
    return layers, names


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    layout = token_layout if token_layout is not None else infer_token_layout(model)
    grid = patch_grid(model, image_size)
    num_tokens = layout.num_prefix_tokens + grid[0] * grid[1]
    layers, names = block_layers(model)
    steps = tuple(AttentionStep(index, global_mixing(num_tokens)) for index in range(len(layers)))
    readout = layout.readout_vector(num_tokens, 1)[0]
    return Probe(layers, names, TokenPlan(steps, readout, layout.num_prefix_tokens, grid))
