"""Pure tensor functions of the explanation methods: head scores and weights, head fusion, rollout.

Nothing here knows about models or hooks. Shapes use ``B`` images, ``L`` layers, ``H`` heads and ``N`` tokens. Layers
with different head counts (after [`prune_heads`][gmar_lightning.heads.pruning.prune_heads]) share one ``[..., L, H]``
grid whose missing heads are NaN; the score and weight functions below ignore NaN entries and keep them NaN. Rollouts
propagate only the read-out row vector through the layers (``[B, N] @ [B, N, N]`` per layer), never a chain of full
``N x N`` products: ``v^T (A_L ... A_1) = (...((v^T A_L) A_{L-1}) ...) A_1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gmar_lightning.mixing import AttentionMixing, AttentionReadout, TokenMap, TokenPlan

Mixing = AttentionMixing | AttentionReadout

HeadNorm = Literal["layer", "global"]
GradNorm = Literal["l1", "l2"]


def head_scores(grad: Tensor, norm: GradNorm, batch: int | None = None) -> Tensor:
    """Score each head by the norm of its attention gradient: ``[B * W, H, n_q, n_k] -> [B, H]``.

    ``l1``: ``s_h = sum |G_h|``; ``l2``: ``s_h = sqrt(sum G_h^2)``, summed over every query, key and window of an image
    (``W`` windows per image, ``batch`` images; ``W = 1`` when ``batch`` is omitted), accumulated in float64 and
    returned in float32.

    Examples:
        >>> grad = torch.tensor([[[[3.0, -4.0]], [[0.0, 1.0]]]])  # B=1, H=2, a 1x2 "matrix" per head
        >>> head_scores(grad, "l1").tolist(), head_scores(grad, "l2").tolist()
        ([[7.0, 1.0]], [[5.0, 1.0]])
    """
    per_image = grad.unflatten(0, (batch or grad.shape[0], -1))
    # Accumulated in float64 (a float32 sum over a Swin-B/384 head's 186,624 entries is off by ~2e-5), one head at a
    # time so that the float64 copy is one head's gradient, not the layer's; returned in float32.
    order = 1 if norm == "l1" else 2
    scores = [
        torch.linalg.vector_norm(per_image[:, :, head], ord=order, dim=(1, 2, 3), dtype=torch.float64)
        for head in range(per_image.shape[2])
    ]
    if not scores:
        return per_image.new_zeros(per_image.shape[0], 0, dtype=torch.float32)
    return torch.stack(scores, dim=1).float()


def layer_head_weights(scores: Tensor, complete: bool = False) -> Tensor:
    """Normalise head scores over the heads of each layer: ``w_h = s_h / sum_h s_h``; all-zero rows become ``1/H``.

    Works on any ``[..., H]`` tensor. NaN entries (heads a layer does not have) are left out of the sum and of ``H``
    and stay NaN. ``complete=True`` says that no entry is NaN (one layer's own heads), which skips that bookkeeping
    (seven operations per call) and gives the same weights.

    Examples:
        >>> layer_head_weights(torch.tensor([[3.0, 1.0], [0.0, 0.0]])).tolist()
        [[0.75, 0.25], [0.5, 0.5]]
        >>> layer_head_weights(torch.tensor([[3.0, float("nan"), 1.0]])).tolist()
        [[0.75, nan, 0.25]]
    """
    if complete:
        totals = scores.sum(dim=-1, keepdim=True)
        uniform = 1.0 / max(scores.shape[-1], 1)
        return torch.where(totals > 0, scores / totals.clamp_min(torch.finfo(scores.dtype).tiny), uniform)
    present = ~scores.isnan()
    totals = scores.nansum(dim=-1, keepdim=True)
    uniform = 1.0 / present.sum(dim=-1, keepdim=True).clamp_min(1).to(scores.dtype)
    weights = torch.where(totals > 0, scores / totals.clamp_min(torch.finfo(scores.dtype).tiny), uniform)
    return weights.masked_fill(~present, float("nan"))


def layer_shares(scores: Tensor) -> Tensor:
    """Each layer's share of the total head score of its image: ``[B, L, H] -> [B, L]``.

    Global head normalisation divides every score by the sum over all layers and heads, so a layer's fused attention
    is its per-layer fusion scaled by this share. A layer whose scores are all zero keeps uniform head weights
    ``1/H`` (share 1) rather than vanishing, so it still contributes plain attention to the rollout. NaN entries
    (missing heads) count as nothing.

    Examples:
        >>> layer_shares(torch.tensor([[[3.0, 1.0], [1.0, 3.0], [0.0, 0.0]]])).tolist()
        [[0.5, 0.5, 1.0]]
    """
    per_layer = scores.nansum(dim=-1)
    total = per_layer.sum(dim=-1, keepdim=True)
    shares = per_layer / total.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(per_layer > 0, shares, torch.ones_like(shares))


def head_weights(scores: Tensor, head_norm: HeadNorm) -> Tensor:
    """Head weights ``w_{l,h}`` from raw scores ``[B, L, H]``, normalised per layer or over all layers and heads.

    ``layer``: ``w_{l,h} = s_{l,h} / sum_h s_{l,h}``. ``global``: ``w_{l,h} = s_{l,h} / sum_{l,h} s_{l,h}``.
    Either way a layer whose scores are all zero gets ``1/H``, never NaN; missing heads (NaN scores) stay NaN.

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


def head_mean(attention: Tensor) -> Tensor:
    """Mean over the heads of ``[B, H, N, N]`` in float32; a layer without heads (``H = 0``) gives zeros.

    Examples:
        >>> head_mean(torch.ones(1, 0, 2, 2)).tolist()
        [[[0.0, 0.0], [0.0, 0.0]]]
    """
    return attention.float().sum(dim=1) / max(attention.shape[1], 1)


def fuse_heads(attention: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of a layer's heads ``sum_h w_h A_h``: ``[B * W, H, n_q, n_k]``, ``[B, H]`` -> ``[B * W, n_q, n_k]``.

    The ``W`` windows of an image share its weights.
    """
    windows, heads, queries, keys = attention.shape
    images = weights.shape[0]
    weights = weights.to(attention.dtype)[:, None].expand(images, windows // images, heads).reshape(windows, heads)
    mixed = torch.bmm(weights.unsqueeze(1), attention.reshape(windows, heads, queries * keys))
    return mixed.reshape(windows, queries, keys).float()


def discard_lowest(fused: Tensor, ratio: float, protected: Tensor) -> Tensor:
    """Zero the lowest ``ratio`` of each image's attention entries ``[B, ...]``, never where ``protected`` is True.

    This is the noise filter of Abnar & Zuidema-style rollout code. ``protected`` (shaped like one image's entries)
    marks the read-out tokens' own diagonal entries, so that their rows never vanish.

    Examples:
        >>> fused = torch.tensor([[[0.1, 0.9], [0.6, 0.4]]])
        >>> discard_lowest(fused, 0.5, protected=torch.tensor([[True, False], [False, False]])).tolist()
        [[[0.10000000149011612, 0.8999999761581421], [0.6000000238418579, 0.0]]]
    """
    if ratio <= 0:
        return fused
    flat = fused.reshape(fused.shape[0], -1)
    lowest = flat.topk(int(flat.shape[-1] * ratio), dim=-1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True) & ~protected.to(fused.device).flatten()
    return flat.masked_fill(drop, 0.0).reshape_as(fused)


def rollout_step(mixing: Mixing, row: Tensor, fused: Tensor, residual: float) -> Tensor:
    """``row^T Ahat`` for one layer, ``Ahat = (r I + (1 - r) M) / rowsum`` with ``M`` the layer's global mixing.

    An `AttentionReadout` (attention pooling) has no residual: the row over its latent queries becomes their fused
    attention over the tokens (`AttentionReadout.read`).

    ``M`` places the fused ``[B, W, n_q, n_k]`` attention of each window at its tokens (`AttentionMixing`);
    tokens that are no query keep an identity row. Because ``v^T Ahat = r u + (1 - r) u^T M`` with
    ``u_i = v_i / (r + (1 - r) sum_j M_ij)``, a layer costs one batched vector-matrix product per window and no
    ``N x N`` temporary.

    Examples:
        >>> layer = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # one image, one window of 2 tokens
        >>> rollout_step(AttentionMixing(2), torch.tensor([[1.0, 0.0]]), layer, residual=0.5).tolist()
        [[0.5, 0.5]]
    """
    if isinstance(mixing, AttentionReadout):
        return mixing.read(row, fused)
    row_sums = residual + (1.0 - residual) * mixing.row_sums(fused)
    scaled = row / row_sums.clamp_min(torch.finfo(row_sums.dtype).tiny)
    mixed = mixing.mix(scaled, fused)
    if mixing.queries is not None:
        mixed = mixed + scaled * (~mixing.queried()).to(scaled.device, scaled.dtype)
    return residual * scaled + (1.0 - residual) * mixed


class RowStream:
    """The read-out row pulled back through a plan one layer at a time, as each layer's matrix becomes available.

    ``update(layer, mixing, row, matrix)`` applies one attention layer; fixed maps between token spaces are applied as
    the row reaches them. The row needs the layers last-first, the order in which a backward pass produces their
    gradients: fed from the backward hooks, each layer's matrix is used and dropped at once, so no per-layer list of
    ``[B, W, n_q, n_k]`` matrices is kept. Layers fed out of order wait until the row reaches them.

    Args:
        plan: The model's token plan.
        update: Applies one layer to the row (return ``row`` to skip it).
        batch: Images.
        device: Where the row lives (the plan's tensors may stay on the CPU).

    Examples:
        >>> from gmar_lightning.mixing import AttentionStep
        >>> plan = TokenPlan((AttentionStep(0, AttentionMixing(2)),), torch.tensor([1.0, 0.0]), 0, (1, 2))
        >>> stream = RowStream(plan, lambda _i, mixing, row, layer: rollout_step(mixing, row, layer, 0.5), batch=1)
        >>> stream.feed(0, torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
        >>> stream.result().tolist()
        [[0.5, 0.5]]
    """

    def __init__(
        self,
        plan: TokenPlan,
        update: Callable[[int, Mixing, Tensor, Tensor], Tensor],
        batch: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self._steps = list(reversed(plan.steps))
        self._update = update
        self._waiting: dict[int, Tensor] = {}
        self._next = 0
        self.row = plan.readout.to(device).float().expand(batch, -1)
        self._advance()

    def feed(self, layer: int, matrix: Tensor) -> None:
        """Hand over ``layer``'s matrix; the row advances as far as the layers received so far allow."""
        self._waiting[layer] = matrix
        self._advance()

    def result(self) -> Tensor:
        """The row over the first token space, ``[B, N_first]``, once every layer was fed."""
        if self._next < len(self._steps):
            raise RuntimeError(f"The rollout still waits for attention layer(s) {sorted(self._missing())}.")
        return self.row

    @property
    def waiting_for(self) -> int | None:
        """The attention layer whose matrix the row needs next; ``None`` once it crossed every layer."""
        step = self._steps[self._next] if self._next < len(self._steps) else None
        return None if step is None or isinstance(step, TokenMap) else step.layer

    def _missing(self) -> set[int]:
        return {step.layer for step in self._steps[self._next :] if not isinstance(step, TokenMap)}

    def _advance(self) -> None:
        while self._next < len(self._steps):
            step = self._steps[self._next]
            if isinstance(step, TokenMap):
                self.row = step.pull_back(self.row)
            elif step.layer in self._waiting:
                self.row = self._update(step.layer, step.mixing, self.row, self._waiting.pop(step.layer))
            else:
                return
            self._next += 1


def propagate(
    plan: TokenPlan,
    update: Callable[[int, Mixing, Tensor], Tensor],
    batch: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The read-out row pulled back through the whole plan: ``[B, N_first]`` on ``device``.

    ``update(layer, mixing, row)`` applies one attention layer to the row (return ``row`` to skip it); fixed maps
    between token spaces are always applied. The plan's tensors may live on the CPU; the row lives where the layers do.

    Examples:
        >>> from gmar_lightning.mixing import AttentionStep
        >>> plan = TokenPlan((AttentionStep(0, AttentionMixing(2)),), torch.tensor([1.0, 0.0]), 0, (1, 2))
        >>> layer = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
        >>> propagate(plan, lambda _i, mixing, row: rollout_step(mixing, row, layer, 0.5), batch=1).tolist()
        [[0.5, 0.5]]
    """
    row = plan.readout.to(device).float().expand(batch, -1)
    for step in reversed(plan.steps):
        row = step.pull_back(row) if isinstance(step, TokenMap) else update(step.layer, step.mixing, row)
    return row


def propagate_rollout(plan: TokenPlan, layers: list[Tensor], residual: float, start_layer: int = 0) -> Tensor:
    """Read-out row of the attention rollout ``R = Ahat_L ... Ahat_1`` (layers from ``start_layer``): ``[B, N]``.

    ``layers`` are the fused ``[B, W, n_q, n_k]`` attentions in forward order. Only the read-out row vector is
    propagated: ``v^T (Ahat_L ... Ahat_1) = (...((v^T Ahat_L) Ahat_{L-1}) ...) Ahat_1``, with the plan's fixed maps
    between token spaces in between.

    Examples:
        >>> from gmar_lightning.mixing import AttentionStep
        >>> plan = TokenPlan((AttentionStep(0, AttentionMixing(2)), AttentionStep(1, AttentionMixing(2))),
        ...                  torch.tensor([1.0, 0.0]), 0, (1, 2))
        >>> layer = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
        >>> propagate_rollout(plan, [layer, layer], residual=0.5).tolist()
        [[0.25, 0.75]]
    """

    def update(index: int, mixing: Mixing, row: Tensor) -> Tensor:
        return rollout_step(mixing, row, layers[index], residual) if index >= start_layer else row

    return propagate(plan, update, layers[0].shape[0], layers[0].device)


def gradient_rollout_step(mixing: Mixing, row: Tensor, relevance: Tensor) -> Tensor:
    """``row^T (I + Abar)`` for one layer of Chefer et al.'s generic rule; ``relevance`` is ``[B, W, n_q, n_k]``.

    An `AttentionReadout` has no identity term (its queries are no tokens): the row becomes ``row^T Abar``.

    Examples:
        >>> relevance = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
        >>> gradient_rollout_step(AttentionMixing(2), torch.tensor([[1.0, 0.0]]), relevance).tolist()
        [[1.0, 1.0]]
    """
    if isinstance(mixing, AttentionReadout):
        return mixing.read(row, relevance)
    return row + mixing.mix(row, relevance)


def propagate_gradient_rollout(plan: TokenPlan, relevances: list[Tensor], start_layer: int = 0) -> Tensor:
    """Read-out row of Chefer et al.'s (2021) generic rule ``R <- R + Abar_l R`` from ``R = I``: ``[B, N]``.

    ``relevances`` are the per-layer ``Abar_l = mean_h((G_l * A_l)^+)`` as ``[B, W, n_q, n_k]`` in forward order;
    the product ``(I + Abar_L) ... (I + Abar_1)`` is applied to the read-out row from the last layer down.

    Examples:
        >>> from gmar_lightning.mixing import AttentionStep
        >>> plan = TokenPlan((AttentionStep(0, AttentionMixing(2)),), torch.tensor([1.0, 0.0]), 0, (1, 2))
        >>> propagate_gradient_rollout(plan, [torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])]).tolist()
        [[1.0, 1.0]]
    """

    def update(index: int, mixing: Mixing, row: Tensor) -> Tensor:
        return gradient_rollout_step(mixing, row, relevances[index]) if index >= start_layer else row

    return propagate(plan, update, relevances[0].shape[0], relevances[0].device)


def propagate_last_attention(plan: TokenPlan, last: Tensor) -> Tensor:
    """Read-out row of the last layer's attention alone, pulled back through the fixed maps: ``[B, N]``."""
    last_index = len(plan.attention_steps) - 1

    def update(index: int, mixing: Mixing, row: Tensor) -> Tensor:
        if index != last_index:
            return row
        if isinstance(mixing, AttentionReadout):  # the classifier's own attention is the last layer
            return mixing.read(row, last)
        mixed = mixing.mix(row, last)
        if mixing.queries is not None:
            mixed = mixed + row * (~mixing.queried()).to(row.device, row.dtype)
        return mixed

    return propagate(plan, update, last.shape[0], last.device)


def positive_relevance(attention: Tensor, grad: Tensor) -> Tensor:
    """Chefer et al.'s per-layer relevance ``mean_h((G * A)^+)``: ``[B, H, N, N]`` pair -> ``[B, N, N]``."""
    # Head by head through one reused [B, N, N] buffer: no [B, H, N, N] product is allocated (228 MB per layer at B=8
    # and 518 px for ViT-S/16, whose fresh pages cost more than the arithmetic).
    heads = attention.shape[1]
    total = attention.new_zeros(attention.shape[0], *attention.shape[2:], dtype=torch.float32)
    product = torch.empty_like(total)
    for head in range(heads):
        torch.mul(grad[:, head].float(), attention[:, head].float(), out=product)
        total += product.clamp_min_(0)
    return total / max(heads, 1)


def attention_rows(query: Tensor, key: Tensor, start: int, stop: int, log_sum_exp: Tensor | None = None) -> Tensor:
    """Rows ``start:stop`` of the post-softmax attention ``A = softmax(q k^T / sqrt(d))``, recomputed: ``[B, H, c, N]``.

    ``query`` and ``key`` are ``[B, H, N, d]`` (after any q/k normalisation), as fused attention receives them. A
    query row's softmax needs only that row's logits, so rows recompute exactly in chunks, in float32. With the
    layer's log-sum-exp ``[B, H, N]`` (the normaliser the fused kernel computed in the forward pass), row ``i`` is
    ``exp(q_i k^T / sqrt(d) - lse_i)``: one product and one ``exp`` instead of the softmax's three passes.

    Examples:
        >>> q, k = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2)
        >>> attention_rows(q, k, 1, 2).tolist()  # equal logits: uniform attention
        [[[[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]]]
        >>> attention_rows(q, k, 1, 2, log_sum_exp=torch.full((1, 1, 3), 3.0).log()).tolist()  # exp(0 - log 3)
        [[[[0.3333333134651184, 0.3333333134651184, 0.3333333134651184]]]]
    """
    rows_log_sum_exp = None if log_sum_exp is None else log_sum_exp[:, :, start:stop]
    queries, keys = _logit_operands(query[:, :, start:stop], key, rows_log_sum_exp)
    return _attention_block(queries, keys, normalised=log_sum_exp is not None)


def _logit_operands(query: Tensor, key: Tensor, log_sum_exp: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(queries, keys)``, float32, such that ``queries[..., I, :] @ keys`` are the logits ``q_i k^T / sqrt(d)`` of
    rows ``I`` (``keys`` is ``[B, H, d, N]``), less ``lse_i`` when the log-sum-exp ``[B, H, N]`` is given: ``-lse_i``
    rides in the product as one more dimension, ``(q_i, -lse_i) . (k_j, 1)``, so no pass of its own subtracts it.
    Built once per layer, and sliced per block (contiguous: a strided operand would be copied by every block's
    product)."""
    queries, key = _contiguous(query) * query.shape[-1] ** -0.5, _contiguous(key)
    if log_sum_exp is not None:
        queries = torch.cat([queries, -log_sum_exp[..., None].float()], dim=-1)
        key = torch.cat([key, key.new_ones(*key.shape[:-1], 1)], dim=-1)
    return queries, key.transpose(-2, -1)


def _attention_block(queries: Tensor, keys: Tensor, normalised: bool) -> Tensor:
    """The attention rows of `_logit_operands`' ``queries`` rows: ``exp`` of logits less their log-sum-exp
    (``normalised``), or the softmax of plain logits."""
    logits = queries @ keys
    return logits.exp_() if normalised else torch.softmax(logits, dim=-1)


def _contiguous(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 with contiguous ``[N, d]`` matrices: the ``q``/``k``/``v`` views of a fused projection
    are strided, and every batched product with a strided operand would copy it again."""
    return tensor.float().contiguous()


def _blocks(batch: int, span: tuple[int, int], rows: int, images: int | None) -> list[tuple[slice, slice]]:
    """``(images, query rows)`` slices of the blocks that cover query rows ``span = (start, stop)`` of a
    ``[B, H, N, N]`` layer: ``images`` images (all when ``None``) by ``rows`` query rows each."""
    step, rows = max(int(images or batch), 1), max(int(rows), 1)
    return [
        (slice(first, first + step), slice(start, min(start + rows, span[1])))
        for first in range(0, batch, step)
        for start in range(span[0], span[1], rows)
    ]


def _row_span(active: Tensor) -> tuple[int, int]:
    """``(start, stop)``: the first and one past the last query row where ``active`` (``[N]`` bool) holds; ``(0, 0)``
    when none does.

    A row block whose rows all have a zero read-out weight, or a zero output gradient, adds nothing to any method's sum
    over query rows. Below a class token read-out only the class token's row is reached in the last layer, and the
    pooled models' own rows are every row, so a span (one host synchronisation per layer) skips what exists to be
    skipped without a per-block test.

    Examples:
        >>> _row_span(torch.tensor([False, True, False, True, False])), _row_span(torch.zeros(3, dtype=torch.bool))
        ((1, 4), (0, 0))
    """
    indices = active.nonzero()
    if not len(indices):
        return 0, 0
    return int(indices[0, 0]), int(indices[-1, 0]) + 1


def nonzero_rows(tensor: Tensor) -> Tensor:
    """``[N]`` bool: the query rows (dimension 2) of a ``[B, H, N, d]`` tensor with a non-zero entry.

    Examples:
        >>> nonzero_rows(torch.tensor([[[[0.0, 1.0], [0.0, 0.0], [-2.0, 0.0]]]])).tolist()
        [True, False, True]
    """
    if not tensor.numel():  # no image or no head left (HeadPruning): no reduction over an empty dimension
        return torch.zeros(tensor.shape[2], dtype=torch.bool, device=tensor.device)
    # One reduction over the floats (a quarter of the time of a boolean copy and three `any`s); NaN stays non-zero.
    return tensor.abs().amax(dim=(0, 1, 3)).ne(0)


def gram_l2_scores(grad_output: Tensor, value: Tensor) -> Tensor:
    """GMAR-L2 head scores without the ``N x N`` gradient: ``[B, H, N, d]`` pair -> ``[B, H]``.

    With ``O_h = A_h V_h`` and ``G_h = dy/dO_h``, the attention gradient is ``dy/dA_h = G_h V_h^T``, and
    ``||G_h V_h^T||_F^2 = sum_ab (G_h^T G_h)_ab (V_h^T V_h)_ab``: two ``d x d`` Gram matrices (float64) per head.

    Examples:
        >>> g, v = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]]), torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]]])
        >>> gram_l2_scores(g, v).tolist()  # G V^T = [[3, 0], [0, 8]]
        [[8.5440034866333]]
    """
    # Contiguous copies: `.double()` keeps the strides of the fused projection's views, and each batched product with
    # such an operand would copy it again (half of this function's time at 518 px).
    grads, values = (tensor.to(torch.float64, memory_format=torch.contiguous_format) for tensor in (grad_output, value))
    grams = (grads.mT @ grads) * (values.mT @ values)
    return grams.sum(dim=(-2, -1)).clamp_min(0).sqrt().float()


def chunked_l1_scores(grad_output: Tensor, value: Tensor, rows: int, images: int | None = None) -> Tensor:
    """GMAR-L1 head scores ``sum |G_h V_h^T|`` over blocks of ``images`` images (all when ``None``) by ``rows`` query
    rows: ``[B, H, N, d]`` pair -> ``[B, H]`` (`recomputed_layer_sums` with ``l1=True``).

    Examples:
        >>> g, v = torch.tensor([[[[1.0, 0.0], [0.0, -2.0]]]]), torch.tensor([[[[3.0, 1.0], [0.0, 4.0]]]])
        >>> chunked_l1_scores(g, v, rows=1).tolist()  # G V^T = [[3, 0], [-2, -8]]
        [[13.0]]
    """
    return recomputed_layer_sums(None, None, grad_output, value, rows, images, l1=True).l1


class LayerSums(NamedTuple):
    """What [`recomputed_layer_sums`][gmar_lightning.methods.recomputed_layer_sums] reduced from one layer."""

    l1: Tensor | None
    """``[B, H]``: ``sum |G_h V_h^T|`` per head (GMAR-L1's scores), when asked for."""
    head_rows: list[Tensor]
    """Per row ``r`` of ``head_rows``: ``[B, H, N]``, ``r^T A_h`` per head."""
    relevance: list[Tensor]
    """Per row ``r`` of ``relevance_rows``: ``[B, N]``, ``r^T mean_h((G_h V_h^T * A_h)^+)``."""
    input_grads: tuple[Tensor, Tensor, Tensor] | None = None
    """``(dy/dq, dy/dk, dy/dv)``, each ``[B, H, N, d]`` float32: the attention's backward pass, when ``output`` was
    given."""


def recomputed_layer_sums(
    query: Tensor | None,
    key: Tensor | None,
    grad_output: Tensor | None,
    value: Tensor | None,
    rows: int,
    images: int | None = None,
    log_sum_exp: Tensor | None = None,
    *,
    l1: bool = False,
    head_rows: Sequence[Tensor] = (),
    relevance_rows: Sequence[Tensor] = (),
    output: Tensor | None = None,
) -> LayerSums:
    """Every sum over query rows that the methods read from one global attention layer, in one pass over blocks of
    ``images`` images (all when ``None``) by ``rows`` query rows: no ``N x N`` matrix is kept.

    Each block recomputes the attention rows ``A[I]`` from ``q`` and ``k`` (as `attention_rows`) when a row product
    is asked for, and the gradient rows ``dy/dA[I] = G[I] V^T`` from ``G = dy/dO`` and ``v`` when ``l1`` or a relevance
    is asked for, once for every quantity: GMAR-L1's ``sum |G_h V_h^T|`` (``l1``), the per-head row products
    ``r^T A_h`` of each row in ``head_rows`` ([B, N] each; the rollout fuses them with its head weights, which GMAR-L1
    knows only once this pass has summed every block) and ``r^T mean_h((G_h V_h^T * A_h)^+)`` of each row in
    ``relevance_rows`` (the generic rule). Blocks of rows that add nothing to any of them (a zero row weight, a zero
    output gradient) are skipped. ``query``/``key`` may be ``None`` when no row is asked for, ``grad_output``/``value``
    when neither ``l1`` nor a relevance is.

    With the attention's ``output`` ``O = A V`` (``[B, H, N, d]``), the same blocks also give the attention's backward
    pass, ``input_grads``: with ``dS = A * (dy/dA - delta)`` and ``delta_i = G_i . O_i`` (the softmax's backward),
    ``dy/dq = dS k / sqrt(d)``, ``dy/dk = dS^T q / sqrt(d)`` and ``dy/dv = A^T G``; the fused kernel's own backward
    would recompute ``A`` and ``G V^T`` a second time.

    Examples:
        >>> q, k = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)  # uniform attention [[.5, .5], [.5, .5]]
        >>> g, v = torch.tensor([[[[1.0], [0.0]]]]), torch.tensor([[[[2.0], [-2.0]]]])  # dy/dA = [[2, -2], [0, 0]]
        >>> row = torch.tensor([[1.0, 1.0]])
        >>> sums = recomputed_layer_sums(q, k, g, v, rows=1, l1=True, head_rows=[row], relevance_rows=[row])
        >>> sums.l1.tolist(), sums.head_rows[0].tolist(), sums.relevance[0].tolist()
        ([[4.0]], [[[1.0, 1.0]]], [[1.0, 0.0]])
        >>> grads = recomputed_layer_sums(q, k, g, v, rows=1, output=torch.zeros(1, 1, 2, 1)).input_grads
        >>> [grad.flatten().tolist() for grad in grads]  # dS = [[1, -1], [0, 0]]: dy/dk = dS^T q = 0, dy/dv = A^T G
        [[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]]
    """
    backward = output is not None
    with_attention = bool(head_rows or relevance_rows) or backward
    with_gradient = l1 or bool(relevance_rows) or backward
    if with_attention and (query is None or key is None):
        raise ValueError("recomputed_layer_sums: row products and `output` need `query` and `key`.")
    if with_gradient and (grad_output is None or value is None):
        raise ValueError("recomputed_layer_sums: `l1`, relevance and `output` need `grad_output` and `value`.")
    reference = query if query is not None else grad_output
    batch, heads, tokens, head_dim = reference.shape
    active = torch.zeros(tokens, dtype=torch.bool, device=reference.device)
    for row in head_rows:
        active |= row.ne(0).any(dim=0)
    if with_attention:
        queries, keys = _logit_operands(query, key, log_sum_exp)
    if with_gradient:
        grads, values = _contiguous(grad_output), _contiguous(value).transpose(-2, -1)
        gradient_rows = nonzero_rows(grads)
        if l1 or backward:
            active |= gradient_rows
        for row in relevance_rows:
            active |= row.ne(0).any(dim=0) & gradient_rows
    if backward:
        # Rows without an output gradient add nothing to any input gradient, so only the span's rows of dy/dq are set.
        delta = (grads * output.float()).sum(dim=-1, keepdim=True)
        key_rows = keys.transpose(-2, -1)[..., :head_dim]  # k as [B, H, N, d] (without the log-sum-exp column)
        grad_query = torch.zeros_like(grads)
        # dy/dk and dy/dv accumulate transposed, [B, H, d, N]: G^T A into a [d, N] block runs a fifth faster than
        # A^T G into [N, d] (a transposed [c, N] operand).
        grad_key_t = grads.new_zeros(batch, heads, head_dim, tokens)
        grad_value_t = torch.zeros_like(grad_key_t)
    l1_total = torch.zeros(batch, heads, dtype=torch.float64, device=active.device) if l1 else None
    head_totals = [row.new_zeros(batch, heads, tokens, dtype=torch.float32) for row in head_rows]
    relevance_totals = [row.new_zeros(batch, tokens, dtype=torch.float32) for row in relevance_rows]
    scratch = None  # one reused block for |dy/dA| and the relevance, whose fresh pages would cost more than the sums
    for part, query_rows in _blocks(batch, _row_span(active), rows, images):
        if with_attention:
            attention = _attention_block(queries[part, :, query_rows], keys[part], log_sum_exp is not None)
        for row, total in zip(head_rows, head_totals, strict=True):
            total[part] += _head_row_products(row[part, query_rows].float(), attention)
        if not with_gradient:
            continue
        product = grads[part, :, query_rows] @ values[part]  # dy/dA rows [b, H, c, N]
        if l1 or relevance_rows:
            if scratch is None or scratch.numel() < product.numel():
                scratch = torch.empty_like(product).view(-1)
            spare = scratch[: product.numel()].view(product.shape)
        if l1:
            # Each block summed in float32 (torch's cascaded reduction), the blocks accumulated in float64; summing
            # a block with dtype=float64 would first copy it to float64.
            l1_total[part] += torch.abs(product, out=spare).sum(dim=(-2, -1)).double()
        if relevance_rows:
            product.mul_(attention)  # dy/dA * A: the relevance's product (and dS's first term)
        for row, total in zip(relevance_rows, relevance_totals, strict=True):
            relevance = torch.clamp_min(product, 0, out=spare)
            total[part] += _head_row_products(row[part, query_rows].float() / max(heads, 1), relevance).sum(dim=1)
        if backward:
            # dS = dy/d(logits) = A * (dy/dA - delta), in place of the block, from dy/dA * A when the relevance
            # already formed it (one pass either way).
            rows_delta = delta[part, :, query_rows]
            logit_grad = (
                product.addcmul_(attention, rows_delta, value=-1.0)
                if relevance_rows
                else product.sub_(rows_delta).mul_(attention)
            )
            _accumulate(grad_value_t[part], grads[part, :, query_rows].transpose(-2, -1), attention)
            grad_query[part, :, query_rows] = logit_grad @ key_rows[part]
            _accumulate(grad_key_t[part], queries[part, :, query_rows, :head_dim].transpose(-2, -1), logit_grad)
    input_grads = None
    if backward:
        input_grads = (grad_query.mul_(head_dim**-0.5), grad_key_t.transpose(-2, -1), grad_value_t.transpose(-2, -1))
    return LayerSums(None if l1_total is None else l1_total.float(), head_totals, relevance_totals, input_grads)


def _accumulate(total: Tensor, left: Tensor, right: Tensor) -> None:
    """``total += left @ right`` for ``[b, H, ...]`` stacks of matrices, in place (no product is allocated)."""
    total.flatten(0, 1).baddbmm_(left.flatten(0, 1), right.flatten(0, 1))


def _head_row_products(row: Tensor, attention: Tensor) -> Tensor:
    """``sum_i row[b, i] * attention[b, h, i]`` per head: ``[b, c]`` and ``[b, H, c, N]`` -> ``[b, H, N]``, one batched
    product of the ``b * H`` row vectors with their ``[c, N]`` attention rows."""
    count, heads, chunk, tokens = attention.shape
    coefficients = row[:, None, None, :].expand(count, heads, 1, chunk).reshape(count * heads, 1, chunk)
    return torch.bmm(coefficients, attention.reshape(count * heads, chunk, tokens)).view(count, heads, tokens)


def rollout_from_head_rows(row: Tensor, weights: Tensor, head_rows: Tensor, residual: float) -> Tensor:
    """[`rollout_step`][gmar_lightning.methods.rollout_step] of a global attention layer from its per-head row
    products ``head_rows[b, h] = row^T A_h`` (`recomputed_layer_sums`) and head weights ``weights`` ``[B, H]``.

    With ``F = sum_h w_h A_h`` and ``Ahat = (r I + (1 - r) F) / s``, each softmax row sums to one, so every row of
    ``r I + (1 - r) F`` sums to ``s = r + (1 - r) sum_h w_h``, known without the matrix, and
    ``row^T Ahat = (r row + (1 - r) sum_h w_h row^T A_h) / s``.

    Examples:
        >>> rollout_from_head_rows(torch.tensor([[1.0, 0.0]]), torch.ones(1, 1), torch.tensor([[[0.5, 0.5]]]), 0.5)
        tensor([[0.7500, 0.2500]])
    """
    weights = weights.float()
    sums = residual + (1.0 - residual) * weights.sum(dim=1, keepdim=True)  # [B, 1]: every row of Ahat before scaling
    mixed = (weights[:, :, None] * head_rows).sum(dim=1)
    return (residual * row + (1.0 - residual) * mixed) / sums.clamp_min(torch.finfo(sums.dtype).tiny)


def recomputed_rollout_step(
    row: Tensor,
    query: Tensor,
    key: Tensor,
    weights: Tensor,
    residual: float,
    rows: int,
    images: int | None = None,
    log_sum_exp: Tensor | None = None,
) -> Tensor:
    """[`rollout_step`][gmar_lightning.methods.rollout_step] of a global attention layer with ``F = sum_h w_h A_h``
    recomputed from ``q`` and ``k`` in blocks of ``images`` images (all when ``None``) by ``rows`` query rows: no
    ``N x N`` matrix is kept (`recomputed_layer_sums`, then `rollout_from_head_rows`). ``weights`` is ``[B, H]``
    (``1/H`` for the head mean); ``log_sum_exp`` as for `attention_rows`.

    Examples:
        >>> q, k = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)  # uniform attention [[.5, .5], [.5, .5]]
        >>> recomputed_rollout_step(torch.tensor([[1.0, 0.0]]), q, k, torch.ones(1, 1), 0.5, rows=1).tolist()
        [[0.75, 0.25]]
    """
    sums = recomputed_layer_sums(query, key, None, None, rows, images, log_sum_exp, head_rows=[row])
    return rollout_from_head_rows(row, weights, sums.head_rows[0], residual)


def recomputed_gradient_rollout_step(
    row: Tensor,
    query: Tensor,
    key: Tensor,
    grad_output: Tensor,
    value: Tensor,
    rows: int,
    images: int | None = None,
    log_sum_exp: Tensor | None = None,
) -> Tensor:
    """[`gradient_rollout_step`][gmar_lightning.methods.gradient_rollout_step] of a global attention layer, with
    ``Abar = mean_h((G_h V_h^T * A_h)^+)`` built in blocks of ``images`` images (all when ``None``) by ``rows`` query
    rows from ``q``, ``k``, ``G = dy/dO`` and ``v``: ``row^T (I + Abar) = row + row^T Abar``, the relevance of
    `recomputed_layer_sums`; ``log_sum_exp`` as for `attention_rows`.

    Examples:
        >>> q, k = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)  # uniform attention
        >>> g, v = torch.tensor([[[[1.0], [0.0]]]]), torch.tensor([[[[2.0], [-2.0]]]])  # dy/dA = [[2, -2], [0, 0]]
        >>> recomputed_gradient_rollout_step(torch.tensor([[1.0, 1.0]]), q, k, g, v, rows=1).tolist()
        [[2.0, 1.0]]
    """
    sums = recomputed_layer_sums(query, key, grad_output, value, rows, images, log_sum_exp, relevance_rows=[row])
    return row + sums.relevance[0]


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


@dataclass(frozen=True)
class Method:
    """One row of the method table: what the engine keeps of each layer and how it propagates the layers.

    Args:
        name: The ``method=`` name of [`gmar_lightning.explain`][gmar_lightning.engine.explain].
        reduce: What the hooks keep of each layer: ``"head_mean"`` (the attention averaged over heads, no gradient),
            ``"gradient_relevance"`` ([`positive_relevance`][gmar_lightning.methods.positive_relevance], head mean of
            ``relu(grad * A)``) or ``"gradient_head_weights"`` (heads scored by the ``gradient_norm`` of their gradient,
            then fused with [`layer_head_weights`][gmar_lightning.methods.layer_head_weights]; the method yields head
            weights).
        propagate: How the read-out row crosses the layers: ``"rollout"``
            ([`propagate_rollout`][gmar_lightning.methods.propagate_rollout], with residual, discard and head-norm
            options), ``"gradient_rollout"``
            ([`propagate_gradient_rollout`][gmar_lightning.methods.propagate_gradient_rollout]) or ``"last_layer"``
            ([`propagate_last_attention`][gmar_lightning.methods.propagate_last_attention]: only the last layer is
            reduced).
        gradient_norm: For ``"gradient_head_weights"``: the norm of [`head_scores`][gmar_lightning.methods.head_scores].

    Examples:
        >>> METHOD_TABLE["gmar_l2"].needs_gradients, METHOD_TABLE["rollout"].weighs_heads
        (True, False)
    """

    name: str
    reduce: Literal["head_mean", "gradient_relevance", "gradient_head_weights"]
    propagate: Literal["rollout", "gradient_rollout", "last_layer"]
    gradient_norm: GradNorm | None = None

    def __post_init__(self) -> None:
        if (self.reduce == "gradient_head_weights") != (self.gradient_norm is not None):
            raise ValueError(f"Method {self.name!r}: `gradient_norm` is needed by, and only by, gradient_head_weights.")

    @property
    def needs_gradients(self) -> bool:
        """Whether the method backpropagates the target logit to the attention (one backward pass)."""
        return self.reduce != "head_mean"

    @property
    def weighs_heads(self) -> bool:
        """Whether the method scores and weights heads (and so fills ``head_weights`` and ``head_scores``)."""
        return self.reduce == "gradient_head_weights"

    @property
    def last_layer_only(self) -> bool:
        """Whether only the last layer is reduced (the others are hooked but not kept)."""
        return self.propagate == "last_layer"


METHOD_TABLE: dict[str, Method] = {
    method.name: method
    for method in (
        Method("gmar_l1", reduce="gradient_head_weights", propagate="rollout", gradient_norm="l1"),
        Method("gmar_l2", reduce="gradient_head_weights", propagate="rollout", gradient_norm="l2"),
        Method("rollout", reduce="head_mean", propagate="rollout"),
        Method("grad_rollout", reduce="gradient_relevance", propagate="gradient_rollout"),
        Method("attention", reduce="head_mean", propagate="last_layer"),
    )
}
"""Every method [`gmar_lightning.explain`][gmar_lightning.engine.explain] accepts, by name; adding a method that reuses
a reduction and a propagation is one entry here."""
