"""Mask attention heads: scale chosen heads' outputs inside a ``with`` block, and build masks from pruning orders.

Heads are masked by scaling their outputs just before each attention module's output projection ``proj``: a forward
pre-hook views ``proj``'s input ``[B, N, H * head_dim]`` as ``[B, N, H, head_dim]`` and multiplies it by the mask.
Fused attention (``scaled_dot_product_attention``) stays on, because nothing needs the attention probabilities.

Limitation: timm attention modules built with ``scale_norm=True`` (e.g. EVA with ``scale_attn_inner=True``)
normalise the concatenated heads (``self.norm``) before ``proj``. Masking at ``proj``'s input still removes the
masked heads' contribution to the output exactly, but the remaining heads were normalised with statistics that
include the masked heads, so the result is not identical to a model trained without them. No earlier hook point is
better: zeroing a head before the norm still lets its (shifted) channels and the norm's bias reach ``proj``.
A sigmoid ``gate`` (``gated=True``) acts per channel and so per head; it does not affect exactness.

Hugging Face transformers ViTs (5.x: ``ViTAttention``, ``DeiTAttention``, ``BeitAttention``, ``Dinov2Attention``...)
are masked the same way, at the input of their ``o_proj``. transformers 4.x keeps that projection outside the
attention module (``ViTSelfOutput.dense``), so its models are refused.

Examples:
    >>> import timm
    >>> model = timm.models.vision_transformer.VisionTransformer(
    ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    >>> attention_head_grid(model)
    (2, 2)
    >>> mask = torch.ones(2, 2)
    >>> mask[0, 1] = 0  # drop head 1 of the first layer
    >>> with head_mask(model, mask):
    ...     logits = model(torch.randn(1, 3, 16, 16))
    >>> logits.shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gmar_lightning import families
from gmar_lightning._checks import check_int_in_range
from gmar_lightning.capture import AttentionLayer, find_attention_layers, head_slots, slot_count, unwrap_model

__all__ = ["attention_head_grid", "head_mask", "mask_from_order"]


@dataclass(frozen=True)
class _HeadLayout:
    """The attention layers and where their heads sit in the ``[L, H]`` head grid.

    ``slots[l]`` holds the original index of each head layer ``l`` has now (``0 .. H_l - 1`` unless
    [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] removed some); ``width`` is the grid's ``H``, the largest
    original head count.
    """

    layers: list[AttentionLayer]
    slots: list[Tensor]
    width: int

    @property
    def present(self) -> Tensor:
        """``[L, H]`` bool: which grid cells are heads the model has."""
        present = torch.zeros(len(self.layers), self.width, dtype=torch.bool)
        for index, layer_slots in enumerate(self.slots):
            present[index, layer_slots] = True
        return present


def head_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention layers the head tools act on, in forward order, named within ``model``: those its first ViT's
    family lists (``Family.attention_layers``: the transformers ViTs' attention modules), else the timm attention
    modules."""
    eager = unwrap_model(model)
    found = families.vision_transformers(eager)
    family = next((family for family in families.FAMILIES if found and family.matches(found[0][1])), None)
    return (family.attention_layers if family is not None else find_attention_layers)(eager)


def num_heads_of(module: nn.Module) -> int | None:
    """An attention module's current head count: timm's ``num_heads``, transformers' ``num_attention_heads``."""
    num_heads = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))
    return num_heads if isinstance(num_heads, int) and not isinstance(num_heads, bool) else None


def output_projection(module: nn.Module) -> nn.Module | None:
    """The linear layer that mixes the concatenated heads: timm's ``proj``, transformers' ``o_proj`` (``out_proj`` in
    CLIP and SigLIP)."""
    projection = next((getattr(module, name) for name in ("proj", "o_proj", "out_proj") if hasattr(module, name)), None)
    return projection if isinstance(projection, nn.Module) else None


