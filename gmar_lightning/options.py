"""The options of an explanation: one frozen type, validated once, shared by ``explain``, ``Explanation.options`` and
the callback's ``explain_options``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gmar_lightning._checks import check_choice, check_non_negative_int, check_number_in_range, check_positive_int
from gmar_lightning.tokens import TokenLayout

__all__ = ["HEAD_NORMS", "ExplainOptions"]

HEAD_NORMS: tuple[str, ...] = ("layer", "global")
"""How GMAR normalises head scores: over each layer's heads, or over all layers and heads."""


@dataclass(frozen=True)
class ExplainOptions:
    """How [`gmar_lightning.explain`][gmar_lightning.engine.explain] computes maps; every field is checked at
    construction.

    Args:
        residual: Weight of the identity added to each layer's fused attention before renormalising rows
            (GMAR and rollout), in ``[0, 1]``.
        head_norm: ``"layer"`` normalises head scores over each layer's heads, ``"global"`` over all layers and
            heads (GMAR only).
        discard_ratio: Fraction of each layer's lowest fused-attention entries zeroed before the rollout, in
            ``[0, 1)`` (GMAR and rollout).
        start_layer: First layer (0-based) included in the rollout; ``explain`` checks it against the model's depth.
        chunk_size: Explain at most this many images per pass, to bound memory; ``None``: the whole batch.
        token_layout: Override the inferred prefix tokens and read-out; ``None``: inferred from the model.
        memory_budget: Bytes the engine may spend on attention-sized buffers at once: the materialised path explains
            micro-batches whose saved attention fits, the recomputed path works in query-row chunks that fit.
            ``None``: what one training step of the same batch keeps for its backward pass (estimated from the
            model's layers, ``docs/performance.md``), at most the device's free memory (CUDA) or available memory (CPU,
            Linux ``MemAvailable``). Results do not depend on it.
        recompute_attention: Keep fused attention and recompute what each method needs from ``q``, ``k``, ``v`` and
            the attention output's gradient, in query-row chunks, where the model allows (timm ViT attention).
            ``None``: only where the materialised path would not fit ``memory_budget`` in one pass (at short
            sequences materialising is the faster of the two); ``False`` always materialises every layer's
            ``[B, H, N, N]`` probabilities (the reference path).

    Examples:
        >>> ExplainOptions(residual=0.3).residual
        0.3
        >>> ExplainOptions.from_mapping({"residul": 0.3})
        Traceback (most recent call last):
        ...
        ValueError: `explain_options` has unknown key 'residul'; valid keys: residual, head_norm, discard_ratio, start_layer, chunk_size, token_layout, memory_budget, recompute_attention.
    """  # noqa: E501

    residual: float = 0.5
    head_norm: str = "layer"
    discard_ratio: float = 0.0
    start_layer: int = 0
    chunk_size: int | None = None
    token_layout: TokenLayout | None = None
    memory_budget: int | None = None
    recompute_attention: bool | None = None

    def __post_init__(self) -> None:
        check_number_in_range("residual", self.residual, 0.0, 1.0)
        check_choice("head_norm", self.head_norm, HEAD_NORMS)
        check_number_in_range("discard_ratio", self.discard_ratio, 0.0, 1.0, include_high=False)
        check_non_negative_int("start_layer", self.start_layer)
        check_positive_int("chunk_size", self.chunk_size, allow_none=True)
        if self.token_layout is not None and not isinstance(self.token_layout, TokenLayout):
            raise TypeError(f"`token_layout` must be a TokenLayout or None, got {type(self.token_layout).__name__}.")
        check_positive_int("memory_budget", self.memory_budget, allow_none=True)
        if self.recompute_attention is not None and not isinstance(self.recompute_attention, bool):
            raise TypeError(f"`recompute_attention` must be True, False or None, got {self.recompute_attention!r}.")

    @classmethod
    def from_mapping(
        cls, options: ExplainOptions | Mapping[str, Any] | None, argument: str = "explain_options"
    ) -> ExplainOptions:
        """Options from keyword arguments (or options already built); an unknown key names ``argument`` and the fix."""
        if options is None:
            return cls()
        if isinstance(options, ExplainOptions):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"`{argument}` must be a dict or an ExplainOptions, got {type(options).__name__}.")
        names = [field.name for field in fields(cls)]
        unknown = [key for key in options if key not in names]
        if unknown:
            raise ValueError(
                f"`{argument}` has unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}."
            )
        return cls(**options)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of [`gmar_lightning.explain`][gmar_lightning.engine.explain]."""
        return {field.name: getattr(self, field.name) for field in fields(self)}
