"""Faithfulness metrics: are the pixels a map ranks first the ones the model needs?

[`DeletionAUC`][gmar_lightning.metrics.perturbation.DeletionAUC] and
[`InsertionAUC`][gmar_lightning.metrics.perturbation.InsertionAUC] (Petsiuk et al. 2018, RISE) perturb images in
saliency order and integrate the target probability;
[`TokenPerturbationAUC`][gmar_lightning.metrics.perturbation.TokenPerturbationAUC] (Chefer et al. 2021) removes patch
tokens in relevance order and [`ROAD`][gmar_lightning.metrics.perturbation.ROAD] (Rong et al. 2022) removes pixels
by noisy linear imputation, both tracking top-1 accuracy. The functions in
[`gmar_lightning.metrics.functional`][gmar_lightning.metrics.functional] return the underlying curves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gmar_lightning._checks import check_positive_int
from gmar_lightning.metrics.functional import (
    DEFAULT_PERTURBATION_FRACTIONS,
    _check_blur,
    _check_fractions,
    _check_noise_std,
    deletion_curve,
    insertion_curve,
    road_curve,
    token_perturbation_curve,
)

__all__ = ["ROAD", "DeletionAUC", "InsertionAUC", "TokenPerturbationAUC"]


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

    def __init__(self, model: nn.Module, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        check_positive_int("batch_size", batch_size)
        # Bypass nn.Module.__setattr__ so the model is not registered as a submodule.
        object.__setattr__(self, "model", model)
        self.batch_size = batch_size
        self.add_state("auc_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, images: Tensor, maps: Tensor, targets: Tensor) -> None:
        """Add the AUCs of a batch: ``images [B, C, H, W]``, ``maps [B, H', W']``, ``targets [B]``."""
        fractions, scores = self._curve(images, maps, targets)
        fractions = fractions.to(scores.device)
        if len(fractions) == 1:
            self.auc_sum += scores.sum()
        else:
            # Divided by the span of the fractions, so a curve over [0.1, 0.9] is an average accuracy in [0, 1] too.
            self.auc_sum += (torch.trapezoid(scores, fractions, dim=1) / (fractions[-1] - fractions[0])).sum()
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
        super().__init__(model, batch_size, **kwargs)
        check_positive_int("steps", steps)
        self.steps = steps
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
        super().__init__(model, batch_size, **kwargs)
        check_positive_int("steps", steps)
        self.steps = steps
        _check_blur(blur_kernel_size, blur_sigma)
        self.blur_kernel_size = blur_kernel_size
        self.blur_sigma = blur_sigma

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return insertion_curve(
            self.model, images, maps, targets, self.steps, self.blur_kernel_size, self.blur_sigma, self.batch_size
        )


class TokenPerturbationAUC(_PerturbationAUC):
    """Chefer et al.'s (2021) positive or negative perturbation test: accuracy as patch tokens are removed.

    Per image, the top-1 correctness ``c_k`` after removing the fraction ``f_k`` of patches (most relevant first for the
    positive test, least relevant first for the negative one; see
    [`token_perturbation_curve`][gmar_lightning.metrics.functional.token_perturbation_curve]) is integrated by the
    trapezoid rule and divided by the span of the fractions,
    ``AUC = sum_k (f_{k+1} - f_k) (c_k + c_{k+1}) / 2 / (f_K - f_1)``, an average accuracy in ``[0, 1]``; the metric
    is the mean over images. Positive: lower is better; negative: higher is better.

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits.
        negative: The negative test (least relevant patches first).
        fractions: Fractions of patches removed, increasing, in ``[0, 1]``; default 0.1 to 0.9 as in the paper.
        baseline: Value the removed patches take in the model's input space.
        batch_size: Perturbed images per forward pass.
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> class LeftHalf(nn.Module):  # class 0 while the whole left half is bright
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         logit = 4 * x[..., :2].mean(dim=(1, 2, 3)) - 3
        ...         return torch.stack([logit, torch.zeros_like(logit)], dim=1)
        >>> images, targets = torch.ones(1, 1, 4, 4), torch.tensor([0])
        >>> left_first = torch.tensor([[[2.0, 1.0], [2.0, 1.0]]])  # 2x2 tokens, the left ones most relevant
        >>> positive = TokenPerturbationAUC(LeftHalf(), fractions=(0.25, 0.5, 0.75))
        >>> positive.update(images, left_first, targets)  # wrong, wrong, wrong
        >>> negative = TokenPerturbationAUC(LeftHalf(), negative=True, fractions=(0.25, 0.5, 0.75))
        >>> negative.update(images, left_first, targets)  # correct, correct, wrong: (0.25 + 0.125) / 0.5
        >>> positive.compute(), negative.compute()
        (tensor(0.), tensor(0.7500))
    """

    # Lower is better for the positive test, higher for the negative one: no single direction.
    higher_is_better = None

    def __init__(
        self,
        model: nn.Module,
        negative: bool = False,
        fractions: tuple[float, ...] = DEFAULT_PERTURBATION_FRACTIONS,
        baseline: float = 0.0,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, batch_size, **kwargs)
        self.fractions = tuple(_check_fractions(fractions))
        self.negative = bool(negative)
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
            raise TypeError(f"`baseline` must be a number, got {type(baseline).__name__}.")
        self.baseline = float(baseline)

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return token_perturbation_curve(
            self.model, images, maps, targets, self.fractions, self.negative, self.baseline, self.batch_size
        )


class ROAD(_PerturbationAUC):
    """ROAD (Rong et al. 2022): accuracy as the most (MoRF) or least (LeRF) relevant pixels are imputed away.

    Per image, the top-1 correctness after removing each fraction of pixels by noisy linear imputation (see
    [`road_curve`][gmar_lightning.metrics.functional.road_curve]) is integrated by the trapezoid rule and divided by the
    span of the fractions, an average accuracy in ``[0, 1]``; the metric is the mean over images. MoRF: lower is better;
    LeRF: higher is better.

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits.
        most_relevant_first: MoRF (True) or LeRF (False).
        fractions: Fractions of pixels removed, increasing, in ``[0, 1]``; default 0.1 to 0.9 as in the paper.
        noise_std: Standard deviation of the imputation noise, in the model's input space.
        seed: Seed of the imputation noise; each update draws from a generator seeded with it.
        batch_size: Imputed images per forward pass.
        kwargs: Passed to `torchmetrics.Metric`.

    Examples:
        >>> class LeftHalf(nn.Module):  # class 0 if the left half is bright
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         logit = 4 * x[..., :2].mean(dim=(1, 2, 3)) - 2
        ...         return torch.stack([logit, torch.zeros_like(logit)], dim=1)
        >>> images, targets = torch.zeros(1, 1, 4, 4), torch.tensor([0])
        >>> images[..., :2] = 1.0
        >>> left_first = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(1, 4, 4)
        >>> morf = ROAD(LeftHalf(), fractions=(0.25, 0.5), noise_std=0.0)
        >>> morf.update(images, left_first, targets)  # column 0 refilled from column 1, then the bright half lost
        >>> lerf = ROAD(LeftHalf(), most_relevant_first=False, fractions=(0.25, 0.5), noise_std=0.0)
        >>> lerf.update(images, left_first, targets)
        >>> morf.compute(), lerf.compute()
        (tensor(0.5000), tensor(1.))
    """

    # Lower is better for MoRF, higher for LeRF: no single direction.
    higher_is_better = None

    def __init__(
        self,
        model: nn.Module,
        most_relevant_first: bool = True,
        fractions: tuple[float, ...] = DEFAULT_PERTURBATION_FRACTIONS,
        noise_std: float = 0.01,
        seed: int = 0,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, batch_size, **kwargs)
        self.fractions = tuple(_check_fractions(fractions))
        self.most_relevant_first = bool(most_relevant_first)
        # Checked here too, so a bad value fails when the metric is built rather than at its first update.
        self.noise_std = _check_noise_std(noise_std)
        self.seed = seed

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return road_curve(
            self.model,
            images,
            maps,
            targets,
            self.fractions,
            self.most_relevant_first,
            self.noise_std,
            self.seed,
            self.batch_size,
        )
