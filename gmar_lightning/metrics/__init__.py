"""Faithfulness and localisation metrics for saliency maps, as torchmetrics metrics that sync across processes.

* [`PointingGame`][gmar_lightning.metrics.pointing.PointingGame] and
  [`EnergyPointingGame`][gmar_lightning.metrics.pointing.EnergyPointingGame] (Zhang et al. 2016; Wang et al. 2020,
  Score-CAM) check whether a map points at the object, given ground-truth masks such as those of
  [`gmar_lightning.demos.data.ShapesDataset`][gmar_lightning.demos.data.ShapesDataset].
* [`DeletionAUC`][gmar_lightning.metrics.perturbation.DeletionAUC] and
  [`InsertionAUC`][gmar_lightning.metrics.perturbation.InsertionAUC] (Petsiuk et al. 2018, RISE) check whether the
  pixels a map ranks first are the ones the model needs: they perturb images in saliency order and integrate the target
  probability. [`deletion_curve`][gmar_lightning.metrics.functional.deletion_curve] and
  [`insertion_curve`][gmar_lightning.metrics.functional.insertion_curve] (in
  [`functional`][gmar_lightning.metrics.functional], beside
  [`pointing_game`][gmar_lightning.metrics.functional.pointing_game] and
  [`energy_pointing_game`][gmar_lightning.metrics.functional.energy_pointing_game]) return the underlying curves for
  plotting.

* [`SaliencySegmentation`][gmar_lightning.metrics.pointing.SaliencySegmentation] is Chefer et al.'s (2021) segmentation
  test (pixel accuracy, mIoU, mAP); [`TokenPerturbationAUC`][gmar_lightning.metrics.perturbation.TokenPerturbationAUC]
  their positive/negative perturbation test on patch tokens; [`ROAD`][gmar_lightning.metrics.perturbation.ROAD] the
  remove-and-debias test of Rong et al. (2022) with noisy linear imputation.

Maps whose spatial size differs from the masks or images are bilinearly resized to it first.
"""

from gmar_lightning.metrics.functional import (
    average_precision,
    deletion_curve,
    energy_pointing_game,
    energy_shares,
    insertion_curve,
    noisy_linear_imputation,
    patch_masks,
    pointing_game,
    pointing_hits,
    road_curve,
    saliency_segmentation,
    token_perturbation_curve,
)
from gmar_lightning.metrics.perturbation import ROAD, DeletionAUC, InsertionAUC, TokenPerturbationAUC
from gmar_lightning.metrics.pointing import EnergyPointingGame, PointingGame, SaliencySegmentation
from gmar_lightning.metrics.registry import METRICS, RegisteredMetric

__all__ = [
    "METRICS",
    "ROAD",
    "DeletionAUC",
    "EnergyPointingGame",
    "InsertionAUC",
    "PointingGame",
    "RegisteredMetric",
    "SaliencySegmentation",
    "TokenPerturbationAUC",
    "average_precision",
    "deletion_curve",
    "energy_pointing_game",
    "energy_shares",
    "insertion_curve",
    "noisy_linear_imputation",
    "patch_masks",
    "pointing_game",
    "pointing_hits",
    "road_curve",
    "saliency_segmentation",
    "token_perturbation_curve",
]
