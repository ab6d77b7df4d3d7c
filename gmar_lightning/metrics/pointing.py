"""Localisation metrics: does a saliency map point at the object, given ground-truth masks?

[`PointingGame`][gmar_lightning.metrics.pointing.PointingGame] and
[`EnergyPointingGame`][gmar_lightning.metrics.pointing.EnergyPointingGame] (Zhang et al. 2016; Wang et al. 2020,
Score-CAM), for masks such as those of
[`gmar_lightning.demos.data.ShapesDataset`][gmar_lightning.demos.data.ShapesDataset]. Maps whose spatial size differs
from the masks are bilinearly resized to it first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gmar_lightning.metrics.functional import (
    _check_tolerance,
    _energy_pointing_game_update,
    _pointing_game_update,
    _saliency_segmentation_update,
)

__all__ = ["EnergyPointingGame", "PointingGame", "SaliencySegmentation"]


class PointingGame(Metric):
    """Fraction of images whose saliency map peaks on the object.

    For each image with a non-empty mask, ``hit = 1`` if the map's argmax pixel lies within Chebyshev distance
    ``tolerance`` of a mask pixel, i.e. inside the mask dilated by a ``(2 * tolerance + 1)``-pixel square, else ``0``;
    when several pixels tie for the maximum, ``hit`` is the share of them that lie there (see
    [`pointing_hits`][gmar_lightning.metrics.functional.pointing_hits]), so a constant map scores the object's area
    share. The metric is ``sum(hit) / #images with a non-empty mask`` (NaN before any such image). Images with empty
    masks are skipped. For patch-level pointing, pass token maps ``[B, h, w]`` with
    [`patch_masks`][gmar_lightning.metrics.functional.patch_masks] of the masks.

    Args:
        tolerance: Dilation radius of the masks in pixels, ``>= 0``.
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> maps = torch.zeros(2, 4, 4)
        >>> maps[0, 1, 1] = maps[1, 3, 3] = 1.0  # first peaks inside the mask, second two pixels away from it
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> masks[:, :2, :2] = True
        >>> [PointingGame(tolerance)(maps, masks) for tolerance in (0, 1, 2)]
        [tensor(0.5000), tensor(0.5000), tensor(1.)]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    hits: Tensor
    total: Tensor

    def __init__(self, tolerance: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_tolerance(tolerance)
        self.tolerance = tolerance
        self.add_state("hits", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Score a batch of maps ``[B, H', W']`` against boolean object masks ``[B, H, W]``."""
        hits, total = _pointing_game_update(maps, masks, self.tolerance)
        self.hits += hits
        self.total += total

    def compute(self) -> Tensor:
        """The hit rate over all images with a non-empty mask."""
        return self.hits / self.total


class EnergyPointingGame(Metric):
    """Mean share of saliency energy that falls on the object.

    Each map is min-max normalised to ``[0, 1]``, ``m = (s - min s) / (max s - min s)``, and scores
    ``sum(m * mask) / sum(m)``. A constant map carries no evidence and scores 0. Images with empty masks are
    skipped; the metric is the mean over the others (NaN before any).

    Args:
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> maps = torch.tensor([[[0.0, 1.0], [3.0, 5.0]]])  # normalised: 0, 0.2, 0.6, 1.0
        >>> masks = torch.tensor([[[False, True], [False, True]]])
        >>> EnergyPointingGame()(maps, masks)  # (0.2 + 1.0) / 1.8
        tensor(0.6667)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    energy: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("energy", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Score a batch of maps ``[B, H', W']`` against boolean object masks ``[B, H, W]``."""
        energy, total = _energy_pointing_game_update(maps, masks)
        self.energy += energy
        self.total += total

    def compute(self) -> Tensor:
        """The mean energy share over all images with a non-empty mask."""
        return self.energy / self.total


class SaliencySegmentation(Metric):
    """Chefer et al.'s (2021) segmentation test: pixel accuracy, mIoU and mAP of maps thresholded at their mean.

    Each map is resized to its mask, pixels above the map's mean are foreground, and over all images seen
    ``pixel_accuracy = sum correct / sum pixels``, ``miou = mean_{c in {bg, fg}} sum intersection_c / sum union_c``;
    ``map`` is the mean over images of the average precision of the raw scores against the mask (see
    [`saliency_segmentation`][gmar_lightning.metrics.functional.saliency_segmentation]). ``compute`` returns the three
    as a dict.

    Args:
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> maps = torch.tensor([[[0.9, 0.8], [0.7, 0.1]], [[0.0, 1.0], [0.0, 1.0]]])
        >>> masks = torch.tensor([[[True, False], [True, False]], [[False, True], [False, True]]])
        >>> # background IoU (1 + 2) / (2 + 2), foreground (2 + 2) / (3 + 2); AP 5/6 and 1
        >>> {name: round(value.item(), 4) for name, value in SaliencySegmentation()(maps, masks).items()}
        {'pixel_accuracy': 0.875, 'miou': 0.775, 'map': 0.9167}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    pixels: Tensor
    intersection: Tensor
    union: Tensor
    ap_sum: Tensor
    ap_count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("pixels", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("intersection", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ap_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("ap_count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Score a batch of maps ``[B, H', W']`` against boolean object masks ``[B, H, W]``."""
        correct, pixels, intersection, union, ap_sum, ap_count = _saliency_segmentation_update(maps, masks)
        self.correct += correct
        self.pixels += pixels.to(self.pixels.device)
        self.intersection += intersection
        self.union += union
        self.ap_sum += ap_sum
        self.ap_count += ap_count

    def compute(self) -> dict[str, Tensor]:
        """``{"pixel_accuracy", "miou", "map"}`` over all images seen."""
        return {
            "pixel_accuracy": self.correct / self.pixels,
            "miou": (self.intersection / self.union).mean(),
            "map": self.ap_sum / self.ap_count,
        }
