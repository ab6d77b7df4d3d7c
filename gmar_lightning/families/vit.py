"""Single-sequence ViTs (timm VisionTransformer, DeiT, BEiT, EVA, NaFlexViT and relatives): global self-attention per
block.

One token space throughout: the prefix tokens, then the patch grid. A block with parallel attention branches
(``x + sum_i attn_i(x)``, e.g. ``vit_small_patch16_18x2_224``) is one rollout layer whose heads are the heads of all
its branches. A model with attention pooling (``global_pool='map'``: SigLIP, SigLIP 2, Perception Encoder) reads its
tokens through the pool, the plan's last layer (an `AttentionReadout`).
"""

from __future__ import annotations

import torch
from torch import nn

from gmar_lightning.capture import TIMM_POOL_ADAPTER, AttentionLayer, attention_modules, find_attention_layers
from gmar_lightning.families import Probe, UnsupportedModelError
from gmar_lightning.families.grids import global_mixing
from gmar_lightning.mixing import AttentionReadout, AttentionStep, TokenPlan
from gmar_lightning.naflex import TIMM, NaFlexFormat, is_naflex_vit
from gmar_lightning.tokens import TokenLayout, infer_token_layout, patch_embedding, patch_grid


def matches(model: nn.Module) -> bool:
    """A patch embedding (NaFlexViT: ``embeds``) and a sequence of blocks."""
    return patch_embedding(model) is not None and isinstance(getattr(model, "blocks", None), nn.Module)


def attention_pool(model: nn.Module) -> nn.Module | None:
    """The model's timm attention pool (``global_pool='map'``), or ``None``."""
    pool = getattr(model, "attn_pool", None)
    return pool if pool is not None and TIMM_POOL_ADAPTER.matches(pool) else None


def naflex(model: nn.Module) -> NaFlexFormat | None:
    """timm's NaFlexViT takes NaFlex batches in timm's spelling, and image tensors too."""
    if not is_naflex_vit(model):
        return None
    patch_h, patch_w = model.embeds.patch_size
    return NaFlexFormat(TIMM, (patch_h, patch_w), getattr(model.embeds, "in_chans", None), True)


def check(model: nn.Module) -> None:
    """The read-out must be known: a token layout, or an attention pool that reads its first latent or their mean."""
    pool = attention_pool(model)
    if pool is None:
        try:
            infer_token_layout(model)
        except ValueError as error:
            if getattr(model, "attn_pool", None) is None:
                raise
            raise UnsupportedModelError(str(error)) from None  # an attention pool other than 'map' (PRR)
    elif pool.pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"`model` ({type(model).__name__}) has an attention pool that returns its {pool.latent_len} latents "
            f"unpooled (pool_type={pool.pool!r}), so no one read-out row exists; build the pool with pool_type='token' "
            "or 'avg'."
        )


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
        layers = [[layer] for layer in find_attention_layers(model) if layer.adapter is not TIMM_POOL_ADAPTER]
        names = [layer[0].name for layer in layers]
    return layers, names


def pool_readout(model: nn.Module, pool: nn.Module, num_prefix_tokens: int, num_tokens: int) -> AttentionReadout:
    """Where the pool's keys sit among the tokens: every token, or the patch tokens when the model drops its prefix
    tokens before pooling (timm's VisionTransformer and NaFlexViT unless ``pool_include_prefix``; EVA pools all)."""
    drops_prefix = hasattr(model, "pool_include_prefix") and not model.pool_include_prefix
    keys = torch.arange(num_prefix_tokens, num_tokens) if drops_prefix and num_prefix_tokens else None
    return AttentionReadout(pool.latent_len, num_tokens, keys)


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    # A token layout (stated, or found by the read-out check) reads the tokens themselves: a head of the user's own
    # that bypasses the pool. resolve_model refuses one for a model whose own logits come through the pool.
    pool = attention_pool(model) if token_layout is None else None
    if token_layout is None:
        check(model)
    grid = patch_grid(model, image_size)
    layers, names = block_layers(model)
    if pool is None:
        layout = token_layout if token_layout is not None else infer_token_layout(model)
        num_prefix = layout.num_prefix_tokens
        num_tokens = num_prefix + grid[0] * grid[1]
        readout = layout.readout_vector(num_tokens, 1)[0]
    else:
        num_prefix = model.num_prefix_tokens
        num_tokens = num_prefix + grid[0] * grid[1]
        # Weights of the latents: the pool's output is its first latent ('token') or their mean ('avg').
        readout = torch.full((pool.latent_len,), 1.0 / pool.latent_len)
        if pool.pool == "token":
            readout = torch.nn.functional.one_hot(torch.tensor(0), pool.latent_len).float()
    steps: list[AttentionStep] = [AttentionStep(index, global_mixing(num_tokens)) for index in range(len(layers))]
    if pool is not None:
        steps.append(AttentionStep(len(layers), pool_readout(model, pool, num_prefix, num_tokens)))
        layers = [*layers, [AttentionLayer("attn_pool", pool, TIMM_POOL_ADAPTER)]]
        names = [*names, "attn_pool"]
    return Probe(layers, names, TokenPlan(tuple(steps), readout, num_prefix, grid))
