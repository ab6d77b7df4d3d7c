"""Pure tensor functions of the explanation methods: head scores and weights, head fusion, rollout.

Nothing here knows about models or hooks. Shapes use ``B`` images, ``L`` layers, ``H`` heads and ``N`` tokens.
Rollouts propagate only the read-out row vector through the layers (``[B, N] @ [B, N, N]`` per layer), never a chain
of full ``N x N`` products: ``v^T (A_L ... A_1) = (...((v^T A_L) A_{L-1}) ...) A_1``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

HeadNorm = Literal["layer", "global"]
GradNorm = Literal["l1", "l2"]


def head_scores(grad: Tensor, norm: GradNorm) -> Tensor:
    """Score each head by the norm of its attention gradient: ``[B, H, N, N] -> [B, H]``.

    ``l1``: ``s_h = sum_ij |G_hij|``; ``l2``: ``s_h = sqrt(sum_ij G_hij^2)``.

    Examples:
        >>> grad = torch.tensor([[[[3.0, -4.0]], [[0.0, 1.0]]]])  # B=1, H=2, a 1x2 "matrix" per head
        >>> head_scores(grad, "l1").tolist(), head_scores(grad, "l2").tolist()
        ([[7.0, 1.0]], [[5.0, 1.0]])
    """
    return torch.linalg.vector_norm(grad.float(), ord=1 if norm == "l1" else 2, dim=(-2, -1))


def layer_head_weights(scores: Tensor) -> Tensor:
    """Normalise head scores over the heads of each layer: ``w_h = s_h / sum_h s_h``; all-zero rows become ``1/H``.

    Works on any ``[..., H]`` tensor.

    Examples:
        >>> layer_head_weights(torch.tensor([[3.0, 1.0], [0.0, 0.0]])).tolist()
        [[0.75, 0.25], [0.5, 0.5]]
    """
    totals = scores.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(totals > 0, scores / totals.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def layer_shares(scores: Tensor) -> Tensor:
    """Each layer's share of the total head score of its image: ``[B, L, H] -> [B, L]``.

    Global head normalisation divides every score by the sum over all layers and heads, so a layer's fused attention
    is its per-layer fusion scaled by this share. A layer whose scores are all zero keeps uniform head weights
    ``1/H`` (share 1) rather than vanishing, so it still contributes plain attention to the rollout.

    Examples:
        >>> layer_shares(torch.tensor([[[3.0, 1.0], [1.0, 3.0], [0.0, 0.0]]])).tolist()
        [[0.5, 0.5, 1.0]]
    """
    per_layer = scores.sum(dim=-1)
    total = per_layer.sum(dim=-1, keepdim=True)
    shares = per_layer / total.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(per_layer > 0, shares, torch.ones_like(shares))


def head_weights(scores: Tensor, head_norm: HeadNorm) -> Tensor:
    """Head weights ``w_{l,h}`` from raw scores ``[B, L, H]``, normalised per layer or over all layers and heads.

    ``layer``: ``w_{l,h} = s_{l,h} / sum_h s_{l,h}``. ``global``: ``w_{l,h} = s_{l,h} / sum_{l,h} s_{l,h}``.
    Either way a layer whose scores are all zero gets ``1/H``, never NaN.

    Examples:
        >>> s = torch.tensor([[[3.0, 1.0], [1.0, 3.0], [0.0, 0.0]]])
        >>> head_weights(s, "layer")[0].tolist()
        [[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]
        >>> head_weights(s, "global")[0].tolist()
        [[0.375, 0.125], [0.125, 0.375], [0.5, 0.5]]
    """
    weights = layer_head_weights(scores)
    if head_norm == "global":
        weights = weights * layer_shares(scores).unsqueeze(-1)
    return weights


def fuse_heads(attention: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of a layer's heads: ``sum_h w_h A_h``, ``[B, H, N, N]`` with ``[B, H]`` -> ``[B, N, N]``."""
    batch, heads, tokens, _ = attention.shape
    mixed = torch.bmm(weights.to(attention.dtype).unsqueeze(1), attention.reshape(batch, heads, tokens * tokens))
    return mixed.reshape(batch, tokens, tokens).float()


def discard_lowest(fused: Tensor, ratio: float, keep_tokens: Tensor) -> Tensor:
    """Zero the lowest ``ratio`` of each image's ``[N, N]`` entries, never the diagonal entries of ``keep_tokens``.

    This is the noise filter of Abnar & Zuidema-style rollout code; the read-out tokens' own diagonal entries are kept
    so that their rows never vanish.

    Examples:
        >>> fused = torch.tensor([[[0.1, 0.9], [0.6, 0.4]]])
        >>> discard_lowest(fused, 0.5, keep_tokens=torch.tensor([0])).tolist()
        [[[0.10000000149011612, 0.8999999761581421], [0.6000000238418579, 0.0]]]
    """
    if ratio <= 0:
        return fused
    batch, num_tokens, _ = fused.shape
    flat = fused.reshape(batch, -1)
    protected = torch.zeros(num_tokens * num_tokens, dtype=torch.bool, device=fused.device)
    protected[keep_tokens * num_tokens + keep_tokens] = True
    lowest = flat.topk(int(flat.shape[-1] * ratio), dim=-1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True) & ~protected
    return flat.masked_fill(drop, 0.0).reshape_as(fused)


def propagate_rollout(readout: Tensor, layers: list[Tensor], residual: float) -> Tensor:
    """Read-out row of the attention rollout ``R = Ahat_L ... Ahat_1``: returns ``readout @ R``, ``[B, N]``.

    ``Ahat_l = (r I + (1 - r) A_l) / rowsum``, the skip connection of Abnar & Zuidema's rollout with rows renormalised
    to sum 1. ``layers`` are the fused ``[B, N, N]`` matrices ``A_l`` in forward order; ``readout`` is ``[B, N]``
    (one-hot rows of the pooled tokens, averaged). Because ``v^T Ahat = r u + (1 - r) u^T A`` with
    ``u_i = v_i / (r + (1 - r) sum_j A_ij)``, each layer costs one vector-matrix product and no ``N x N`` temporary.

    Examples:
        >>> layer = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
        >>> propagate_rollout(torch.tensor([[1.0, 0.0]]), [layer, layer], residual=0.5).tolist()
        [[0.25, 0.75]]
    """
    row = readout.float()
    for fused in reversed(layers):
        row_sums = residual + (1.0 - residual) * fused.sum(dim=-1)
        scaled = row / row_sums.clamp_min(torch.finfo(row_sums.dtype).tiny)
        row = residual * scaled + (1.0 - residual) * torch.bmm(scaled.unsqueeze(1), fused).squeeze(1)
    return row


def propagate_gradient_rollout(readout: Tensor, relevances: list[Tensor]) -> Tensor:
    """Read-out row of Chefer et al.'s (2021) generic rule ``R <- R + Abar_l R`` from ``R = I``: ``[B, N]``.

    ``relevances`` are the per-layer ``Abar_l = mean_h((G_l * A_l)^+)`` in forward order; the product
    ``(I + Abar_L) ... (I + Abar_1)`` is applied to the read-out row from the last layer down.

    Examples:
        >>> relevance = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> propagate_gradient_rollout(torch.tensor([[1.0, 0.0]]), [relevance]).tolist()
        [[1.0, 1.0]]
    """
    row = readout.float()
    for relevance in reversed(relevances):
        row = row + torch.bmm(row.unsqueeze(1), relevance.float()).squeeze(1)
    return row


def positive_relevance(attention: Tensor, grad: Tensor) -> Tensor:
    """Chefer et al.'s per-layer relevance ``mean_h((G * A)^+)``: ``[B, H, N, N]`` pair -> ``[B, N, N]``."""
    return (grad.float() * attention.float()).clamp_min(0).mean(dim=1)


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each ``[..., H, W]`` map to ``[0, 1]``; a constant map becomes all zeros.

    Examples:
        >>> normalize_maps(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])).tolist()
        [[[0.0, 1.0]], [[0.0, 0.0]]]
    """
    flat = maps.flatten(start_dim=-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.reshape_as(maps)
