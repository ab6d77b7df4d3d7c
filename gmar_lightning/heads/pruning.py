"""Remove attention heads from timm ViTs for real: smaller weights, fewer FLOPs, the outputs of masking them.

[`prune_heads`][gmar_lightning.heads.pruning.prune_heads] slices every tensor whose size depends on a layer's head
count: the ``qkv`` (or ``q_proj``, ``k_proj``, ``v_proj``) output rows with their biases (BEiT/EVA's separate
``q_bias``/``k_bias``/``v_bias`` too), a ``gate``'s rows, ``proj``'s input columns and BEiT's relative-position-bias
table; it updates ``num_heads`` (and ``attn_dim``) and keeps ``head_dim``. ``q_norm``/``k_norm`` act on each head's
``head_dim`` channels with weights shared by all heads and EVA's rotary embedding acts on ``head_dim`` too, so neither
changes. Fused attention stays on. Layers may end with different head counts, and a layer may lose every head: its
attention branch then outputs only ``proj``'s bias, exactly what [`head_mask`][gmar_lightning.heads.masking.head_mask]
gives when it zeroes all of the layer's heads.

Heads keep the index they had in the unpruned model (their *slot*). A pruned attention module carries a persistent
boolean buffer ``kept_heads`` ``[H_original]``, so the pruning spec travels inside every ``state_dict`` (a plain file, a
Lightning checkpoint) and [`restore_pruning`][gmar_lightning.heads.pruning.restore_pruning] prunes a freshly built model
to match before loading.

Refused: attention that normalises the concatenated heads before ``proj`` (``scale_norm``, EVA with
``scale_attn_inner=True``): the remaining heads would be normalised with other statistics, so no pruned model equals
the masked one. Other attention classes raise a ``TypeError`` naming the supported ones.

Examples:
    >>> import timm
    >>> vit = timm.models.vision_transformer.VisionTransformer(
    ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=4, num_classes=3).eval()
    >>> changes = prune_heads(vit, {0: [1, 3], 1: [0]})
    >>> head_counts(vit), vit.blocks[0].attn.qkv.weight.shape, vit(torch.randn(1, 3, 16, 16)).shape
    ([2, 3], torch.Size([24, 16]), torch.Size([1, 3]))
    >>> [ids.tolist() for ids in head_ids(vit)]
    [[0, 2], [1, 2, 3]]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, apply_rot_embed_cat
from timm.layers.attention import Attention as TimmAttention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from gmar_lightning._checks import check_int_in_range, check_number_in_range, check_positive_int
from gmar_lightning.capture import KEPT_HEADS, AttentionLayer, head_slots, slot_count, unwrap_model
from gmar_lightning.heads.masking import head_layers, num_heads_of, output_projection
from gmar_lightning.model_state import eval_mode
from gmar_lightning.trajectory import HeadTrajectory

__all__ = [
    "ParameterSlice",
    "PruningEvent",
    "head_counts",
    "head_ids",
    "measure_speedup",
    "measure_throughput",
    "present_heads",
    "prune_heads",
    "pruning_events",
    "pruning_spec",
    "restore_pruning",
    "restore_pruning_on_load",
    "select_heads",
    "slice_optimizer_state",
    "weight_magnitude_importance",
]

HeadsToPrune = Mapping[int | str, Iterable[int]] | Tensor | np.ndarray


@dataclass(frozen=True)
class ParameterSlice:
    """How [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] cut one parameter:
    ``new = old.index_select(dim, index)``.

    Attributes:
        old: The parameter before pruning (no longer in the model; optimizers may still hold it).
        new: The parameter that replaced it.
        dim: The dimension that was sliced.
        index: The kept positions along ``dim`` (int64, CPU).
    """

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    index: Tensor


def _fused_qkv(attention: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v [B, H, N, head_dim]`` of a fused ``qkv`` projection with optional separate q/k/v biases (BEiT, EVA),
    split into the module's ``num_heads`` heads of ``head_dim`` (not ``dim // num_heads``, which pruning changes)."""
    if attention.q_bias is None:
        qkv = attention.qkv(x)
    else:
        qkv_bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
        if attention.qkv_bias_separate:
            qkv = attention.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=attention.qkv.weight, bias=qkv_bias)
    batch, num_tokens, _ = x.shape
    qkv = qkv.reshape(batch, num_tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


class PrunedBeitAttention(BeitAttention):
    """BEiT attention whose head count may differ from ``dim // head_dim`` (timm reshapes to the input width).

    Identical to `timm.models.beit.Attention` except that the heads are concatenated to ``num_heads * head_dim``
    channels and a relative-position bias shared by all layers is restricted to the layer's remaining heads.
    """

    head_dim: int

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        batch, num_tokens, _ = x.shape
        q, k, v = _fused_qkv(self, x)
        if shared_rel_pos_bias is not None:
            # The shared table is [H_original, N, N]: keep this layer's heads.
            shared_rel_pos_bias = shared_rel_pos_bias.index_select(-3, _kept_indices(self).to(x.device))
        rel_pos_bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            rel_pos_bias = shared_rel_pos_bias if rel_pos_bias is None else rel_pos_bias + shared_rel_pos_bias
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if rel_pos_bias is not None:
                attn = attn + rel_pos_bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class PrunedEvaAttention(EvaAttention):
    """EVA attention whose head count may differ from ``dim // head_dim`` (timm reshapes to the input width).

    Identical to `timm.models.eva.EvaAttention` except that the heads are concatenated to
    ``num_heads * head_dim`` channels. The rotary embedding acts within each head, so it needs no change.
    """

    def forward(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = _fused_qkv(self, x)
        else:
            shape = (batch, num_tokens, self.num_heads, self.head_dim)
            q = self.q_proj(x).reshape(shape).transpose(1, 2)
            k = self.k_proj(x).reshape(shape).transpose(1, 2)
            v = self.v_proj(x).reshape(shape).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            prefix, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(num_tokens, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * self.head_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PrunedAttentionPoolLatent(AttentionPoolLatent):
    """timm's attention pool (``global_pool='map'``) whose head count may differ from ``dim // head_dim``.

    Identical to `timm.layers.AttentionPoolLatent` except that the heads are concatenated to ``num_heads * head_dim``
    channels (timm reshapes to the input width).
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        batch, num_tokens, _ = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q_latent = self.latent.expand(batch, -1, -1)
        q = self.q(q_latent).reshape(batch, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, num_tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = maybe_add_mask((q * self.scale) @ k.transpose(-2, -1), attn_mask)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(batch, self.latent_len, self.num_heads * self.head_dim)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            x = x[:, 0]
        elif self.pool == "avg":
            x = x.mean(1)
        return x


_PRUNED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    BeitAttention: PrunedBeitAttention,
    EvaAttention: PrunedEvaAttention,
    AttentionPoolLatent: PrunedAttentionPoolLatent,
}
_SUPPORTED = (TimmAttention, BeitAttention, EvaAttention, AttentionPoolLatent)


def _kept_indices(module: nn.Module) -> Tensor:
    return head_slots(module, num_heads_of(module))


def _is_transformers_attention(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def head_ids(model: nn.Module) -> list[Tensor]:
    """Per attention layer, the original indices (slots) of the heads it still has, ascending (int64, CPU).

    An unpruned layer's heads are ``0 .. H - 1``.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> _ = prune_heads(vit, {1: [0]})
        >>> [ids.tolist() for ids in head_ids(vit)]
        [[0, 1], [1]]
    """
    return [_kept_indices(layer.module) for layer in head_layers(model)]


def head_counts(model: nn.Module) -> list[int]:
    """The number of heads each attention layer has now, in forward order."""
    return [num_heads_of(layer.module) for layer in head_layers(model)]


def pruning_spec(model: nn.Module) -> dict[str, list[int]]:
    """``{layer name: removed original head indices}`` for every attention layer that lost heads.

    The same information as the ``kept_heads`` buffers in the state dict, in a JSON-ready form for logs and reports.
    """
    spec = {}
    for layer in head_layers(model):
        kept = getattr(layer.module, KEPT_HEADS, None)
        if kept is not None and not bool(kept.all()):
            spec[layer.name] = (~kept).nonzero().flatten().tolist()
    return spec


def _head_dim(module: nn.Module) -> int:
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    # timm's BEiT attention keeps head_dim only as a local; recover it from the projection width.
    return module.proj.in_features // module.num_heads


def _check_transformers_prunable(layer: AttentionLayer, remove: set[int]) -> None:
    module = layer.module
    projections = (getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if not all(isinstance(linear, nn.Linear) for linear in (*projections, output_projection(module))):
        raise TypeError(
            f"`model` layer `{layer.name}` is a {type(module).__name__} without q_proj/k_proj/v_proj/o_proj; "
            "prune_heads supports transformers >= 5 ViTs (transformers 4.x models have their own `prune_heads`)."
        )
    if getattr(module.config, "use_shared_relative_position_bias", False):
        raise ValueError(
            f"`heads`: layer `{layer.name}` adds a relative-position bias shared by all layers, which cannot lose "
            "heads in one layer only; build the model with use_relative_position_bias=True or leave it unpruned."
        )
    if len(remove) == num_heads_of(module):
        raise ValueError(
            f"`heads` removes every head of layer `{layer.name}`, which transformers attention cannot run without; "
            "keep at least one head per layer (HeadPruning: min_heads_per_layer >= 1)."
        )


def _check_prunable(layer: AttentionLayer, remove: set[int]) -> None:
    module = layer.module
    if _is_transformers_attention(module):
        _check_transformers_prunable(layer, remove)
        return
    if not isinstance(module, _SUPPORTED):
        names = ", ".join(f"{cls.__module__}.{cls.__name__}" for cls in _SUPPORTED)
        raise TypeError(
            f"`model` layer `{layer.name}` is a {type(module).__name__}; prune_heads supports timm's {names} and "
            "transformers >= 5 ViTs."
        )
    # The attention pool's `norm` is its MLP's pre-norm, after `proj`: it sees no head on its own.
    scale_norm = not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
    if scale_norm and not isinstance(module, AttentionPoolLatent):
        raise ValueError(
            f"`heads`: layer `{layer.name}` normalises the concatenated heads before `proj` (scale_norm), so the "
            "remaining heads would change with the removed ones and pruning cannot match masking; leave it unpruned."
        )
    if not isinstance(module, TimmAttention | EvaAttention) and getattr(module, "gate", None) is not None:
        raise TypeError(f"`model` layer `{layer.name}` has a gate prune_heads does not know how to slice.")
    head_dim = _head_dim(module)
    for norm_name in ("q_norm", "k_norm"):
        for parameter in getattr(module, norm_name, nn.Identity()).parameters():
            if parameter.shape != (head_dim,):
                raise ValueError(
                    f"`model` layer `{layer.name}`: `{norm_name}` has a parameter of shape {list(parameter.shape)}, "
                    f"not shared across heads ([{head_dim}]); prune_heads cannot slice it."
                )


def _removals(layers: list[AttentionLayer], heads: HeadsToPrune) -> list[set[int]]:
    """Original head indices to remove per layer, validated against what each layer still has."""
    slots = [set(_kept_indices(layer.module).tolist()) for layer in layers]
    removals: list[set[int]] = [set() for _ in layers]
    names = {layer.name: index for index, layer in enumerate(layers)}
    if isinstance(heads, Tensor | np.ndarray):
        mask = torch.as_tensor(np.asarray(heads, dtype=np.float64) if isinstance(heads, np.ndarray) else heads)
        width = max(_original_count(layer.module) for layer in layers)
        if mask.shape != (len(layers), width):
            raise ValueError(
                f"`heads` as a keep-mask must have shape [L, H] = [{len(layers)}, {width}], got {list(mask.shape)}."
            )
        for index, row in enumerate(mask.float()):
            for slot, value in enumerate(row.tolist()):
                if value == 0:
                    removals[index].add(slot)
                elif value != 1 and not (np.isnan(value) and slot not in slots[index]):
                    raise ValueError(
                        f"`heads` keep-mask entries must be 1 (keep) or 0 (remove), NaN only for removed heads; "
                        f"got {value} at layer {index}, head {slot}."
                    )
    elif isinstance(heads, Mapping):
        for key, values in heads.items():
            index = names.get(key) if isinstance(key, str) else key
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(layers):
                raise ValueError(
                    f"`heads` key {key!r} is not an attention layer: use an index in [0, {len(layers) - 1}] or a "
                    f"name such as {layers[0].name!r}."
                )
            removals[index].update(int(head) for head in values)
    else:
        raise TypeError(
            f"`heads` must be a mapping {{layer: [head, ...]}} or an [L, H] keep-mask, got {type(heads).__name__}."
        )
    for index, (remove, present) in enumerate(zip(removals, slots, strict=True)):
        absent = sorted(remove - present)
        if absent:
            raise ValueError(
                f"`heads` names head(s) {absent} of layer {index} ({layers[index].name}), which it does not have; "
                f"its heads are {sorted(present)} (original indices)."
            )
    return removals


def _original_count(module: nn.Module) -> int:
    return slot_count(module, num_heads_of(module))


def _replace(owner: nn.Module, name: str, dim: int, index: Tensor, changes: list[ParameterSlice]) -> None:
    """Replace ``owner.<name>`` (a parameter or buffer) by its ``index_select`` along ``dim``."""
    old = getattr(owner, name, None)
    if old is None:
        return
    data = old.detach().index_select(dim, index.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(owner, name, new)
        changes.append(ParameterSlice(old, new, dim, index))
    else:
        owner._buffers[name] = data


def _slice_linear(linear: nn.Linear | None, dim: int, index: Tensor, changes: list[ParameterSlice]) -> None:
    if linear is None:
        return
    _replace(linear, "weight", dim, index, changes)
    if dim == 0:
        _replace(linear, "bias", 0, index, changes)
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())


def _prune_layer(module: nn.Module, remove: set[int], bias_owner: nn.Module) -> list[ParameterSlice]:
    """Remove ``remove`` (original indices) from ``module``; ``bias_owner`` holds its relative-position-bias table
    (the module itself in timm, the enclosing layer's ``relative_position_bias`` in transformers BEiT)."""
    slots = _kept_indices(module).tolist()
    num_heads, head_dim = len(slots), _head_dim(module)
    keep = torch.tensor([position for position, slot in enumerate(slots) if slot not in remove], dtype=torch.long)
    channels = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
    width = num_heads * head_dim
    qkv_rows = torch.cat([channels + part * width for part in range(3)])
    changes: list[ParameterSlice] = []
    if getattr(module, "qkv", None) is not None:
        _slice_linear(module.qkv, 0, qkv_rows, changes)
    if isinstance(module, AttentionPoolLatent):  # the latent queries' `q`, and `kv` over the tokens
        if isinstance(module.q, nn.Linear):
            _slice_linear(module.q, 0, channels, changes)
        else:  # no query projection: the latent is the query
            _replace(module, "latent", 2, channels, changes)
        _slice_linear(module.kv, 0, torch.cat([channels + part * width for part in range(2)]), changes)
    for name in ("q_proj", "k_proj", "v_proj", "gate"):
        _slice_linear(getattr(module, name, None), 0, channels, changes)
    for name in ("q_bias", "k_bias", "v_bias"):
        _replace(module, name, 0, channels, changes)
    _slice_linear(output_projection(module), 1, channels, changes)
    _replace(bias_owner, "relative_position_bias_table", 1, keep, changes)

    kept = getattr(module, KEPT_HEADS, None)
    if kept is None:
        kept = torch.ones(num_heads, dtype=torch.bool, device=output_projection(module).weight.device)
        module.register_buffer(KEPT_HEADS, kept, persistent=True)
    kept[sorted(remove)] = False
    # transformers attention splits its projections by head_dim (view(..., -1, head_dim)) or by its head count, which
    # is `num_attention_heads` in ViT and `num_heads` in CLIP, SigLIP and DINOv3: every count it keeps changes.
    for count in ("num_heads", "num_attention_heads"):
        if hasattr(module, count):
            setattr(module, count, int(keep.numel()))
    module.head_dim = head_dim
    if hasattr(module, "attn_dim"):
        module.attn_dim = module.num_heads * head_dim
    pruned_class = _PRUNED_CLASSES.get(type(module))
    if pruned_class is not None:
        module.__class__ = pruned_class
    return changes


def prune_heads(model: nn.Module, heads: HeadsToPrune) -> list[ParameterSlice]:
    """Physically remove attention heads, layer by layer; the model is changed in place.

    The pruned model computes what the unpruned one computes under [`head_mask`][gmar_lightning.heads.masking.head_mask]
    with the same heads zeroed (up to float rounding). Everything is checked before anything changes, so a bad request
    leaves the model as it was. Parameters that change are replaced by new ``nn.Parameter`` objects; the returned slices
    let [`slice_optimizer_state`][gmar_lightning.heads.pruning.slice_optimizer_state] carry an optimizer's state over.

    Args:
        model: A timm ViT (vit, deit, beit, eva families) or ``torch.compile`` of one, possibly pruned before.
        heads: What to remove, by *original* head index (a head keeps its index when others go): a mapping
            ``{layer index or name: [head, ...]}``, or an ``[L, H_original]`` keep-mask (1 keep, 0 remove, NaN allowed
            for heads already removed) in [`find_attention_layers`][gmar_lightning.capture.find_attention_layers] order.

    Returns:
        One [`ParameterSlice`][gmar_lightning.heads.pruning.ParameterSlice] per replaced parameter.

    Raises:
        ValueError: If ``heads`` names a layer or head the model does not have, or a layer normalises the
            concatenated heads (``scale_norm``).
        TypeError: If an attention layer to prune is not a supported timm class.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
        >>> before = sum(p.numel() for p in vit.parameters())
        >>> _ = prune_heads(vit, torch.tensor([[1, 0], [1, 1]]))
        >>> before - sum(p.numel() for p in vit.parameters())  # 3 * 8 * 16 qkv weights + 24 biases + 8 * 16 in proj
        536
    """
    eager = unwrap_model(model)
    layers = head_layers(eager)
    removals = _removals(layers, heads)
    for layer, remove in zip(layers, removals, strict=True):
        if remove:
            _check_prunable(layer, remove)
    changes: list[ParameterSlice] = []
    for layer, remove in zip(layers, removals, strict=True):
        if remove:
            changes.extend(_prune_layer(layer.module, remove, _bias_owner(eager, layer)))
    return changes


def _bias_owner(model: nn.Module, layer: AttentionLayer) -> nn.Module:
    """Where a layer's relative-position-bias table lives: on timm's attention module itself; in transformers BEiT,
    on the ``relative_position_bias`` module of the layer that encloses the attention (no table: the module)."""
    if not _is_transformers_attention(layer.module):
        return layer.module
    table_module = getattr(model.get_submodule(layer.name.rpartition(".")[0]), "relative_position_bias", None)
    return layer.module if table_module is None else table_module


def weight_magnitude_importance(model: nn.Module) -> Tensor:
    """Each head's weight magnitude: the L2 norm of its ``q``, ``k``, ``v`` rows and its ``proj`` columns.

    The classic structured-pruning criterion, needing no data. Biases and relative-position tables are left out.

    Returns:
        ``[L, H_original]`` float32 by original head index; NaN where a head was already removed.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> _ = prune_heads(vit, {0: [1]})
        >>> weight_magnitude_importance(vit).isnan().tolist()
        [[False, True], [False, False]]
    """
    layers = head_layers(model)
    width = max(_original_count(layer.module) for layer in layers)
    importance = torch.full((len(layers), width), float("nan"))
    for index, layer in enumerate(layers):
        module = layer.module
        head_dim, num_heads = _head_dim(module), num_heads_of(module)
        if getattr(module, "qkv", None) is not None:
            inputs = module.qkv.weight.detach().float().reshape(3, num_heads, head_dim, -1).transpose(0, 1)
        else:
            projections = (module.q_proj, module.k_proj, module.v_proj)
            inputs = torch.stack([p.weight.detach().float().reshape(num_heads, head_dim, -1) for p in projections], 1)
        outputs = output_projection(module).weight.detach().float().reshape(-1, num_heads, head_dim).transpose(0, 1)
        squares = inputs.square().flatten(1).sum(dim=1) + outputs.square().flatten(1).sum(dim=1)
        importance[index, _kept_indices(module)] = squares.sqrt().cpu()
    return importance


def restore_pruning(model: nn.Module, state_dict: Mapping[str, Any]) -> list[ParameterSlice]:
    """Prune ``model`` the way the model that wrote ``state_dict`` was pruned, so the state dict loads into it.

    Reads the ``<layer>.kept_heads`` entries (any key prefix, e.g. Lightning's ``model.``). Layers already pruned the
    same way are left alone, so calling it twice is harmless.

    Raises:
        ValueError: If the state dict keeps a head the model has already lost, or its head count differs.
    """
    layers = head_layers(model)
    removals: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        current = torch.zeros(_original_count(layer.module), dtype=torch.bool)
        current[_kept_indices(layer.module).cpu()] = True
        suffix = f"{layer.name}.{KEPT_HEADS}"
        keys = [key for key in state_dict if key == suffix or key.endswith(f".{suffix}")]
        if not keys:
            if not bool(current.all()) and _has_layer_weights(state_dict, layer):
                # Saved before this layer lost heads (a pre-pruning checkpoint, e.g. ckpt_path="best"): its weights
                # hold every head, which the pruned model has no room for.
                _refuse_state_dict(layer, None, current)
            continue
        stored = torch.as_tensor(state_dict[min(keys, key=len)]).bool().cpu()
        if stored.shape != current.shape or bool((stored & ~current).any()):
            _refuse_state_dict(layer, stored, current)
        if bool((current & ~stored).any()):
            removals[index] = (current & ~stored).nonzero().flatten().tolist()
    return prune_heads(model, removals) if removals else []


def _has_layer_weights(state_dict: Mapping[str, Any], layer: AttentionLayer) -> bool:
    """Whether ``state_dict`` holds the weights of ``layer`` (under any key prefix)."""
    names = [f"{layer.name}.{name}" for name, _ in layer.module.named_parameters()]
    return any(key == name or key.endswith(f".{name}") for key in state_dict for name in names)


def _refuse_state_dict(layer: AttentionLayer, stored: Tensor | None, current: Tensor) -> None:
    """One line saying why the state dict does not fit and how to load it (``stored`` None: saved unpruned)."""
    fresh = "load it into a freshly built model, which is pruned to match, e.g. `YourModule.load_from_checkpoint(path)`"
    have = f"the model has heads {current.nonzero().flatten().tolist()} of {current.numel()}"
    if stored is None:
        raise ValueError(
            f"`state_dict` has every head of layer `{layer.name}`, but {have}: it was saved before the pruning; "
            f"{fresh}."
        )
    raise ValueError(
        f"`state_dict` keeps heads {stored.nonzero().flatten().tolist()} of {stored.numel()} in layer `{layer.name}`, "
        f"but {have}; build the model with the checkpoint's architecture: {fresh}."
    )


def slice_optimizer_state(optimizer: torch.optim.Optimizer, changes: Sequence[ParameterSlice]) -> None:
    """Point ``optimizer`` at the pruned parameters and slice their state (Adam moments, momentum) to match.

    Every state tensor shaped like its parameter is sliced the way the parameter was; scalars (Adam's ``step``) are
    kept. The state of the remaining heads is therefore exactly what it was, never reset.

    Raises:
        ValueError: If a state tensor is neither a scalar nor shaped like its parameter (the optimizer keeps some
            other layout, e.g. Adafactor's factored moments), since slicing it could silently corrupt it.
    """
    by_old = {id(change.old): change for change in changes}
    for group in optimizer.param_groups:
        for position, parameter in enumerate(group["params"]):
            change = by_old.get(id(parameter))
            if change is None:
                continue
            group["params"][position] = change.new
            state = optimizer.state.pop(parameter, None)
            if state is None:
                continue
            sliced = {}
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == parameter.shape and value.dim() > 0:
                    value = value.index_select(change.dim, change.index.to(value.device))
                elif isinstance(value, Tensor) and value.dim() > 0:
                    raise ValueError(
                        f"`optimizer` ({type(optimizer).__name__}) state '{key}' has shape {list(value.shape)}, not "
                        f"the parameter's {list(parameter.shape)}; slice_optimizer_state cannot prune it."
                    )
                sliced[key] = value
            optimizer.state[change.new] = sliced


def restore_pruning_on_load(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` prune the module's ViT like the state dict's first (idempotent).

    Registers a load-state-dict pre-hook calling [`restore_pruning`][gmar_lightning.heads.pruning.restore_pruning],
    so a fresh module loads a pruned checkpoint: ``Trainer.fit(ckpt_path=...)``,
    ``LightningModule.load_from_checkpoint`` or a plain ``load_state_dict``.
    """
    if getattr(module, "_gmar_restores_pruning", False):
        return

    def hook(owner: nn.Module, state_dict: Mapping[str, Any], *_: Any) -> None:
        restore_pruning(owner, state_dict)

    module.register_load_state_dict_pre_hook(hook)
    module._gmar_restores_pruning = True


def present_heads(model: nn.Module) -> Tensor:
    """``[L, H]`` bool over the head grid (original indices): which heads the model still has."""
    layers = head_layers(model)
    present = torch.zeros(len(layers), max(_original_count(layer.module) for layer in layers), dtype=torch.bool)
    for index, layer in enumerate(layers):
        present[index, _kept_indices(layer.module)] = True
    return present


def select_heads(importance: Tensor, present: Tensor, count: int, min_heads_per_layer: int = 0) -> dict[int, list[int]]:
    """The ``count`` least important present heads, keeping at least ``min_heads_per_layer`` heads in every layer.

    Ties go layer-major (earlier layer, then lower head index first). Fewer than ``count`` heads come back when the
    per-layer minimum leaves no more to take.

    Args:
        importance: ``[L, H]`` scores by original head index; entries of missing heads are ignored.
        present: ``[L, H]`` bool, the heads the model has
            ([`present_heads`][gmar_lightning.heads.pruning.present_heads]).
        count: How many heads to select.
        min_heads_per_layer: Heads each layer keeps at least.

    Returns:
        ``{layer: [head, ...]}`` for [`prune_heads`][gmar_lightning.heads.pruning.prune_heads].

    Examples:
        >>> importance = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.05, 0.4]])
        >>> select_heads(importance, torch.ones(2, 3, dtype=torch.bool), 3, min_heads_per_layer=2)
        {0: [0], 1: [1]}
    """
    if importance.shape != present.shape:
        raise ValueError(
            f"`importance` must have the model's head-grid shape {list(present.shape)}, got {list(importance.shape)}."
        )
    scores = importance.detach().float().cpu().masked_fill(~present.cpu(), float("inf")).flatten()
    if bool(scores[present.cpu().flatten()].isnan().any()):
        raise ValueError("`importance` is NaN for a head the model has; every present head needs a score.")
    remaining = present.sum(dim=1).tolist()
    num_heads = present.shape[1]
    chosen: dict[int, list[int]] = {}
    for flat in torch.sort(scores, stable=True).indices.tolist()[: int(present.sum())]:
        if sum(len(heads) for heads in chosen.values()) == count:
            break
        layer, head = divmod(flat, num_heads)
        if remaining[layer] > min_heads_per_layer:
            remaining[layer] -= 1
            chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def measure_throughput(model: nn.Module, images: Tensor, repeats: int = 3) -> float:
    """Images per second of ``model(images)`` in eval mode without gradients: the median of ``repeats`` timed runs
    after one warm-up. The model's training flags are restored."""
    with eval_mode(model), torch.inference_mode():
        model(images)
        seconds = []
        for _ in range(repeats):
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            start = time.perf_counter()
            model(images)
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            seconds.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(seconds)


@dataclass(frozen=True)
class PruningEvent:
    """Heads that left the model between two rows of a [`HeadTrajectory`][gmar_lightning.trajectory.HeadTrajectory].

    Attributes:
        row: The first row without them; the pruning happened after row ``row - 1`` was recorded.
        step_before: The step of row ``row - 1``, the last evaluation of the model before the pruning.
        step_after: The step of row ``row``, the first evaluation after it.
        removed: ``{layer index: [head, ...]}`` by original head index.
    """

    row: int
    step_before: int
    step_after: int
    removed: dict[int, list[int]]


def pruning_events(trajectory: HeadTrajectory) -> list[PruningEvent]:
    """Where heads left the model during a run, read from a trajectory alone: a head that has a weight in one row
    and is NaN (missing) in the next was pruned in between.

    For marking trajectory plots (GMAR weights renormalise over the heads a layer has left, so the lines jump there)
    without the pruning callback's own log; ``HeadPruning``'s ``head_pruning.json`` has the exact training step.

    Examples:
        >>> nan = float("nan")
        >>> weights = torch.tensor([[[0.5, 0.5]], [[1.0, nan]], [[1.0, nan]]])
        >>> trajectory = HeadTrajectory([0, 1, 2], [10, 20, 30], weights, weights)
        >>> pruning_events(trajectory)
        [PruningEvent(row=1, step_before=10, step_after=20, removed={0: [1]})]
    """
    present = ~trajectory.weights.isnan()
    events = []
    for row in range(1, len(trajectory)):
        gone = present[row - 1] & ~present[row]
        if bool(gone.any()):
            removed = {layer: gone[layer].nonzero().flatten().tolist() for layer in range(gone.shape[0])}
            events.append(
                PruningEvent(
                    row=row,
                    step_before=trajectory.steps[row - 1],
                    step_after=trajectory.steps[row],
                    removed={layer: heads for layer, heads in removed.items() if heads},
                )
            )
    return events


def measure_speedup(before: nn.Module, after: nn.Module, images: Tensor, rounds: int = 5) -> float:
    """How many times faster ``after(images)`` runs than ``before(images)``, timed interleaved.

    Each round times one forward of each model, alternating which goes first, so a change of machine load during the
    measurement slows both alike; the result is the ratio of the two medians (above 1: ``after`` is faster). Both
    models run in eval mode without gradients after one warm-up each; their training flags are restored.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> measure_speedup(vit, vit, torch.randn(2, 3, 16, 16)) > 0
        True
    """
    check_positive_int("rounds", rounds)
    models = (before, after)
    seconds: tuple[list[float], list[float]] = ([], [])
    with eval_mode(before), eval_mode(after), torch.inference_mode():
        for model in models:
            model(images)
        for round_index in range(rounds):
            order = (0, 1) if round_index % 2 == 0 else (1, 0)
            for which in order:
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
                start = time.perf_counter()
                models[which](images)
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
                seconds[which].append(time.perf_counter() - start)
    return statistics.median(seconds[0]) / statistics.median(seconds[1])


def prune_gradually(
    model: nn.Module,
    count: int,
    steps: int,
    importance: Callable[[nn.Module], Tensor],
    fine_tune: Callable[[nn.Module], object],
    min_heads_per_layer: int = 0,
) -> list[dict[int, list[int]]]:
    """Remove ``count`` heads in ``steps`` equal steps, each followed by a fine-tune (Michel et al. prune iteratively).

    Before each step the heads the model still has are scored again by ``importance`` on the model as it is then, so
    a head is judged by its role in the pruned, fine-tuned model; step ``k`` brings the total removed to
    ``count * k // steps``. One step is one-shot pruning followed by one fine-tune.
    [`HeadPruning`][gmar_lightning.callback.head_pruning.HeadPruning] does the same inside a Lightning fit.

    Args:
        model: A model [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] supports; changed in place.
        count: Heads to remove in all.
        steps: Pruning steps, at least 1.
        importance: ``model -> [L, H]`` scores by original head index (low = removed first), e.g.
            ``weight_magnitude_importance`` or the mean GMAR head weights of ``explain``.
        fine_tune: Called with the model after each step (e.g. a recovery fine-tune).
        min_heads_per_layer: Heads each layer keeps at least.

    Returns:
        The heads removed at each step, as ``{layer: [head, ...]}``.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> scores = lambda model: torch.tensor([[0.1, 0.4], [0.3, 0.2]])  # e.g. weight_magnitude_importance
        >>> prune_gradually(vit, 2, 2, scores, fine_tune=lambda model: None)
        [{0: [0]}, {1: [1]}]
        >>> head_counts(vit)
        [1, 1]
    """
    check_positive_int("steps", steps)
    check_int_in_range("count", count, 0, int(present_heads(model).sum()))
    removed: list[dict[int, list[int]]] = []
    for step in range(1, steps + 1):
        present = present_heads(model)
        target = count * step // steps - sum(len(heads) for step_heads in removed for heads in step_heads.values())
        heads = select_heads(importance(model), present, target, min_heads_per_layer)
        prune_heads(model, heads)
        removed.append(heads)
        fine_tune(model)
    return removed


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 0.5, temperature: float = 2.0
) -> Tensor:
    """Knowledge-distillation loss for the recovery fine-tune of a pruned model (Hinton et al., 2015).

    ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the KL
    term averaged over the batch. The ``T^2`` keeps the soft term's gradients on the scale of the hard term's.

    Args:
        student_logits: ``[B, C]`` logits of the model being fine-tuned.
        teacher_logits: ``[B, C]`` logits of the teacher (usually the model before pruning); no gradient flows to it.
        labels: ``[B]`` class indices.
        alpha: Weight of the distillation term in ``[0, 1]``; 0 is plain cross-entropy.
        temperature: Softening temperature ``T > 0``.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> labels = torch.tensor([0, 1])
        >>> bool(torch.isclose(distillation_loss(logits, logits, labels, alpha=0.0), F.cross_entropy(logits, labels)))
        True
        >>> float(distillation_loss(logits, logits, labels, alpha=1.0))  # the student already matches its teacher
        0.0
    """
    check_number_in_range("alpha", alpha, 0.0, 1.0)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"`teacher_logits` must have the student's shape {list(student_logits.shape)}, got "
            f"{list(teacher_logits.shape)}; distil from a teacher with the same classes."
        )
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft
