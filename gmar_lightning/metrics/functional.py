"""Functional forms of the metrics: plain functions on one batch, the maths the Metric classes accumulate.

Examples:
    >>> maps = torch.zeros(2, 4, 4)
    >>> maps[0, 1, 1] = maps[1, 3, 3] = 1.0
    >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    >>> masks[:, :2, :2] = True
    >>> pointing_game(maps, masks), pointing_game(maps, masks, tolerance=2)
    (tensor(0.5000), tensor(1.))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmar_lightning._checks import check_logits, check_non_negative_int, check_positive_int
from gmar_lightning.model_state import eval_mode

__all__ = [
    "DEFAULT_PERTURBATION_FRACTIONS",
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


def _check_tolerance(tolerance: object) -> None:
    check_non_negative_int("tolerance", tolerance)


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Per-image pointing-game hit, ``[B]``: the share of the map's maximal pixels that lie on the (dilated) object.

    ``hit = |argmax(map) ∩ dilate(mask, tolerance)| / |argmax(map)|``, with ``argmax(map)`` the set of pixels where
    the map attains its maximum and ``dilate`` a ``(2 * tolerance + 1)``-pixel square (Chebyshev distance
    ``tolerance``). With one maximum this is the usual 0/1 hit. Sharing ties makes the score of a map that carries no
    information (constant, or flat over a region) its expected hit under a uniformly random choice among the tied
    pixels, so a constant map scores exactly the object's area share. NaN where the mask is empty.

    Args:
        maps: ``[B, H', W']`` saliency, higher = more important; resized bilinearly to the masks' size if needed.
        masks: ``[B, H, W]`` boolean object masks.
        tolerance: Dilation radius of the masks in pixels, ``>= 0``.

    Examples:
        >>> masks = torch.zeros(2, 2, 2, dtype=torch.bool)
        >>> masks[:, 0, 0] = True
        >>> pointing_hits(torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]), masks)
        tensor([1.0000, 0.2500])
    """
    _check_tolerance(tolerance)
    maps = _maps_matching_masks(maps, masks).flatten(1)
    has_object = masks.flatten(1).any(dim=1)
    if tolerance > 0:
        kernel_size = 2 * tolerance + 1
        masks = F.max_pool2d(masks[:, None].float(), kernel_size, stride=1, padding=tolerance)[:, 0] > 0
    peaks = maps == maps.amax(dim=1, keepdim=True)
    hits = (peaks & masks.flatten(1)).sum(dim=1) / peaks.sum(dim=1)
    return torch.where(has_object, hits.float(), math.nan)


def _pointing_game_update(maps: Tensor, masks: Tensor, tolerance: int) -> tuple[Tensor, Tensor]:
    """Summed hits and the number of images with a non-empty mask in one batch."""
    hits = pointing_hits(maps, masks, tolerance)
    defined = ~hits.isnan()
    return hits[defined].sum(), defined.sum()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Mean [`pointing_hits`][gmar_lightning.metrics.functional.pointing_hits] over the images with a non-empty mask
    (NaN if there are none).

    The functional form of [`PointingGame`][gmar_lightning.metrics.pointing.PointingGame].

    Args:
        maps: ``[B, H', W']`` saliency, higher = more important.
        masks: ``[B, H, W]`` boolean object masks.
        tolerance: Dilation radius of the masks in pixels, ``>= 0``.
    """
    hits, total = _pointing_game_update(maps, masks, tolerance)
    return hits / total


def patch_masks(masks: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Object masks on the patch grid, ``[B, H, W] -> [B, h, w]``: a patch is on the object if any of its pixels is.

    With token maps ``[B, h, w]`` this turns [`pointing_hits`][gmar_lightning.metrics.functional.pointing_hits] into
    patch-level pointing (does the peak token's patch touch the object?), which does not depend on how the maps are
    upsampled.

    Args:
        masks: ``[B, H, W]`` boolean object masks; ``H`` and ``W`` multiples of ``h`` and ``w``.
        grid_size: The patch grid ``(h, w)``.

    Examples:
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> masks[0, 1, 2] = True
        >>> patch_masks(masks, (2, 2)).tolist()
        [[[False, True], [False, False]]]
    """
    if not isinstance(masks, Tensor) or masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"`masks` must be a bool tensor of shape [B, H, W], got {_describe(masks)}.")
    height, width = masks.shape[-2:]
    if height % grid_size[0] or width % grid_size[1]:
        raise ValueError(f"`grid_size` {tuple(grid_size)} must divide the masks' size {height}x{width}.")
    pooled = F.max_pool2d(masks[:, None].float(), (height // grid_size[0], width // grid_size[1]))
    return pooled[:, 0] > 0


def energy_shares(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image energy pointing game, ``[B]``: ``sum(m * mask) / sum(m)`` with ``m`` the min-max normalised map.

    A constant map carries no evidence and scores 0; NaN where the mask is empty.

    Args:
        maps: ``[B, H', W']`` saliency, higher = more important; resized bilinearly to the masks' size if needed.
        masks: ``[B, H, W]`` boolean object masks.

    Examples:
        >>> energy_shares(torch.tensor([[[0.0, 1.0], [3.0, 5.0]]]), torch.tensor([[[False, True], [False, True]]]))
        tensor([0.6667])
    """
    maps = _maps_matching_masks(maps, masks).float().flatten(1)
    masks = masks.flatten(1)
    low, high = maps.aminmax(dim=1, keepdim=True)
    spread = high - low
    normalised = torch.where(spread > 0, (maps - low) / spread.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    total_energy = normalised.sum(dim=1)
    share = torch.where(total_energy > 0, (normalised * masks).sum(dim=1) / total_energy.clamp_min(1e-12), 0.0)
    return torch.where(masks.any(dim=1), share, math.nan)


def _energy_pointing_game_update(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Summed energy shares and the number of images with a non-empty mask in one batch."""
    shares = energy_shares(maps, masks)
    defined = ~shares.isnan()
    return shares[defined].sum(), defined.sum()


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean share of min-max normalised saliency that falls on the object.

    The functional form of [`EnergyPointingGame`][gmar_lightning.metrics.pointing.EnergyPointingGame].

    Args:
        maps: ``[B, H', W']`` saliency, higher = more important.
        masks: ``[B, H, W]`` boolean object masks.
    """
    energy, total = _energy_pointing_game_update(maps, masks)
    return energy / total


def deletion_curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = 50,
    baseline: float | Tensor = 0.0,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Target probability as the most salient pixels are replaced by ``baseline``, step by step.

    Each step replaces ``ceil(H * W / steps)`` more pixels (all channels), in decreasing saliency order.

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits ``[N, K]``; run in eval mode without gradients and
            restored afterwards. It must live on the images' device.
        images: ``[B, C, H, W]`` inputs, in the model's input space.
        maps: ``[B, H', W']`` saliency, higher = more important.
        targets: ``[B]`` class whose softmax probability is tracked.
        steps: Number of perturbation steps; the curves have ``steps + 1`` points.
        baseline: Value of deleted pixels in the model's input space: a number, or a tensor broadcastable to
            the images (e.g. per-channel ``[C, 1, 1]``, or one baseline image per input).
        batch_size: Perturbed images per forward pass; all steps of all images are batched together.

    Returns:
        ``fractions [steps + 1]`` of pixels replaced (0 to 1) and ``scores [B, steps + 1]`` target probabilities.

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> images, maps, targets = torch.ones(3, 1, 2, 2), torch.rand(3, 2, 2), torch.zeros(3, dtype=torch.long)
        >>> fractions, scores = deletion_curve(model, images, maps, targets, steps=2)
        >>> fractions.tolist(), scores.shape
        ([0.0, 0.5, 1.0], torch.Size([3, 3]))
    """
    _check_perturbation_args(model, images, maps, targets, steps, batch_size)
    if not isinstance(baseline, (int, float, Tensor)) or isinstance(baseline, bool):
        raise TypeError(f"`baseline` must be a number or a tensor, got {type(baseline).__name__}.")
    fill = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    try:
        fill = fill.expand_as(images)
    except RuntimeError:
        raise ValueError(
            f"`baseline` of shape {list(fill.shape)} must broadcast to the images' shape {list(images.shape)}."
        ) from None
    return _perturbation_curve(model, images, fill, maps, targets, steps, batch_size)


def insertion_curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    steps: int = 50,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Target probability as the most salient pixels of a blurred image are restored, step by step.

    Starts from the image blurred by a Gaussian (replicate-padded) and reveals ``ceil(H * W / steps)`` more original
    pixels per step, in decreasing saliency order. Arguments as in
    [`deletion_curve`][gmar_lightning.metrics.functional.deletion_curve], plus:

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits ``[N, K]``.
        images: ``[B, C, H, W]`` inputs, in the model's input space.
        maps: ``[B, H', W']`` saliency, higher = more important.
        targets: ``[B]`` class whose softmax probability is tracked.
        steps: Number of perturbation steps.
        blur_kernel_size: Odd side of the Gaussian kernel that makes the starting image.
        blur_sigma: Standard deviation of that Gaussian, in pixels.
        batch_size: Perturbed images per forward pass.

    Returns:
        ``fractions [steps + 1]`` of pixels revealed (0 to 1) and ``scores [B, steps + 1]`` target probabilities.

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> images, maps, targets = torch.ones(3, 1, 2, 2), torch.rand(3, 2, 2), torch.zeros(3, dtype=torch.long)
        >>> fractions, scores = insertion_curve(model, images, maps, targets, steps=4)
        >>> fractions.tolist(), scores.shape
        ([0.0, 0.25, 0.5, 0.75, 1.0], torch.Size([3, 5]))
    """
    _check_perturbation_args(model, images, maps, targets, steps, batch_size)
    _check_blur(blur_kernel_size, blur_sigma)
    blurred = _gaussian_blur(images, blur_kernel_size, blur_sigma)
    return _perturbation_curve(model, blurred, images, maps, targets, steps, batch_size)


DEFAULT_PERTURBATION_FRACTIONS: tuple[float, ...] = tuple(step / 10 for step in range(1, 10))
"""Fractions removed by [`token_perturbation_curve`][gmar_lightning.metrics.functional.token_perturbation_curve] and
[`road_curve`][gmar_lightning.metrics.functional.road_curve] by default: 0.1, 0.2, ..., 0.9."""


def average_precision(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image average precision of the map's pixel scores against the object mask, ``[B]``.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing order, with ``P_n`` and
    ``R_n`` the precision and recall of the pixels scoring at least the ``n``-th threshold (scikit-learn's
    ``average_precision_score``, no interpolation); tied pixels enter together. NaN where the mask is empty.

    Args:
        maps: ``[B, H', W']`` saliency; resized bilinearly to the masks' size if needed.
        masks: ``[B, H, W]`` boolean object masks.

    Examples:
        >>> maps = torch.tensor([[[0.9, 0.8], [0.7, 0.1]]])  # ranked: hit, miss, hit, miss
        >>> masks = torch.tensor([[[True, False], [True, False]]])
        >>> average_precision(maps, masks)  # (1/2) * 1 + (1/2) * 2/3
        tensor([0.8333])
    """
    scores = _maps_matching_masks(maps, masks).flatten(1)
    labels = masks.flatten(1)
    order = scores.argsort(dim=1, descending=True)
    descending = scores.gather(1, order)
    sorted_labels = labels.gather(1, order).float()
    true_positives = sorted_labels.cumsum(dim=1)
    # A tie group is judged at its last pixel: find it by searching the ascending negated scores.
    ascending = -descending
    last_of_group = torch.searchsorted(ascending.contiguous(), ascending.contiguous(), right=True) - 1
    precision_at_group_end = true_positives.gather(1, last_of_group) / (last_of_group + 1).float()
    num_positive = sorted_labels.sum(dim=1)
    ap = (precision_at_group_end * sorted_labels).sum(dim=1) / num_positive.clamp_min(1.0)
    return torch.where(num_positive > 0, ap, math.nan)


def _saliency_segmentation_update(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Correct and total pixels, per-class intersections and unions ``[2]``, summed AP and AP count of one batch."""
    resized = _maps_matching_masks(maps, masks).flatten(1)
    labels = masks.flatten(1)
    foreground = resized > resized.mean(dim=1, keepdim=True)
    correct = (foreground == labels).sum()
    intersection = torch.stack([(~foreground & ~labels).sum(), (foreground & labels).sum()])
    union = torch.stack([(~foreground | ~labels).sum(), (foreground | labels).sum()])
    ap = average_precision(resized.view_as(masks), masks)
    defined = ~ap.isnan()
    return correct, torch.tensor(labels.numel()), intersection, union, ap[defined].sum(), defined.sum()


def saliency_segmentation(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Chefer et al.'s (2021) segmentation test: the map as a foreground/background segmentation of the object.

    Each map is thresholded at its mean (pixels above it are foreground), then scored against the masks:
    ``pixel_accuracy = sum correct pixels / sum pixels``, ``miou`` the mean over {background, foreground} of
    ``sum intersection / sum union`` (sums over the batch) and ``map`` the mean
    [`average_precision`][gmar_lightning.metrics.functional.average_precision] of the raw scores. The functional form of
    [`SaliencySegmentation`][gmar_lightning.metrics.pointing.SaliencySegmentation].

    Args:
        maps: ``[B, H', W']`` saliency; resized bilinearly to the masks' size if needed.
        masks: ``[B, H, W]`` boolean object masks.

    Examples:
        >>> maps = torch.tensor([[[0.9, 0.8], [0.7, 0.1]]])  # mean 0.625: all but the last pixel are foreground
        >>> masks = torch.tensor([[[True, False], [True, False]]])
        >>> {name: round(value.item(), 4) for name, value in saliency_segmentation(maps, masks).items()}
        {'pixel_accuracy': 0.75, 'miou': 0.5833, 'map': 0.8333}
    """
    correct, total, intersection, union, ap_sum, ap_count = _saliency_segmentation_update(maps, masks)
    return {
        "pixel_accuracy": correct / total,
        "miou": (intersection / union).mean(),
        "map": ap_sum / ap_count,
    }


def token_perturbation_curve(
    model: nn.Module,
    images: Tensor,
    token_maps: Tensor,
    targets: Tensor,
    fractions: tuple[float, ...] = DEFAULT_PERTURBATION_FRACTIONS,
    negative: bool = False,
    baseline: float = 0.0,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Chefer et al.'s (2021) positive/negative perturbation test on patch tokens: accuracy as tokens are removed.

    For each fraction ``f``, the ``floor(f * N)`` patches with the highest relevance (``negative=False``, the
    positive test) or the lowest (``negative=True``) among the ``N`` patches are set to ``baseline`` in every
    channel, and the image counts as correct if the model's top-1 class is its target. Ties are broken by patch
    index (stable sort). A faithful map makes the accuracy fall fast in the positive test (lower area is better)
    and slowly in the negative test (higher is better).

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits; run in eval mode without gradients, then restored.
        images: ``[B, C, H, W]`` inputs in the model's input space; ``H, W`` multiples of the token grid.
        token_maps: ``[B, h, w]`` relevance of the patch tokens (e.g. ``Explanation.token_maps``).
        targets: ``[B]`` the class each image should keep predicting.
        fractions: Fractions of patches removed, each in ``[0, 1]``, increasing.
        negative: Remove the least relevant patches first instead of the most relevant.
        baseline: Value the removed patches take (0 is the data mean for normalised inputs).
        batch_size: Perturbed images per forward pass.

    Returns:
        ``fractions [F]`` and ``correct [B, F]`` (1.0 where the prediction is the target, else 0.0).

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> fractions, correct = token_perturbation_curve(
        ...     model, torch.ones(3, 1, 4, 4), torch.rand(3, 2, 2), torch.zeros(3, dtype=torch.long), (0.25, 0.5))
        >>> fractions.tolist(), correct.shape
        ([0.25, 0.5], torch.Size([3, 2]))
    """
    _check_perturbation_args(model, images, token_maps, targets, 1, batch_size)
    fraction_values = _check_fractions(fractions)
    num_images, _, height, width = images.shape
    grid_h, grid_w = token_maps.shape[-2:]
    if height % grid_h or width % grid_w:
        raise ValueError(f"`token_maps` grid {grid_h}x{grid_w} must divide the images' size {height}x{width}.")
    num_tokens = grid_h * grid_w
    device = images.device
    relevance = token_maps.to(device).float().flatten(1)
    rank = _saliency_rank(relevance, most_salient_first=not negative)
    removed_counts = torch.tensor([math.floor(f * num_tokens + 1e-9) for f in fraction_values], device=device)

    def perturb(image_index: Tensor, fraction_index: Tensor) -> Tensor:
        removed = (rank[image_index] < removed_counts[fraction_index, None]).view(-1, 1, grid_h, grid_w)
        removed = removed.repeat_interleave(height // grid_h, dim=2).repeat_interleave(width // grid_w, dim=3)
        return images[image_index].masked_fill(removed, baseline)

    correct = _accuracy_curve(model, perturb, targets, num_images, len(fraction_values), batch_size)
    return torch.tensor(fraction_values), correct


def noisy_linear_imputation(
    images: Tensor,
    keep: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-4,
    max_iterations: int = 2000,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): fill removed pixels from their neighbours, plus noise.

    Every removed pixel ``i`` takes the weighted mean of its in-image 8-neighbours,
    ``x_i = sum_j w_ij x_j / sum_j w_ij`` with ``w = 1/6`` for the 4 direct and ``1/12`` for the 4 diagonal
    neighbours, where removed neighbours are unknowns too: one sparse, symmetric positive definite linear system per
    image and channel, solved here by Jacobi-preconditioned conjugate gradients to a relative residual of
    ``tolerance``. Then ``N(0, noise_std^2)`` noise is added to the imputed pixels only. An image with no kept pixel
    is filled with zeros plus noise.

    Args:
        images: ``[B, C, H, W]`` float images.
        keep: ``[B, H, W]`` bool, True for the pixels to keep.
        noise_std: Standard deviation of the noise added to imputed pixels.
        generator: Random generator for the noise (``None``: torch's global one).
        tolerance: Relative residual ``|r| / |b|`` at which the solver stops.
        max_iterations: Most conjugate-gradient iterations.

    Returns:
        ``[B, C, H, W]``: ``images`` where ``keep``, the imputation elsewhere.

    Examples:
        >>> image = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [6.0, 6.0, 6.0]]]])
        >>> keep = torch.ones(1, 3, 3, dtype=torch.bool)
        >>> keep[0, 1, 1] = False  # its neighbours: three 6s below (1/12 + 1/6 + 1/12), zeros elsewhere
        >>> noisy_linear_imputation(image, keep, noise_std=0.0)[0, 0, 1, 1]
        tensor(2.)
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"`images` must be a float tensor of shape [B, C, H, W], got {_describe(images)}.")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"`keep` must be a bool tensor of shape {[images.shape[0], *images.shape[2:]]}, got {_describe(keep)}."
        )
    _check_noise_std(noise_std)
    known = keep[:, None].to(images.dtype)
    unknown = 1.0 - known
    degree = _neighbour_sum(torch.ones_like(known[:1]))
    rhs = _neighbour_sum(images * known) * unknown
    inv_diagonal = unknown / degree
    # Conjugate gradients on (D - W) x = W x_known over the unknown pixels, every image and channel at once.
    solution = torch.zeros_like(images)
    residual = rhs.clone()
    preconditioned = residual * inv_diagonal
    direction = preconditioned.clone()
    dims = (1, 2, 3) if images.shape[1] == 1 else (2, 3)
    rz = (residual * preconditioned).sum(dims, keepdim=True)
    rhs_norm = rhs.square().sum(dims, keepdim=True).sqrt().clamp_min(1e-30)
    for iteration in range(max_iterations):
        if iteration % 5 == 0 and bool(
            ((residual.square().sum(dims, keepdim=True).sqrt() / rhs_norm) < tolerance).all()
        ):
            break
        product = (degree * direction - _neighbour_sum(direction)) * unknown
        step = rz / (direction * product).sum(dims, keepdim=True).clamp_min(1e-30)
        solution += step * direction
        residual -= step * product
        preconditioned = residual * inv_diagonal
        rz_next = (residual * preconditioned).sum(dims, keepdim=True)
        direction = preconditioned + rz_next / rz.clamp_min(1e-30) * direction
        rz = rz_next
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device) * noise_std
    return images * known + (solution + noise) * unknown


def _neighbour_sum(values: Tensor) -> Tensor:
    """``sum_j w_ij v_j`` over the 8 in-image neighbours (1/6 direct, 1/12 diagonal) of every pixel.

    The kernel is ``[1, 2, 1]^T [1, 2, 1] / 12`` minus its centre ``1/3``, so two 1-D passes over a zero-padded
    image do it; faster than a 3x3 convolution of one channel on CPU.
    """
    padded = F.pad(values, (1, 1, 1, 1))
    rows = padded[..., :, :-2] + 2 * padded[..., :, 1:-1] + padded[..., :, 2:]
    return (rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :]) / 12 - values / 3


def road_curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    fractions: tuple[float, ...] = DEFAULT_PERTURBATION_FRACTIONS,
    most_relevant_first: bool = True,
    noise_std: float = 0.01,
    seed: int = 0,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """ROAD (Rong et al. 2022, RemOve And Debias): accuracy as pixels are removed by noisy linear imputation.

    For each fraction ``f``, the ``floor(f * H * W)`` pixels that the map ranks highest (MoRF,
    ``most_relevant_first=True``) or lowest (LeRF) are removed and imputed by
    [`noisy_linear_imputation`][gmar_lightning.metrics.functional.noisy_linear_imputation], and the image counts as
    correct if the model's top-1 class is its target. Imputation from the neighbours removes the shape of the removed
    region, which otherwise leaks the class (the bias ROAD corrects). MoRF: lower is better; LeRF: higher is better.
    Ties in the map are broken by pixel index (stable sort).

    Args:
        model: Classifier mapping ``[N, C, H, W]`` to logits; run in eval mode without gradients, then restored.
        images: ``[B, C, H, W]`` inputs in the model's input space.
        maps: ``[B, H', W']`` saliency, higher = more important; resized bilinearly to the images' size if needed.
        targets: ``[B]`` the class each image should keep predicting.
        fractions: Fractions of pixels removed, each in ``[0, 1]``, increasing.
        most_relevant_first: MoRF (True) or LeRF (False).
        noise_std: Standard deviation of the imputation noise.
        seed: Seed of the imputation noise, so the curve is reproducible.
        batch_size: Imputed images per forward pass.

    Returns:
        ``fractions [F]`` and ``correct [B, F]`` (1.0 where the prediction is the target, else 0.0).

    Examples:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> fractions, correct = road_curve(
        ...     model, torch.ones(3, 1, 4, 4), torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long), (0.25, 0.5))
        >>> fractions.tolist(), correct.shape
        ([0.25, 0.5], torch.Size([3, 2]))
    """
    _check_perturbation_args(model, images, maps, targets, 1, batch_size)
    fraction_values = _check_fractions(fractions)
    num_images, _, height, width = images.shape
    num_pixels = height * width
    device = images.device
    scores = _resize(maps.to(device), (height, width)).flatten(1)
    rank = _saliency_rank(scores, most_salient_first=most_relevant_first)
    removed_counts = torch.tensor([math.floor(f * num_pixels + 1e-9) for f in fraction_values], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def perturb(image_index: Tensor, fraction_index: Tensor) -> Tensor:
        keep = (rank[image_index] >= removed_counts[fraction_index, None]).view(-1, height, width)
        return noisy_linear_imputation(images[image_index], keep, noise_std, generator)

    correct = _accuracy_curve(model, perturb, targets, num_images, len(fraction_values), batch_size)
    return torch.tensor(fraction_values), correct


def _accuracy_curve(
    model: nn.Module,
    perturb: Callable[[Tensor, Tensor], Tensor],
    targets: Tensor,
    num_images: int,
    num_fractions: int,
    batch_size: int,
) -> Tensor:
    """``[B, F]`` top-1 correctness of ``model`` on ``perturb(image_index, fraction_index)``, chunk by chunk."""
    device = targets.device
    image_index = torch.arange(num_images, device=device).repeat_interleave(num_fractions)
    fraction_index = torch.arange(num_fractions, device=device).repeat(num_images)
    correct = torch.empty(num_images * num_fractions, device=device)
    with eval_mode(model), torch.no_grad():
        for chunk in torch.arange(num_images * num_fractions, device=device).split(batch_size):
            logits = model(perturb(image_index[chunk], fraction_index[chunk]))
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError(f"`model` must return logits of shape [N, num_classes], got {_describe(logits)}.")
            correct[chunk] = (logits.argmax(dim=1) == targets[image_index[chunk]]).float()
    return correct.view(num_images, num_fractions)


def _check_noise_std(noise_std: object) -> float:
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or noise_std < 0:
        raise ValueError(f"`noise_std` must be a non-negative number, got {noise_std!r}.")
    return float(noise_std)


def _check_fractions(fractions: object) -> list[float]:
    values = list(fractions) if isinstance(fractions, (tuple, list)) else None
    if (
        not values
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1 for f in values)
        or any(b <= a for a, b in itertools.pairwise(values))
    ):
        raise ValueError(
            f"`fractions` must be a non-empty increasing sequence of numbers in [0, 1], got {fractions!r}."
        )
    return [float(f) for f in values]


def _perturbation_curve(
    model: nn.Module, start: Tensor, end: Tensor, maps: Tensor, targets: Tensor, steps: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Move pixels from ``start`` to ``end`` in decreasing saliency order and track the target probability."""
    num_images, _, height, width = start.shape
    num_pixels = height * width
    device = start.device
    maps = _resize(maps.to(device), (height, width)).flatten(1)
    rank = _saliency_rank(maps, most_salient_first=True)
    switched = (torch.arange(steps + 1, device=device) * math.ceil(num_pixels / steps)).clamp_max(num_pixels)

    # Every (image, step) pair is one perturbed input; they are built and scored chunk by chunk.
    image_index = torch.arange(num_images, device=device).repeat_interleave(steps + 1)
    step_index = torch.arange(steps + 1, device=device).repeat(num_images)
    targets = targets.to(device)
    scores = torch.empty(num_images * (steps + 1), device=device)
    with eval_mode(model), torch.no_grad():
        for chunk in torch.arange(num_images * (steps + 1), device=device).split(batch_size):
            images_in_chunk = image_index[chunk]
            take_end = (rank[images_in_chunk] < switched[step_index[chunk], None]).view(-1, 1, height, width)
            logits = check_logits(
                model, model(torch.where(take_end, end[images_in_chunk], start[images_in_chunk])), len(chunk)
            )
            if targets.max() >= logits.shape[1]:
                raise ValueError(
                    f"`targets` must be class indices below the model's {logits.shape[1]} outputs, "
                    f"got {targets.max().item()}."
                )
            probabilities = logits.float().softmax(dim=1)
            scores[chunk] = probabilities.gather(1, targets[images_in_chunk, None])[:, 0]
    return switched.float() / num_pixels, scores.view(num_images, steps + 1)


def _saliency_rank(scores: Tensor, most_salient_first: bool) -> Tensor:
    """``rank[b, p]``: the position of element ``p`` in row ``b``'s saliency order (0 = removed first).

    The sort is stable, so ties go in index order and the curves are reproducible.
    """
    order = scores.argsort(dim=1, descending=most_salient_first, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    return torch.empty_like(order).scatter_(1, order, positions)


def _gaussian_blur(images: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` images with replicate padding (no dark borders)."""
    channels = images.shape[1]
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padding = kernel_size // 2
    blurred = F.pad(images, [padding] * 4, mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[B, h, w]`` maps to ``size`` if they differ; float32 either way."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _maps_matching_masks(maps: Tensor, masks: Tensor) -> Tensor:
    if not isinstance(masks, Tensor) or masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"`masks` must be a bool tensor of shape [B, H, W], got {_describe(masks)}.")
    _check_maps(maps, masks.shape[0])
    return _resize(maps.to(masks.device), (masks.shape[1], masks.shape[2]))


def _check_maps(maps: Tensor, batch_size: int) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3 or not maps.is_floating_point():
        raise ValueError(f"`maps` must be a float tensor of shape [B, H, W], got {_describe(maps)}.")
    if maps.shape[0] != batch_size:
        raise ValueError(f"`maps` must have one map per image ({batch_size}), got {maps.shape[0]}.")


def _check_perturbation_args(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, steps: int, batch_size: int
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point() or len(images) == 0:
        raise ValueError(f"`images` must be a non-empty float tensor of shape [B, C, H, W], got {_describe(images)}.")
    _check_maps(maps, images.shape[0])
    if (
        not isinstance(targets, Tensor)
        or targets.shape != (images.shape[0],)
        or targets.is_floating_point()
        or targets.dtype == torch.bool
    ):
        raise ValueError(f"`targets` must be an integer tensor of shape [{images.shape[0]}], got {_describe(targets)}.")
    if targets.numel() and targets.min() < 0:
        raise ValueError(f"`targets` must be non-negative class indices, got {targets.min().item()}.")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)


def _check_blur(kernel_size: int, sigma: float) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be a positive odd integer, got {kernel_size!r}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"`blur_sigma` must be a positive number, got {sigma!r}.")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
