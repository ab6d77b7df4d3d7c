"""How a model mixes its tokens, in the form the rollout needs, and the row-vector propagation through it.

A `TokenPlan` lists, in forward order, the model's attention layers and the fixed maps between its token
spaces (patch merging, token pooling, a class token joining the sequence). Each attention layer is described by an
`AttentionMixing`: where the query and key slots of its captured ``[B * W, H, n_q, n_k]`` attention sit in the
layer's token space (``W`` windows per image). The global ``N x N`` mixing matrix of a layer is never built: the
rollout applies the block structure of the windows to the read-out row vector directly. The formulas are in
``docs/method.md`` (Hierarchical and windowed models); the model families that build plans are in
`gmar_lightning.families`. Nothing here knows about modules or hooks.

A classifier that reads its tokens through an attention of its own (attention pooling: timm's ``global_pool='map'``,
a SigLIP head, open_clip's attentional pooler) ends its plan with an `AttentionReadout`: learned latent queries, which
are no tokens, attend to the last token space, and the read-out row is their fused attention over the tokens, with no
residual (``docs/method.md``, Attention pooling).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["AttentionMixing", "AttentionReadout", "AttentionStep", "TokenMap", "TokenPlan"]


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device`` without waiting for the device: a host tensor bound for a GPU is first copied into
    page-locked memory, so that the copy is truly asynchronous (a copy from pageable memory waits for the stream).

    The page-locked buffer is held by torch's host allocator until the copy has run, so nothing can overwrite it.
    """
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _scatter_rows(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[b, index[j]] += values[b, j]`` over ``size`` tokens; ``index`` entries of ``-1`` are dropped."""
    index = to_device(index, values.device).flatten()
    safe = torch.where(index < 0, size, index).expand(values.shape[0], -1)
    out = values.new_zeros(values.shape[0], size + 1)
    return out.scatter_add_(1, safe, values.flatten(1))[:, :size]


def _gather_rows(row: Tensor, index: Tensor) -> Tensor:
    """``row[b, index]`` with ``0`` where ``index`` is ``-1``; keeps ``index``'s shape after the batch dimension."""
    index = to_device(index, row.device)
    padded = torch.cat([row, row.new_zeros(row.shape[0], 1)], dim=1)
    safe = torch.where(index < 0, row.shape[1], index)
    return padded[:, safe]


@dataclass(frozen=True)
class TokenMap:
    """A fixed linear map between token spaces, as relevance crosses it: a row over the new tokens pulls back to
    ``old[sources[i, k]] += weights[i, k] * new[i]``.

    New token ``i`` is made from the old tokens ``sources[i]``; ``weights`` say how its relevance is shared among them
    (`gmar_lightning.families.grids.coverage_map`: a token under several kernels counts once). ``sources`` pads short
    rows with ``-1``.

    Args:
        sources: ``[n_new, k]`` indices into the old token space.
        weights: ``[n_new, k]`` the averaging weights.
        num_inputs: Tokens in the old space.

    Examples:
        >>> merge = TokenMap(torch.tensor([[0, 1], [2, -1]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]), num_inputs=3)
        >>> merge.pull_back(torch.tensor([[1.0, 2.0]])).tolist()
        [[0.5, 0.5, 2.0]]
    """

    sources: Tensor
    weights: Tensor
    num_inputs: int

    @property
    def num_outputs(self) -> int:
        return int(self.sources.shape[0])

    def pull_back(self, row: Tensor) -> Tensor:
        """``row @ T``: a ``[B, n_new]`` row over the new tokens as a ``[B, num_inputs]`` row over the old ones."""
        values = row[:, :, None] * to_device(self.weights, row.device).to(row.dtype)
        return _scatter_rows(values, self.sources, self.num_inputs)

    def to(self, device: torch.device | str) -> TokenMap:
        """The same map with its tensors on ``device``."""
        return TokenMap(to_device(self.sources, device), to_device(self.weights, device), self.num_inputs)


@dataclass(frozen=True)
class AttentionMixing:
    """Where one attention layer's ``[B * W, H, n_q, n_k]`` probabilities sit in a token space of ``num_tokens``.

    Args:
        num_tokens: Tokens of the layer's token space.
        queries: ``[W, n_q]`` the token of each window's query slots (``-1``: padding), or ``None`` for all tokens
            in order (one window). Tokens that are no query keep their value: their row of the layer is the identity.
        keys: ``[W, n_k]`` the token of each key slot (``-1``: padding, its attention is dropped), or ``None`` for
            all tokens in order; ignored with ``key_map``.
        key_map: When the keys are pooled tokens (spatial-reduction attention), the map from the token space to the
            ``n_k`` pooled tokens; a key's relevance flows back to the tokens it pools.

    Examples:
        >>> AttentionMixing(4, queries=torch.tensor([[0, 1], [2, 3]]), keys=torch.tensor([[0, 1], [2, 3]])).shape(2)
        (4, 2, 2)
    """

    num_tokens: int
    queries: Tensor | None = None
    keys: Tensor | None = None
    key_map: TokenMap | None = None
    # Facts of the layer's structure, read once where the plan is built (on the host) rather than once per call and
    # layer: reading a device tensor's values would stall the device.
    _padding: Tensor | None = field(init=False, repr=False, compare=False)
    _queried: Tensor | None = field(init=False, repr=False, compare=False)  # None: every token is a query
    # Each pooled key's total weight over the tokens (a coverage map's rows need not sum to 1); None without key_map.
    _key_totals: Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        padded = self.key_map is None and self.keys is not None and bool((self.keys < 0).any())
        object.__setattr__(self, "_padding", (self.keys < 0)[:, None, :] if padded else None)
        queried = None
        if self.queries is not None:
            queried = torch.zeros(self.num_tokens + 1, dtype=torch.bool, device=self.queries.device)
            queried[torch.where(self.queries < 0, self.num_tokens, self.queries).flatten()] = True
            queried = queried[: self.num_tokens]
        object.__setattr__(self, "_queried", queried)
        object.__setattr__(self, "_key_totals", None if self.key_map is None else self.key_map.weights.sum(dim=-1))

    def to(self, device: torch.device | str) -> AttentionMixing:
        """The same mixing with its tensors on ``device`` (without reading them again)."""
        moved = copy.copy(self)
        for name in ("queries", "keys", "_padding", "_queried", "_key_totals"):
            value = getattr(self, name)
            object.__setattr__(moved, name, to_device(value, device) if value is not None else None)
        object.__setattr__(moved, "key_map", self.key_map.to(device) if self.key_map is not None else None)
        return moved

    @property
    def num_windows(self) -> int:
        return 1 if self.queries is None else int(self.queries.shape[0])

    def shape(self, batch: int) -> tuple[int, int, int]:
        """The ``(B * W, n_q, n_k)`` of the captured attention for ``batch`` images (heads aside)."""
        num_queries = self.num_tokens if self.queries is None else int(self.queries.shape[1])
        if self.key_map is not None:
            num_keys = self.key_map.num_outputs
        else:
            num_keys = self.num_tokens if self.keys is None else int(self.keys.shape[1])
        return batch * self.num_windows, num_queries, num_keys

    def key_padding(self) -> Tensor | None:
        """``[W, 1, n_k]`` True where a key slot is padding (no token), or ``None`` when there is none."""
        return self._padding

    def diagonal(self, tokens: Tensor) -> Tensor:
        """``[W, n_q, n_k]`` True where query and key slot hold the same token and ``tokens`` (bool ``[N]``) has it."""
        _, num_queries, num_keys = self.shape(1)
        if self.key_map is not None:
            return torch.zeros(self.num_windows, num_queries, num_keys, dtype=torch.bool, device=tokens.device)
        device = tokens.device
        queries = torch.arange(self.num_tokens, device=device)[None] if self.queries is None else self.queries
        keys = torch.arange(self.num_tokens, device=device)[None] if self.keys is None else self.keys
        queries, keys = to_device(queries, device), to_device(keys, device)
        padded = torch.cat([tokens, torch.zeros(1, dtype=torch.bool, device=device)])
        protected = padded[torch.where(queries < 0, -1, queries)]
        return (queries[:, :, None] == keys[:, None, :]) & (queries[:, :, None] >= 0) & protected[:, :, None]

    def queried(self) -> Tensor:
        """``[N]`` bool: the tokens this layer updates."""
        return torch.ones(self.num_tokens, dtype=torch.bool) if self._queried is None else self._queried

    def mix(self, row: Tensor, fused: Tensor) -> Tensor:
        """``row^T M`` over the queried tokens: ``[B, N]`` row, ``[B, W, n_q, n_k]`` fused attention -> ``[B, N]``."""
        by_query = row[:, None, None, :] if self.queries is None else _gather_rows(row, self.queries)[:, :, None, :]
        by_key = (by_query @ fused).squeeze(2)  # [B, W, n_k]
        if self.key_map is not None:
            return self.key_map.pull_back(by_key.squeeze(1))
        if self.keys is None:
            return by_key.squeeze(1)
        return _scatter_rows(by_key, self.keys, self.num_tokens)

    def row_sums(self, fused: Tensor) -> Tensor:
        """``[B, N]`` row sums of the layer's global matrix; ``1`` for tokens that are no query (identity rows)."""
        # [B, W, n_q]; with pooled keys M = A P, and each key passes on its total weight over the tokens.
        totals = self._key_totals
        sums = fused.sum(dim=-1) if totals is None else fused @ totals.to(fused.dtype)
        if self.queries is None:
            return sums.squeeze(1)
        ones = torch.ones(sums.shape[0], self.num_tokens, device=sums.device, dtype=sums.dtype)
        scattered = _scatter_rows(sums, self.queries, self.num_tokens)
        return torch.where(to_device(self.queried(), sums.device), scattered, ones)


@dataclass(frozen=True)
class AttentionReadout:
    """The classifier's own attention over the last token space: ``n_q`` latent queries, which are no tokens, attend
    to ``n_k`` key slots of ``num_tokens`` tokens (attention pooling).

    It is the last step of a `TokenPlan`, whose ``readout`` then weighs the latent queries (``1/n_q`` each to average
    them, one-hot when the classifier reads the first latent only). The read-out row over the tokens is
    ``sum_q readout[q] * Abar[q, :]``, with ``Abar`` the layer's fused attention ``[B, 1, n_q, n_k]`` and no residual:
    the latent is not a token, so no skip connection carries it. Rollout, GMAR and the gradient rollout fuse the
    layer's heads as for any layer (its heads are the plan's last layer's heads) and read the row with `read`.

    Args:
        num_queries: Latent queries ``n_q``.
        num_tokens: Tokens of the last token space.
        keys: ``[n_k]`` the token of each key slot (``-1``: padding, which reaches no token), or ``None`` for all
            tokens in order (a pool that skips the prefix tokens has keys ``num_prefix_tokens .. N - 1``).

    Examples:
        >>> pool = AttentionReadout(num_queries=1, num_tokens=3, keys=torch.tensor([1, 2]))
        >>> pool.shape(1), pool.read(torch.tensor([[1.0]]), torch.tensor([[[[0.25, 0.75]]]])).tolist()
        ((1, 1, 2), [[0.0, 0.25, 0.75]])
    """

    num_queries: int
    num_tokens: int
    keys: Tensor | None = None
    _padding: Tensor | None = field(init=False, repr=False, compare=False)  # read once, on the host (see above)

    def __post_init__(self) -> None:
        padded = self.keys is not None and bool((self.keys < 0).any())
        object.__setattr__(self, "_padding", (self.keys < 0)[None, None, :] if padded else None)

    def to(self, device: torch.device | str) -> AttentionReadout:
        """The same read-out with its tensors on ``device`` (without reading them again)."""
        moved = copy.copy(self)
        for name in ("keys", "_padding"):
            value = getattr(self, name)
            object.__setattr__(moved, name, to_device(value, device) if value is not None else None)
        return moved

    @property
    def num_windows(self) -> int:
        return 1

    def shape(self, batch: int) -> tuple[int, int, int]:
        """The ``(B, n_q, n_k)`` of the captured attention for ``batch`` images (heads aside)."""
        return batch, self.num_queries, self.num_tokens if self.keys is None else int(self.keys.shape[0])

    def key_padding(self) -> Tensor | None:
        """``[1, 1, n_k]`` True where a key slot is padding, or ``None`` when there is none."""
        return self._padding

    def diagonal(self, tokens: Tensor) -> Tensor:
        """No query is a token, so no entry is a token's own diagonal entry: all False ``[1, n_q, n_k]``."""
        return torch.zeros(self.shape(1), dtype=torch.bool, device=tokens.device)

    def read(self, weights: Tensor, fused: Tensor) -> Tensor:
        """The read-out row ``[B, N]`` from latent weights ``[B, n_q]`` and fused attention ``[B, 1, n_q, n_k]``."""
        by_key = (weights[:, None, None, :] @ fused).squeeze(2)  # [B, 1, n_k]
        if self.keys is None:
            return by_key.squeeze(1)
        return _scatter_rows(by_key, self.keys, self.num_tokens)


@dataclass(frozen=True)
class AttentionStep:
    """One rollout layer of a `TokenPlan`: the index of its attention among the plan's layers, and its mixing (an
    `AttentionReadout` for the classifier's own attention, the plan's last step)."""

    layer: int
    mixing: AttentionMixing | AttentionReadout


@dataclass(frozen=True)
class TokenPlan:
    """How a model mixes tokens from its first token space to its read-out, in forward order.

    Args:
        steps: Attention layers and fixed maps between token spaces, in forward order.
        readout: ``[N_last]`` the weights with which the classifier pools the last token space (they sum to 1); when
            the last step is an `AttentionReadout`, ``[n_q]`` the weights of its latent queries.
        num_prefix_tokens: Tokens before the patch grid in the first token space (class, distillation, registers).
        grid: ``(h, w)`` the patch grid of the first token space, in row-major order after the prefix tokens.
    """

    steps: tuple[AttentionStep | TokenMap, ...]
    readout: Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]

    def to(self, device: torch.device | str) -> TokenPlan:
        """The same plan with its tensors on ``device``: moved once per call, so no layer copies them again."""
        steps = tuple(
            step.to(device) if isinstance(step, TokenMap) else AttentionStep(step.layer, step.mixing.to(device))
            for step in self.steps
        )
        return TokenPlan(steps, to_device(self.readout, device), self.num_prefix_tokens, self.grid)

    @property
    def attention_steps(self) -> list[AttentionStep]:
        return [step for step in self.steps if isinstance(step, AttentionStep)]

    def protected_tokens(self) -> list[Tensor]:
        """Per attention step, the tokens the read-out pools when mapped back through the fixed maps only (bool)."""
        row = self.readout[None].float()
        protected = []
        for step in reversed(self.steps):
            if isinstance(step, TokenMap):
                row = step.pull_back(row)
            elif isinstance(step.mixing, AttentionReadout):
                # An attention pool may read any token it has a key for: every such token's diagonal is protected.
                protected.append(torch.zeros(step.mixing.num_queries, dtype=torch.bool))
                row = step.mixing.read(row, torch.ones(1, 1, *step.mixing.shape(1)[1:]))
            else:
                protected.append(row[0] > 0)
        return protected[::-1]
