"""Turn one evaluation's explanations into an :class:`EvaluationRecord` of plain data.

The callback decides *when* to explain and keeps the state; this module decides *what* is logged: overlay grids,
per-layer head-weight histograms, specialisation scalars, figures and probe-batch metric scores. Tags live under
``gmar/``; layers are numbered ``layer_00, layer_01, ...`` in forward order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from gmar_lightning import metrics
from gmar_lightning._checks import check_non_negative_int
from gmar_lightning.explanation import Explanation
from gmar_lightning.render import (
    denormalize,
    figure_to_array,
    head_heatmap_figure,
    overlay_grid_figure,
    trajectory_figure,
)
from gmar_lightning.trajectory import HeadTrajectory

__all__ = ["METRICS", "EvaluationRecord", "Probe", "evaluation_record", "probe_metric_scores"]

METRICS: tuple[str, ...] = ("pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc")
"""Metric names the callback accepts in ``metrics=``; the first two need ground-truth masks in the probe."""

_SUMMARY_TAGS = {"entropy": "entropy", "top_share": "top_head_share", "stability": "rank_stability"}


@dataclass(eq=False)
class EvaluationRecord:
    """Everything one evaluation logs, as plain data keyed by tag (e.g. ``"gmar/overlay/gmar_l1"``).

    Attributes:
        step: Trainer global step the values belong to.
        epoch: Trainer epoch.
        images: Tag -> ``[3, H, W]`` (or ``[1, H, W]``) float image in ``[0, 1]``, e.g. an overlay grid.
        figures: Tag -> matplotlib figure (head heatmap, trajectory, ...).
        histograms: Tag -> 1-D values, e.g. one layer's head weights.
        scalars: Tag -> number, e.g. one layer's head entropy.
        captions: Tag -> caption for the image or figure of the same tag.

    Examples:
        >>> import torch
        >>> record = EvaluationRecord(step=120, epoch=2, scalars={"gmar/entropy/layer_00": 0.93})
        >>> record.step, record.images, record.scalars
        (120, {}, {'gmar/entropy/layer_00': 0.93})
    """

    step: int
    epoch: int
    images: dict[str, Tensor] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_non_negative_int("step", self.step)
        check_non_negative_int("epoch", self.epoch)
        for tag, image in self.images.items():
            if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
                shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"`images[{tag!r}]` must be a [3, H, W] or [1, H, W] tensor, got {shape}.")
        for tag, figure in self.figures.items():
            if not isinstance(figure, Figure):
                raise TypeError(f"`figures[{tag!r}]` must be a matplotlib Figure, got {type(figure).__name__}.")
        for tag, values in self.histograms.items():
            if not isinstance(values, Tensor):
                raise TypeError(f"`histograms[{tag!r}]` must be a torch.Tensor, got {type(values).__name__}.")


@dataclass
class Probe:
    """The fixed batch explained at every evaluation, kept on the CPU.

    Attributes:
        images: ``[B, C, H, W]`` model inputs.
        labels: ``[B]`` class labels, if known.
        masks: ``[B, H, W]`` boolean object masks, if known (needed by the pointing games).
    """

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"images": self.images, "labels": self.labels, "masks": self.masks}


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else str(index)


def probe_metric_scores(
    model: nn.Module, probe: Probe, explanation: Explanation, names: Sequence[str]
) -> dict[str, float]:
    """Score one method's maps on the probe with the named metrics; metrics undefined without masks are skipped."""
    images = probe.images.to(explanation.maps.device)
    scores: dict[str, float] = {}
    for name in names:
        if name in ("pointing_game", "energy_pointing_game"):
            if probe.masks is None:
                continue
            metric = metrics.PointingGame() if name == "pointing_game" else metrics.EnergyPointingGame()
            metric.update(explanation.maps.cpu(), probe.masks.bool())
        else:
            metric_class = metrics.DeletionAUC if name == "deletion_auc" else metrics.InsertionAUC
            metric = metric_class(model)
            metric.update(images, explanation.maps, explanation.targets)
        scores[name] = float(metric.compute())
    return scores


