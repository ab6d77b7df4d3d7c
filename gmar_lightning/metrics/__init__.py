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

Maps whose spatial size differs from the masks or images are bilinearly resized to it first.
"""

from gmar_lightning.metrics.functional import deletion_curve, energy_pointing_game, insertion_curve, pointing_game
from gmar_lightning.metrics.perturbation import DeletionAUC, InsertionAUC
from gmar_lightning.metrics.pointing import EnergyPointingGame, PointingGame

__all__ = [
    "DeletionAUC",
    "EnergyPointingGame",
    "InsertionAUC",
    "PointingGame",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_curve",
    "pointing_game",
]
