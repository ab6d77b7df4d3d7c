"""Faithfulness and localisation metrics for saliency maps, as torchmetrics metrics that sync across processes.

* :class:`PointingGame` and :class:`EnergyPointingGame` (Zhang et al. 2016; Wang et al. 2020, Score-CAM) check
  whether a map points at the object, given ground-truth masks such as those of
  :class:`gmar_lightning.demos.data.ShapesDataset`.
* :class:`DeletionAUC` and :class:`InsertionAUC` (Petsiuk et al. 2018, RISE) check whether the pixels a map ranks
  first are the ones the model needs: they perturb images in saliency order and integrate the target probability.
  :func:`deletion_curve` and :func:`insertion_curve` (in :mod:`~gmar_lightning.metrics.functional`, beside
  :func:`pointing_game` and :func:`energy_pointing_game`) return the underlying curves for plotting.

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
