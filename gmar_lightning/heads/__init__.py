"""Act on attention-head importance: mask heads, measure Michel et al. importance, rank heads, trace ablation curves.

- :mod:`~gmar_lightning.heads.masking`: :func:`head_mask`, :func:`mask_from_order`, :func:`attention_head_grid`.
- :mod:`~gmar_lightning.heads.importance`: :func:`michel_importance`, :func:`rank_heads`, :func:`random_order`.
- :mod:`~gmar_lightning.heads.ablation`: :class:`AblationCurve`, :func:`head_ablation_curve`,
  :func:`plot_ablation_curves`.
- :mod:`~gmar_lightning.heads.pruning`: :func:`prune_heads` (remove heads for real), :func:`restore_pruning`,
  :func:`slice_optimizer_state`, :func:`weight_magnitude_importance`, :func:`head_counts`.
"""

from gmar_lightning.heads._batches import LossFn, per_example_cross_entropy
from gmar_lightning.heads.ablation import DEFAULT_FRACTIONS, AblationCurve, head_ablation_curve, plot_ablation_curves
from gmar_lightning.heads.importance import michel_importance, random_order, rank_heads
from gmar_lightning.heads.masking import attention_head_grid, head_mask, mask_from_order
from gmar_lightning.heads.pruning import (
    ParameterSlice,
    head_counts,
    head_ids,
    prune_heads,
    pruning_spec,
    restore_pruning,
    slice_optimizer_state,
    weight_magnitude_importance,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "AblationCurve",
    "LossFn",
    "ParameterSlice",
    "attention_head_grid",
    "head_ablation_curve",
    "head_counts",
    "head_ids",
    "head_mask",
    "mask_from_order",
    "michel_importance",
    "per_example_cross_entropy",
    "plot_ablation_curves",
    "prune_heads",
    "pruning_spec",
    "random_order",
    "rank_heads",
    "restore_pruning",
    "slice_optimizer_state",
    "weight_magnitude_importance",
]
