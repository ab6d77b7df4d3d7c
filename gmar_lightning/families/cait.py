"""CaiT: self-attention over the patch tokens, then class-attention layers in which only the class token queries.

The class token joins the sequence after the self-attention layers; it is made from a parameter, so it maps back to
no patch. In class-attention layers the patch tokens are no queries and keep their value (identity rows). The
self-attention layers use talking heads: the ``H`` softmax distributions ``P_g`` are mixed across heads by a linear
map (``proj_w``) before they weight the values. Rollout needs distributions over tokens, so the layer's heads are the
``P_g``, captured where they enter ``proj_w``; their gradients pass through the head mixing (docs/method.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmar_lightning.capture import TIMM_ADAPTER, AttentionAdapter, AttentionLayer
from gmar_lightning.families import Probe, require_pooling
from gmar_lightning.families.grids import global_mixing
from gmar_lightning.mixing import AttentionMixing, AttentionStep, TokenMap, TokenPlan
from gmar_lightning.tokens import TokenLayout, patch_grid

TALKING_HEADS = AttentionAdapter(
    name="talking heads",
    matches=lambda module: type(module).__name__ == "TalkingHeadAttn",
    probs_module=lambda module: module.proj_w,
)
"""The softmax distributions of timm's ``TalkingHeadAttn`` are the input of its ``proj_w``, heads last."""


def _heads_last(probabilities: Tensor) -> Tensor:
    """``proj_w`` sees ``[B, N, N, H]``; the engine wants ``[B, H, N, N]``."""
    return probabilities.permute(0, 3, 1, 2)


def matches(model: nn.Module) -> bool:
    from timm.models.cait import Cait

    return isinstance(model, Cait)


def check(model: nn.Module) -> None:
    """The classifier reads the class token or the mean of the patch tokens."""
    require_pooling(model, model.global_pool, ("token", "avg"))


def _capture(name: str, attention: nn.Module) -> AttentionLayer:
    if TALKING_HEADS.matches(attention):
        return AttentionLayer(name, attention, TALKING_HEADS, layout=_heads_last)
    return AttentionLayer(name, attention, TIMM_ADAPTER)


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    grid = patch_grid(model, image_size)
    num_patches = grid[0] * grid[1]
    layers, steps = [], []
    for index, block in enumerate(model.blocks):
        layers.append([_capture(f"blocks.{index}.attn", block.attn)])
        steps.append(AttentionStep(len(layers) - 1, global_mixing(num_patches)))
    # The class token joins in front; it comes from a parameter, so its row maps to no patch.
    sources = torch.cat([torch.tensor([-1]), torch.arange(num_patches)])[:, None]
    weights = torch.cat([torch.zeros(1), torch.ones(num_patches)])[:, None]
    steps.append(TokenMap(sources, weights, num_patches))
    class_query = AttentionMixing(1 + num_patches, queries=torch.zeros(1, 1, dtype=torch.long))
    for index, block in enumerate(model.blocks_token_only):
        layers.append([_capture(f"blocks_token_only.{index}.attn", block.attn)])
        steps.append(AttentionStep(len(layers) - 1, class_query))
    names = [layer[0].name for layer in layers]
    readout = torch.zeros(1 + num_patches)
    if model.global_pool == "token":
        readout[0] = 1.0
    else:
        readout[1:] = 1.0 / num_patches
    return Probe(layers, names, TokenPlan(tuple(steps), readout, 0, grid))
