"""open_clip's ``VisionTransformer`` towers (the ``visual`` of an open_clip ``CLIP``): one ``nn.MultiheadAttention``
per residual block over the class token and the patch grid.

``open_clip_torch`` is optional (``pip install "gmar-lightning[open_clip]"``) and nothing here imports it: a model can
only be an open_clip tower if the user already imported open_clip, so the check looks the package up in
``sys.modules``.

A tower outputs image embeddings, not class logits: it is explained inside the user's module that makes logits from
them (a zero-shot head on the text embeddings of the class prompts, or a linear probe). The read-out is what the tower
pools: the class token (``pool_type='tok'``, the default; the final projection is linear) or the mean of the patch
tokens (``'avg'``). The blocks call their attention with ``need_weights=False``; the capture switches per-head weights
on for the call ([`families.mha`][gmar_lightning.families.mha]). A tower with an attentional pooler (CoCa) or without
pooling (``pool_type='none'``) is refused in one line.
"""

from __future__ import annotations

import sys

from torch import nn

from gmar_lightning.families import Probe, UnsupportedModelError
from gmar_lightning.families.grids import global_mixing
from gmar_lightning.families.mha import mha_layer, per_head_weights
from gmar_lightning.mixing import AttentionStep, TokenPlan
from gmar_lightning.tokens import TokenLayout

__all__ = ["attention_layers", "check", "headless", "matches", "num_channels", "probe"]


def matches(model: nn.Module) -> bool:
    """An open_clip ``VisionTransformer`` (``False`` whenever open_clip is not imported)."""
    transformer = sys.modules.get("open_clip.transformer")
    return transformer is not None and isinstance(model, transformer.VisionTransformer)


def check(model: nn.Module) -> None:
    """Only a class-token or patch-mean read-out is linear."""
    name = type(model).__name__
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"`model` ({name}) pools its tokens with an attentional pooler (CoCa's attn_pool) of many latent queries "
            "whose outputs are not one read-out row; gmar-lightning does not map it yet"
        )
    if model.pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(
            f"`model` ({name}) returns its tokens unpooled (pool_type={model.pool_type!r}), so no one read-out row "
            "exists; build the tower with pool_type='tok' or 'avg'"
        )


def headless(model: nn.Module) -> str | None:
    """A tower always outputs embeddings: it is explained only inside a module that makes class logits."""
    return "an open_clip image tower (image embeddings, no classifier)"


def num_channels(model: nn.Module) -> int:
    return model.conv1.in_channels


def attention_layers(model: nn.Module) -> list:
    """Each residual block's ``nn.MultiheadAttention``, in forward order."""
    return [
        mha_layer(f"transformer.resblocks.{index}.attn", block.attn)
        for index, block in enumerate(model.transformer.resblocks)
    ]


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    check(model)
    layout = token_layout or TokenLayout(1, (0,) if model.pool_type == "tok" else None)
    stride = model.conv1.stride
    grid = (image_size[0] // stride[0], image_size[1] // stride[1])
    num_tokens = layout.num_prefix_tokens + grid[0] * grid[1]
    layers = [[layer] for layer in attention_layers(model)]
    steps = tuple(AttentionStep(index, global_mixing(num_tokens)) for index in range(len(layers)))
    return Probe(
        layers,
        [layer[0].name for layer in layers],
        TokenPlan(steps, layout.readout_vector(num_tokens, 1)[0], layout.num_prefix_tokens, grid),
        context=lambda: per_head_weights(layer[0].module for layer in layers),
    )
