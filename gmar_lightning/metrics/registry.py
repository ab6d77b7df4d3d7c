"""The metrics by name, so the callback (``metrics=[...]``) and other callers look them up instead of branching.

Examples:
    >>> sorted(METRICS)
    ['deletion_auc', 'energy_pointing_game', 'insertion_auc', 'pointing_game']
    >>> METRICS["pointing_game"].inputs
    'masks'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torchmetrics import Metric

from gmar_lightning.metrics.perturbation import DeletionAUC, InsertionAUC
from gmar_lightning.metrics.pointing import EnergyPointingGame, PointingGame

__all__ = ["METRICS", "RegisteredMetric"]


@dataclass(frozen=True)
class RegisteredMetric:
    """A metric class and what it scores maps against.

    Args:
        metric: The `torchmetrics.Metric` class.
        inputs: ``"masks"``: built without arguments, ``update(maps, masks)`` against ground-truth object masks;
            ``"model"``: built from the model, ``update(images, maps, targets)`` by perturbing the images.
    """

    metric: type[Metric]
    inputs: Literal["masks", "model"]

    def score(self, model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, masks: Tensor | None) -> float:
        """The metric on one batch; a ``"masks"`` metric needs ``masks`` (``[B, H, W]``)."""
        if self.inputs == "masks":
            if masks is None:
                raise ValueError(f"`masks` are needed by {self.metric.__name__}; pass ground-truth object masks.")
            metric = self.metric()
            metric.update(maps.cpu(), masks.bool())
        else:
            metric = self.metric(model)
            metric.update(images, maps, targets)
        return float(metric.compute())


METRICS: dict[str, RegisteredMetric] = {
    "pointing_game": RegisteredMetric(PointingGame, "masks"),
    "energy_pointing_game": RegisteredMetric(EnergyPointingGame, "masks"),
    "deletion_auc": RegisteredMetric(DeletionAUC, "model"),
    "insertion_auc": RegisteredMetric(InsertionAUC, "model"),
}
"""Metric name -> its class and inputs; adding a metric to the callback's ``metrics=`` is one entry here."""
