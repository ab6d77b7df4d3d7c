"""Models whose attention has no token rollout, each with the one-line reason given to the user.

Matched by class name, so no model module has to be imported. ``MODEL_REASONS`` is keyed by the model class,
``MODULE_REASONS`` by an attention (or pooling) class found anywhere inside the model.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MODEL_REASONS", "MODULE_REASONS", "refusal"]

_DIFFERENTIAL = (
    "its differential attention mixes tokens with softmax(Q1 K1^T) - lambda * softmax(Q2 K2^T), a signed matrix "
    "that is not a distribution over tokens, so attention rollout is not defined for it"
)

MODULE_REASONS: dict[str, str] = {
    "DiffAttention": _DIFFERENTIAL,
    "DiffParallelScalingBlock": _DIFFERENTIAL,
    "AttentionPoolLatent": (
        "it pools tokens with a learned latent query (global_pool='map'), whose read-out passes through an MLP and is "
        "not a fixed average of token rows; create it with global_pool='token' or 'avg'"
    ),
}

MODEL_REASONS: dict[str, str] = {
    "Xcit": "its cross-covariance attention (XCA) mixes feature channels, not tokens, so there is no token rollout",
    "VOLO": (
        "its outlook attention aggregates each local window with weights predicted from one token (no query-key "
        "attention over tokens), so there is no token rollout"
    ),
    "CrossVit": (
        "its cross-attention exchanges class tokens between two branches with different patch grids, which share no "
        "token space to roll out over"
    ),
    "EdgeNeXt": "its cross-covariance attention mixes feature channels, not tokens, so there is no token rollout",
    "DaVit": "it alternates window attention with channel attention, which mixes feature channels, not tokens",
    "Tnt": "its inner attention mixes pixels inside each patch and its outer attention mixes patches, two token spaces",
}


def refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be rolled out, or ``None`` when nothing known prevents it."""
    reason = MODEL_REASONS.get(type(model).__name__)
    if reason is not None:
        return reason
    for module in model.modules():
        reason = MODULE_REASONS.get(type(module).__name__)
        if reason is not None:
            return reason
    return None
