"""Faithfulness metrics: are the pixels a map ranks first the ones the model needs?

[`DeletionAUC`][gmar_lightning.metrics.perturbation.DeletionAUC] and
[`InsertionAUC`][gmar_lightning.metrics.perturbation.InsertionAUC] (Petsiuk et al. 2018, RISE) perturb images in
saliency order and integrate the target probability;
[`deletion_curve`][gmar_lightning.metrics.functional.deletion_curve] and
[`insertion_curve`][gmar_lightning.metrics.functional.insertion_curve] return the underlying curves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gmar_lightning.metrics.functional import _check_blur, _check_positive_int, deletion_curve, insertion_curve

__all__ = ["DeletionAUC", "InsertionAUC"]


class _PerturbationAUC(Metric):
    """Shared state and update of the deletion and insertion AUCs; a subclass supplies the curve (``_curve``).

    The model is kept as a plain attribute, not a submodule, so it stays out of the metric's ``state_dict``,
    device moves and process sync, which cover only the AUC sum and the image count.
    """

    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    model: nn.Module
    auc_sum: Tensor
    total: Tensor

    def __init__(self, model: nn.Module, steps: int, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        _check_positive_int("steps", steps)
        _check_positive_int("batch_size", batch_size)
        # Bypass nn.Module.__setattr__ so the model is not registered as a submodule.
        object.__setattr__(self, "model", model)
        self.steps = steps
        self.batch_size = batch_size
        self.add_state("auc_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, images: Tensor, maps: Tensor, targets: Tensor) -> None:
        """Add the AUCs of a batch: ``images [B, C, H, W]``, ``maps [B, H', W']``, ``targets [B]``."""
        fractions, scores = self._curve(images, maps, targets)
        self.auc_sum += torch.trapezoid(scores, fractions, dim=1).sum()
        self.total += scores.shape[0]

    def compute(self) -> Tensor:
        """The mean AUC over all images seen."""
        return self.auc_sum / self.total


class DeletionAUC(_PerturbationAUC):
    """Area under the deletion curve: how fast the target probability falls as salient pixels are removed.

    With ``p_k`` the target's softmax probability after replacing the top ``min(k * ceil(HW / steps), HW)``
    pixels by ``baseline`` and ``x_k`` that count over ``HW``, the score of one image is the trapezoid rule
    ``AUC = sum_k (x_{k+1} - x_k) (p_k + p_{k+1}) / 2`` over ``k = 0..steps``; the metric is the mean over images.
    Lower is better: a faithful map deletes the evidence first. See
    [`deletion_curve`][gmar_lightning.metrics.functional.deletion_curve] for the arguments.

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits.
        steps: Number of perturbation steps.
        baseline: Value of deleted pixels in the model's input space (number or tensor broadcastable to the images).
        batch_size: Perturbed images per forward pass.
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> class LeftHalf(nn.Module):  # only the left half of the image is evidence for class 0
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         logit = 4 * x[..., :2].mean(dim=(1, 2, 3)) - 2
        ...         return torch.stack([logit, torch.zeros_like(logit)], dim=1)
        >>> images, targets = torch.ones(1, 1, 4, 4), torch.tensor([0])
        >>> left_first = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(1, 4, 4)
        >>> good, reversed_ = DeletionAUC(LeftHalf(), steps=4), DeletionAUC(LeftHalf(), steps=4)
        >>> good.update(images, left_first, targets)
        >>> reversed_.update(images, left_first.flip(-1), targets)
        >>> good.compute(), reversed_.compute()
        (tensor(0.3096), tensor(0.6904))
    """

    higher_is_better = False

    def __init__(
        self, model: nn.Module, steps: int = 50, baseline: float | Tensor = 0.0, batch_size: int = 128, **kwargs: Any
    ) -> None:
        super().__init__(model, steps, batch_size, **kwargs)
        if not isinstance(baseline, (int, float, Tensor)) or isinstance(baseline, bool):
            raise TypeError(f"`baseline` must be a number or a tensor, got {type(baseline).__name__}.")
        self.baseline = baseline

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return deletion_curve(self.model, images, maps, targets, self.steps, self.baseline, self.batch_size)


class InsertionAUC(_PerturbationAUC):
    """Area under the insertion curve: how fast the target probability rises as salient pixels are revealed.

    Like [`DeletionAUC`][gmar_lightning.metrics.perturbation.DeletionAUC], but ``p_k`` is measured on the
    Gaussian-blurred image with its top ``min(k * ceil(HW / steps), HW)`` pixels restored to the original. Higher is
    better. See [`insertion_curve`][gmar_lightning.metrics.functional.insertion_curve] for the arguments.

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits.
        steps: Number of perturbation steps.
        blur_kernel_size: Odd side of the Gaussian kernel that makes the starting image.
        blur_sigma: Standard deviation of that Gaussian, in pixels.
        batch_size: Perturbed images per forward pass.
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> class LeftHalf(nn.Module):  # only the left half of the image is evidence for class 0
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         logit = 4 * x[..., :2].mean(dim=(1, 2, 3)) - 2
        ...         return torch.stack([logit, torch.zeros_like(logit)], dim=1)
        >>> images, targets = torch.zeros(1, 1, 4, 4), torch.tensor([0])
        >>> images[..., :2] = 1.0
        >>> left_first = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(1, 4, 4)
        >>> good, reversed_ = InsertionAUC(LeftHalf(), steps=4), InsertionAUC(LeftHalf(), steps=4)
        >>> good.update(images, left_first, targets)
        >>> reversed_.update(images, left_first.flip(-1), targets)
        >>> good.compute(), reversed_.compute()
        (tensor(0.8143), tensor(0.6867))
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        steps: int = 50,
        blur_kernel_size: int = 11,
        blur_sigma: float = 5.0,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, steps, batch_size, **kwargs)
        _check_blur(blur_kernel_size, blur_sigma)
        self.blur_kernel_size = blur_kernel_size
        self.blur_sigma = blur_sigma

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return insertion_curve(
            self.model, images, maps, targets, self.steps, self.blur_kernel_size, self.blur_sigma, self.batch_size
        )