def _maskable_layers(model: nn.Module) -> _HeadLayout:
    """The attention layers and their head slots; errors if a layer has no output projection or head count."""
    layers = head_layers(model)
    slots, widths = [], []
    for layer in layers:
        num_heads = num_heads_of(layer.module)
        if num_heads is None or output_projection(layer.module) is None:
            raise TypeError(
                f"`model` attention layer `{layer.name}` ({type(layer.module).__name__}) needs an integer `num_heads` "
                "and a `proj` output projection for head masking; timm-style attention and transformers >= 5 ViTs "
                "are supported (transformers 4.x keeps the projection outside the attention module)."
            )
        slots.append(head_slots(layer.module, num_heads))
        widths.append(slot_count(layer.module, num_heads))
    return _HeadLayout(layers, slots, max(widths))


def attention_head_grid(model: nn.Module) -> tuple[int, int]:
    """The shape ``(L, H)`` of head masks and importance for ``model``: attention layers by heads per layer.

    For a model whose layers lost heads ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]), ``H`` is the
    largest original head count and each head keeps its original column.

    Examples:
        >>> import timm
        >>> attention_head_grid(timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=6))
        (3, 6)
    """
    layout = _maskable_layers(model)
    return len(layout.layers), layout.width


def _gate_hook(layer_name: str, gate: Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """A ``proj`` pre-hook scaling head ``h``'s input slice by ``gate[..., h]``; ``gate`` is ``[H]`` or ``[B, H]``."""
    num_heads = gate.shape[-1]

    def hook(_proj: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        head_outputs = inputs[0]
        if head_outputs.shape[-1] % num_heads != 0:
            raise ValueError(
                f"`model` layer `{layer_name}`: `proj` input width {head_outputs.shape[-1]} is not divisible by "
                f"{num_heads} heads, so it cannot be split per head."
            )
        per_head = head_outputs.unflatten(-1, (num_heads, -1))
        if gate.dim() == 1:
            scale = gate.view(num_heads, 1)
        elif head_outputs.shape[0] == gate.shape[0]:
            # Broadcast each sample's gate over every middle (token) dimension.
            scale = gate.view(gate.shape[0], *([1] * (per_head.dim() - 3)), num_heads, 1)
        else:
            raise ValueError(
                f"`model` layer `{layer_name}`: `proj` input has leading dimension {head_outputs.shape[0]} but the "
                f"batch has {gate.shape[0]} samples; per-sample head gates need unwindowed attention."
            )
        scale = scale.to(device=per_head.device, dtype=per_head.dtype)
        return ((per_head * scale).flatten(-2), *inputs[1:])

    return hook


@contextlib.contextmanager
def _gated_heads(layers: list[AttentionLayer], gates: Sequence[Tensor | None]) -> Iterator[None]:
    """Scale each layer's head outputs by ``gates[l]`` (``[H]``, ``[B, H]`` or ``None`` to leave it alone)."""
    handles = []
    try:
        for layer, gate in zip(layers, gates, strict=True):
            if gate is not None:
                projection = output_projection(layer.module)
                handles.append(projection.register_forward_pre_hook(_gate_hook(layer.name, gate)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_float_tensor(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.float()
    if isinstance(value, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32)
    raise TypeError(f"`{name}` must be a tensor or array, got {type(value).__name__}.")


@contextlib.contextmanager
def head_mask(model: nn.Module, mask: Tensor | np.ndarray) -> Iterator[None]:
    """Scale (usually zero) chosen attention heads' outputs inside the ``with`` block.

    Each head's output is multiplied by its mask entry just before the attention module's output projection, so a
    0 removes the head's contribution to the output (see the module docstring for ``scale_norm`` models). Rows that
    are all ones get no hook, so an all-ones mask leaves outputs bit-identical. Hooks are removed on exit, also
    when the body raises; the model itself is never changed.

    Args:
        model: A timm Vision Transformer, a transformers (5.x) ViT, or ``torch.compile`` of one.
        mask: ``[L, H]`` over the model's attention layers in
            [`find_attention_layers`][gmar_lightning.capture.find_attention_layers] order: 0/1, bool, or float weights.
            A mask that requires grad is always applied, so gradients reach it. For a model whose layers lost heads,
            column ``h`` is original head ``h``
            ([`attention_head_grid`][gmar_lightning.heads.masking.attention_head_grid]) and the cells of missing heads
            are ignored (they may be NaN).

    Raises:
        ValueError: If ``mask`` is not ``[L, H]`` or has non-finite entries at the model's heads.

    Examples:
        >>> import timm
        >>> model = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
        >>> images = torch.randn(2, 3, 16, 16)
        >>> reference = model(images)
        >>> with head_mask(model, torch.ones(2, 2)):
        ...     unchanged = torch.equal(model(images), reference)
        >>> with head_mask(model, torch.tensor([[0, 0], [1, 1]])):  # silence every head of layer 0
        ...     changed = not torch.allclose(model(images), reference)
        >>> unchanged, changed
        (True, True)
    """
    layout = _maskable_layers(model)
    mask = _as_float_tensor("mask", mask)
    if tuple(mask.shape) != (len(layout.layers), layout.width):
        raise ValueError(
            f"`mask` must have shape [L, H] = [{len(layout.layers)}, {layout.width}] (attention layers x heads), "
            f"got {list(mask.shape)}."
        )
    rows = [row[layer_slots.to(row.device)] for row, layer_slots in zip(mask, layout.slots, strict=True)]
    if not all(bool(torch.isfinite(row).all()) for row in rows):
        raise ValueError("`mask` must contain only finite values; use 0 to drop a head and 1 to keep it.")
    gates = [None if not len(row) or (bool((row == 1).all()) and not mask.requires_grad) else row for row in rows]
    with _gated_heads(layout.layers, gates):
        yield


def mask_from_order(
    order: Tensor | Sequence[Sequence[int]],
    count: int,
    num_layers: int,
    num_heads: int,
    present: Tensor | None = None,
) -> Tensor:
    """The ``[L, H]`` 0/1 mask that drops the first ``count`` heads of a pruning ``order``.

    Args:
        order: ``(layer, head)`` pairs covering every head once, e.g. from `rank_heads`.
        count: How many heads of ``order`` to drop.
        num_layers: ``L``.
        num_heads: ``H``.
        present: ``[L, H]`` bool, the heads the model has when its layers lost some (``order`` then covers exactly
            those); ``None``: every cell is a head.

    Examples:
        >>> mask_from_order([(1, 0), (0, 1), (0, 0), (1, 1)], 2, num_layers=2, num_heads=2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    order = _check_order(order, num_layers, num_heads, present)
    check_int_in_range("count", count, 0, len(order))
    mask = torch.ones(num_layers, num_heads)
    dropped = order[:count]
    mask[dropped[:, 0], dropped[:, 1]] = 0.0
    return mask


def _check_order(
    order: Tensor | Sequence[Sequence[int]], num_layers: int, num_heads: int, present: Tensor | None = None
) -> Tensor:
    """``order`` as an int64 ``[K, 2]`` tensor covering every head (every ``present`` cell) exactly once."""
    order = torch.as_tensor(order)
    present = torch.ones(num_layers, num_heads, dtype=torch.bool) if present is None else present.bool().cpu()
    expected = int(present.sum())
    if order.shape != (expected, 2) or order.is_floating_point():
        raise ValueError(
            f"`order` must be {expected} integer (layer, head) pairs, shape [{expected}, 2], got "
            f"{order.dtype} of shape {list(order.shape)}; build it with `rank_heads` or `random_order`."
        )
    order = order.long()
    in_range = (order[:, 0] >= 0) & (order[:, 0] < num_layers) & (order[:, 1] >= 0) & (order[:, 1] < num_heads)
    if (
        not in_range.all()
        or torch.unique(order[:, 0] * num_heads + order[:, 1]).numel() != expected
        or not present[order[:, 0], order[:, 1]].all()
    ):
        raise ValueError(
            f"`order` must list every (layer, head) of the {num_layers}x{num_heads} grid exactly once (only the "
            "heads the model has, if it lost some); build it with `rank_heads` or `random_order`."
        )
    return order
