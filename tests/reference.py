"""A deliberately plain reference of every method: full attention and gradient tensors, full N x N products.

It shares no code with the package beyond timm itself, so agreement between the two is evidence, not tautology. The
token layout (prefix tokens, read-out, patch grid) and, for hierarchical models, every layer's global token-mixing
matrix and every map between token spaces are stated by the caller (the tests), never taken from the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ToGlobal = Callable[[Tensor], Tensor]
"""Places a layer's captured ``[B * W, H, n_q, n_k]`` tensor into its global ``[B, H, N, N]`` token matrix."""


@dataclass
class Layer:
    """One attention layer of a structure: how its windows sit in the token space and which tokens it updates."""

    to_global: ToGlobal | None = None  # None: the capture already is [B, H, N, N]
    queried: list[int] | None = None  # None: every token is a query; others keep an identity row
    branches: int = 1  # parallel attention branches of one block: their heads are the layer's heads


Structure = list["Layer | Tensor"]
"""Forward order: attention layers and dense ``[N_new, N_old]`` maps between token spaces."""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that calls an ``attn_drop`` submodule on its attention probabilities, in registration order."""
    return [m for m in model.modules() if isinstance(getattr(m, "attn_drop", None), nn.Module)]


Inputs = list[tuple[nn.Module, Callable[[Tensor], Tensor]]]
"""Where to capture: the module whose first input is the attention, and how to lay it out as ``[B', H, n_q, n_k]``."""


def capture_full(
    model: nn.Module, images: Tensor, target: Tensor | None = None, inputs: Inputs | None = None
) -> tuple[list, list, Tensor, Tensor]:
    """Every layer's attention ``[B', H, n_q, n_k]`` and its gradient of the summed target logits.

    By default the input of every ``attn_drop``; ``inputs`` names other capture points.
    """
    modules = attention_modules(model)
    saved_flags = [getattr(m, "fused_attn", None) for m in modules]
    inputs = [(m.attn_drop, lambda a: a) for m in modules] if inputs is None else inputs
    attentions: list[Tensor] = []
    handles = [point.register_forward_hook(lambda _m, inp, _out: attentions.append(inp[0])) for point, _ in inputs]
    was_training = model.training
    try:
        for m, flag in zip(modules, saved_flags, strict=True):
            if flag is not None:
                m.fused_attn = False
        model.eval()
        with torch.enable_grad():
            logits = model(images.clone().requires_grad_(True))
            targets = logits.argmax(-1) if target is None else target
            objective = logits[torch.arange(len(targets)), targets].sum()
            grads = list(torch.autograd.grad(objective, attentions))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(modules, saved_flags, strict=True):
            if flag is not None:
                m.fused_attn = flag
        model.train(was_training)
    attentions = [layout(a) for a, (_, layout) in zip(attentions, inputs, strict=True)]
    grads = [layout(g) for g, (_, layout) in zip(grads, inputs, strict=True)]
    # Windows kept in their own dimension ([B, W, H, n, n], Twins) become [B * W, H, n, n], image-major.
    attentions = [a.flatten(0, 1) if a.dim() == 5 else a for a in attentions]
    grads = [g.flatten(0, 1) if g.dim() == 5 else g for g in grads]
    return [a.detach() for a in attentions], grads, logits.detach(), targets


def zeroed_output_columns(attentions: list[nn.Module], keep: Tensor, head_dim: int, output: str) -> None:
    """Reference head masking: zero the input columns of the dropped heads in each attention's output projection.

    ``attentions`` are one model's attention modules in layer order (the caller finds them, on a copy it owns),
    ``keep`` is ``[L, H]`` with 1 for a kept head and 0 for a dropped one, and ``output`` names the projection that
    reads the concatenated heads (``proj`` in timm, ``o_proj`` in Hugging Face transformers 5).
    """
    with torch.no_grad():
        for module, row in zip(attentions, keep, strict=True):
            getattr(module, output).weight.mul_(row.repeat_interleave(head_dim))


def fuse_heads(method: str, attention: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """One image's layer: its ``[H, n_q, n_k]`` attention fused over heads into ``[n_q, n_k]`` and, for GMAR, the
    ``[H]`` head weights (each head's gradient norm over the layer's sum)."""
    if method in ("gmar_l1", "gmar_l2"):
        scores = grad.abs().sum((1, 2)) if method == "gmar_l1" else grad.pow(2).sum((1, 2)).sqrt()
        weights = scores / scores.sum()
        return (weights[:, None, None] * attention).sum(0), weights
    if method == "grad_rollout":
        return (grad * attention).clamp(min=0).mean(0), None
    return attention.mean(0), None


def roll_out_row(row: Tensor, matrices: list[Tensor], method: str, pooled: bool) -> Tensor:
    """The read-out ``row`` carried down through one image's fused ``[N, N]`` layer matrices (forward order), as
    Abnar & Zuidema roll out: identity added with weight 0.5 and rows renormalised (``grad_rollout``: identity added,
    no renormalising); ``attention`` reads the last layer alone, or the pool's row as it is (``pooled``)."""
    eye = torch.eye(row.shape[-1], dtype=row.dtype)
    if method == "attention":
        return row if pooled else row @ matrices[-1]
    for matrix in reversed(matrices):
        if method == "grad_rollout":
            row = row @ (eye + matrix)
        else:
            mixed = 0.5 * eye + 0.5 * matrix
            row = row @ (mixed / mixed.sum(-1, keepdim=True))
    return row


def readout_rows(matrix: Tensor, readout: list[int] | Tensor) -> Tensor:
    """Mean of the read-out tokens' rows of ``[B, N, M]``, or the sum of its rows weighted by an ``[N]`` tensor."""
    if isinstance(readout, Tensor):
        return torch.einsum("n,bnm->bm", readout.to(matrix.device), matrix)
    return matrix[:, readout, :].mean(dim=1)


def _identity_rows(fused: Tensor, queried: list[int] | None) -> Tensor:
    """Tokens that are no query of the layer keep their value: an identity row."""
    if queried is None:
        return fused
    num_tokens = fused.shape[-1]
    passive = [i for i in range(num_tokens) if i not in set(queried)]
    fused = fused.clone()
    fused[:, passive, :] = 0
    fused[:, passive, passive] = 1
    return fused


def reference_explain(
    model: nn.Module,
    images: Tensor,
    method: str,
    *,
    target: Tensor | None = None,
    inputs: Inputs | None = None,
    **options,
) -> tuple[Tensor, Tensor | None]:
    """Token maps ``[B, h, w]`` and head weights of a timm model: :func:`capture_full`, then
    :func:`reference_from_attention` with ``options``."""
    attentions, grads, _, _ = capture_full(model, images, target, inputs)
    return reference_from_attention(attentions, grads, method, **options)


def reference_from_attention(
    attentions: list[Tensor],
    grads: list[Tensor],
    method: str,
    *,
    num_prefix: int,
    readout: list[int] | Tensor | None,
    grid: tuple[int, int],
    structure: Structure | None = None,
    residual: float = 0.5,
    head_norm: str = "layer",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Token maps ``[B, h, w]`` and head weights ``[B, L, H_max]`` (GMAR; NaN for absent heads), the slow way, from
    every captured attention ``[B', H, n_q, n_k]`` and its gradient.

    ``num_prefix`` and ``grid`` describe the first token space; ``readout`` lists the read-out tokens of the last
    space (``None``: the mean of its tokens after ``num_prefix``), or weighs its rows with an ``[N]`` tensor.
    ``structure`` defaults to one global layer per captured attention.
    """
    structure = [Layer() for _ in attentions] if structure is None else structure
    layers = [step for step in structure if isinstance(step, Layer)]
    assert sum(layer.branches for layer in layers) == len(attentions), (len(layers), len(attentions))
    grouped_attentions, grouped_grads, start = [], [], 0
    for layer in layers:  # a block's parallel branches are one layer with all their heads
        grouped_attentions.append(torch.cat(attentions[start : start + layer.branches], dim=1))
        grouped_grads.append(torch.cat(grads[start : start + layer.branches], dim=1))
        start += layer.branches
    attentions, grads = grouped_attentions, grouped_grads

    def placed(layer: Layer, tensor: Tensor) -> Tensor:
        return tensor if layer.to_global is None else layer.to_global(tensor)

    head_attention = [placed(layer, a) for layer, a in zip(layers, attentions, strict=True)]
    batch, device = head_attention[0].shape[0], head_attention[0].device
    weights_out = None
    if method in ("gmar_l1", "gmar_l2"):
        per_image = [g.unflatten(0, (batch, -1)) for g in grads]  # [B, W, H, n_q, n_k]: every window of an image
        if method == "gmar_l1":
            scores = [g.abs().sum(dim=(1, 3, 4)) for g in per_image]
        else:
            scores = [g.pow(2).sum(dim=(1, 3, 4)).sqrt() for g in per_image]
        if head_norm == "layer":
            weights = [s / s.sum(dim=1, keepdim=True) for s in scores]
        else:
            total = sum(s.sum(dim=1, keepdim=True) for s in scores)
            weights = [s / total for s in scores]
        # A layer the target does not depend on (all scores zero) gets uniform weights 1/H, never NaN.
        weights = [
            torch.where(s.sum(dim=1, keepdim=True) > 0, w, 1.0 / s.shape[1])
            for s, w in zip(scores, weights, strict=True)
        ]
        width = max(w.shape[1] for w in weights)
        weights_out = torch.stack([nn.functional.pad(w, (0, width - w.shape[1]), value=math.nan) for w in weights], 1)
        fused_layers = [(w[:, :, None, None] * a).sum(1) for w, a in zip(weights, head_attention, strict=True)]
    elif method == "grad_rollout":
        fused_layers = [
            placed(layer, (g * a).clamp(min=0)).mean(1) for layer, g, a in zip(layers, grads, attentions, strict=True)
        ]
    else:
        fused_layers = [a.mean(1) for a in head_attention]
    if discard_ratio > 0 and method != "grad_rollout":
        # Windowed layers discard among the entries they compute (every window's), never a slot's own diagonal; the
        # windows must hold no padding here (every slot is a token, and every token is read out through the maps).
        for index, layer in enumerate(layers):
            if layer.to_global is None:
                continue
            windows = attentions[index].unflatten(0, (batch, -1))  # [B, W, H, n, n]
            heads = windows.shape[2]
            layer_weights = weights[index] if weights_out is not None else torch.full((batch, heads), 1.0 / heads)
            fused = (layer_weights.to(windows.device)[:, None, :, None, None] * windows).sum(2)  # [B, W, n, n]
            slots = fused.shape[-1]
            for b in range(batch):
                flat = fused[b].flatten()
                lowest = flat.argsort()[: int(flat.numel() * discard_ratio)].tolist()
                flat[[i for i in lowest if (i // slots) % slots != i % slots]] = 0
                fused[b] = flat.view_as(fused[b])
            fused_layers[index] = layer.to_global(fused.flatten(0, 1)[:, None])[:, 0]

    first_tokens = num_prefix + grid[0] * grid[1]
    relevance = torch.eye(first_tokens, device=device).expand(batch, first_tokens, first_tokens)
    index = 0
    for step in structure:
        if not isinstance(step, Layer):
            relevance = step.to(relevance.device) @ relevance
            continue
        fused, used = fused_layers[index], index >= start_layer
        num_tokens = fused.shape[-1]
        eye = torch.eye(num_tokens, device=device).expand(batch, num_tokens, num_tokens)
        if method == "attention":
            if index == len(layers) - 1:
                relevance = _identity_rows(fused, step.queried) @ relevance
        elif method == "grad_rollout":
            if used:
                relevance = relevance + fused @ relevance
        elif used:
            fused = fused.clone()
            if discard_ratio > 0 and step.to_global is None:
                for b in range(batch):
                    flat = fused[b].flatten()
                    lowest = flat.argsort()[: int(flat.numel() * discard_ratio)]
                    keep = readout if readout is not None else range(num_prefix, num_tokens)
                    keep = keep.nonzero().flatten().tolist() if isinstance(keep, Tensor) else keep
                    lowest = [
                        i
                        for i in lowest.tolist()
                        if not (i // num_tokens == i % num_tokens and i // num_tokens in keep)
                    ]
                    flat[lowest] = 0
                    fused[b] = flat.view(num_tokens, num_tokens)
            mixed = _identity_rows(residual * eye + (1 - residual) * fused, step.queried)
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            relevance = mixed @ relevance
        index += 1
    last_tokens = relevance.shape[1]
    rows = readout_rows(relevance, list(range(num_prefix, last_tokens)) if readout is None else readout)
    return rows[:, num_prefix:].reshape(batch, *grid), weights_out
