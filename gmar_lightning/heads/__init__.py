"""Act on attention-head importance: mask heads, measure Michel et al. importance, rank heads, trace ablation curves.

- [`masking`][gmar_lightning.heads.masking]: [`head_mask`][gmar_lightning.heads.masking.head_mask],
  [`mask_from_order`][gmar_lightning.heads.masking.mask_from_order],
  [`attention_head_grid`][gmar_lightning.heads.masking.attention_head_grid].
- [`importance`][gmar_lightning.heads.importance]:
  [`michel_importance`][gmar_lightning.heads.importance.michel_importance],
  [`rank_heads`][gmar_lightning.heads.importance.rank_heads],
  [`random_order`][gmar_lightning.heads.importance.random_order].
- [`ablation`][gmar_lightning.heads.ablation]: [`AblationCurve`][gmar_lightning.heads.ablation.AblationCurve],
  [`head_ablation_curve`][gmar_lightning.heads.ablation.head_ablation_curve],
  [`plot_ablation_curves`][gmar_lightning.heads.ablation.plot_ablation_curves].
- [`pruning`][gmar_lightning.heads.pruning]: [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] (remove heads for
  real), [`restore_pruning`][gmar_lightning.heads.pruning.restore_pruning],
  [`slice_optimizer_state`][gmar_lightning.heads.pruning.slice_optimizer_state],
  [`prune_gradually`][gmar_lightning.heads.pruning.prune_gradually] and
  [`distillation_loss`][gmar_lightning.heads.pruning.distillation_loss] (pruning with recovery fine-tunes),
  [`weight_magnitude_importance`][gmar_lightning.heads.pruning.weight_magnitude_importance],
  [`head_counts`][gmar_lightning.heads.pruning.head_counts].
"""

from gmar_lightning.heads._batches import LossFn, per_example_cross_entropy
from gmar_lightning.heads.ablation import DEFAULT_FRACTIONS, AblationCurve, head_ablation_curve, plot_ablation_curves
from gmar_lightning.heads.importance import michel_importance, random_order, rank_heads
from gmar_lightning.heads.masking import attention_head_grid, head_mask, mask_from_order
from gmar_lightning.heads.pruning import (
    ParameterSlice,
    PruningEvent,
    distillation_loss,
    head_counts,
    head_ids,
    measure_speedup,
    measure_throughput,
    present_heads,
    prune_gradually,
    prune_heads,
    pruning_events,
    pruning_spec,
    restore_pruning,
    restore_pruning_on_load,
    select_heads,
    slice_optimizer_state,
    weight_magnitude_importance,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "AblationCurve",
    "LossFn",
    "ParameterSlice",
    "PruningEvent",
    "attention_head_grid",
    "distillation_loss",
    "head_ablation_curve",
    "head_counts",
    "head_ids",
    "head_mask",
    "mask_from_order",
    "measure_speedup",
    "measure_throughput",
    "michel_importance",
    "per_example_cross_entropy",
    "plot_ablation_curves",
    "present_heads",
    "prune_gradually",
    "prune_heads",
    "pruning_events",
    "pruning_spec",
    "random_order",
    "rank_heads",
    "restore_pruning",
    "restore_pruning_on_load",
    "select_heads",
    "slice_optimizer_state",
    "weight_magnitude_importance",
]