def evaluation_record(
    *,
    step: int,
    epoch: int,
    probe: Probe,
    explanations: dict[str, Explanation],
    trajectory: HeadTrajectory,
    head_method: str | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = 16,
    class_names: Sequence[str] | None = None,
    per_head_histograms: bool = False,
    metric_scores: dict[str, dict[str, float]] | None = None,
) -> EvaluationRecord:
    """Assemble everything one evaluation logs.

    Args:
        step: Trainer global step.
        epoch: Trainer epoch.
        probe: The explained batch.
        explanations: Method name -> its explanation of the probe.
        trajectory: The head-importance trajectory, already updated with this evaluation.
        head_method: The GMAR method whose head weights feed histograms and the heatmap (``None``: no head data).
        mean: Per-channel normalisation mean for display (``None``: per-image min-max).
        std: Per-channel normalisation std for display.
        max_images: Most probe images shown per grid.
        class_names: Names for class indices in captions.
        per_head_histograms: Also log one histogram per head.
        metric_scores: Method -> metric name -> score on the probe.

    Returns:
        The record, with images ``gmar/overlay/<method>``, histograms ``gmar/head_weights/layer_XX``, scalars
        ``gmar/{entropy,top_head_share,rank_stability}/layer_XX`` and ``gmar/metrics/<method>/<metric>``, and figures
        ``gmar/head_importance`` and ``gmar/trajectory``.
    """
    display = denormalize(probe.images[:max_images], mean, std)
    record = EvaluationRecord(step=step, epoch=epoch)
    for method, explanation in explanations.items():
        shown = min(max_images, explanation.batch_size)
        predictions = explanation.predictions[:shown].tolist()
        truths = probe.labels[:shown].tolist() if probe.labels is not None else ["?"] * shown
        figure = overlay_grid_figure(
            display,
            explanation.maps[:shown].cpu(),
            labels=[_class_name(int(t), class_names) if t != "?" else "?" for t in truths],
            predictions=[_class_name(int(p), class_names) for p in predictions],
            max_images=max_images,
        )
        tag = f"gmar/overlay/{method}"
        record.images[tag] = torch.from_numpy(figure_to_array(figure)).permute(2, 0, 1).float() / 255.0
        hits = sum(int(t) == p for t, p in zip(truths, predictions, strict=True) if t != "?")
        record.captions[tag] = f"{method} at epoch {epoch}, step {step}: {hits}/{shown} probe images predicted right"
        for metric, score in (metric_scores or {}).get(method, {}).items():
            record.scalars[f"gmar/metrics/{method}/{metric}"] = score

    if head_method is not None:
        weights = explanations[head_method].head_weights.cpu()
        for layer in range(weights.shape[1]):
            # NaN marks heads a pruned layer no longer has: they get no histogram, and a layer without heads none.
            values = weights[:, layer].flatten()
            if not values.isnan().all():
                record.histograms[f"gmar/head_weights/layer_{layer:02d}"] = values[~values.isnan()]
            if per_head_histograms:
                for head in range(weights.shape[2]):
                    if not weights[:, layer, head].isnan().any():
                        tag = f"gmar/head_weights/layer_{layer:02d}/head_{head:02d}"
                        record.histograms[tag] = weights[:, layer, head]
        record.figures["gmar/head_importance"] = head_heatmap_figure(weights, trajectory.layer_names or None)
        for name, values in trajectory.summaries().items():
            for layer, value in enumerate(values[-1].tolist()):
                if not math.isnan(value):
                    record.scalars[f"gmar/{_SUMMARY_TAGS[name]}/layer_{layer:02d}"] = value
        record.figures["gmar/trajectory"] = trajectory_figure(trajectory)
    return record
