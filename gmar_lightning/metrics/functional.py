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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmar_lightning.model_state import eval_mode

__all__ = ["deletion_curve", "energy_pointing_game", "insertion_curve", "pointing_game"]


def _check_tolerance(tolerance: object) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a non-negative integer number of pixels, got {tolerance!r}.")


def _pointing_game_update(maps: Tensor, masks: Tensor, tolerance: int) -> tuple[Tensor, Tensor]:
    """Hits and the number of images with a non-empty mask in one batch."""
    maps = _maps_matching_masks(maps, masks)
    has_object = masks.flatten(1).any(dim=1)
    if tolerance > 0:
        kernel_size = 2 * tolerance + 1
        masks = F.max_pool2d(masks[:, None].float(), kernel_size, stride=1, padding=tolerance)[:, 0] > 0
    peak = maps.flatten(1).argmax(dim=1, keepdim=True)
    hit = masks.flatten(1).gather(1, peak)[:, 0]
    return (hit & has_object).sum(), has_object.sum()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Fraction of images whose map peaks on (within ``tolerance`` pixels of) the object.

    The functional form of [`PointingGame`][gmar_lightning.metrics.pointing.PointingGame].

    Args:
        maps: ``[B, H', W']`` saliency, higher = more important.
        masks: ``[B, H, W]`` boolean object masks.
        tolerance: Dilation radius of the masks in pixels, ``>= 0``.
    """
    _check_tolerance(tolerance)
    hits, total = _pointing_game_update(maps, masks, tolerance)
    return hits.float() / total


def _energy_pointing_game_update(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Summed energy shares and the number of images with a non-empty mask in one batch."""
    maps = _maps_matching_masks(maps, masks).float().flatten(1)
    masks = masks.flatten(1)
    low, high = maps.aminmax(dim=1, keepdim=True)
    spread = high - low
    normalised = torch.where(spread > 0, (maps - low) / spread.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    total_energy = normalised.sum(dim=1)
    share = torch.where(total_energy > 0, (normalised * masks).sum(dim=1) / total_energy.clamp_min(1e-12), 0.0)
    has_object = masks.any(dim=1)
    return share[has_object].sum(), has_object.sum()


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


def _perturbation_curve(
    model: nn.Module, start: Tensor, end: Tensor, maps: Tensor, targets: Tensor, steps: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Move pixels from ``start`` to ``end`` in decreasing saliency order and track the target probability."""
    num_images, _, height, width = start.shape
    num_pixels = height * width
    device = start.device
    maps = _resize(maps.to(device), (height, width)).flatten(1)
    # rank[b, p] = position of pixel p in image b's saliency order (0 = most salient); stable for reproducible ties.
    order = maps.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(num_pixels, device=device).expand(num_images, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions)
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
            logits = model(torch.where(take_end, end[images_in_chunk], start[images_in_chunk]))
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError(f"`model` must return logits of shape [N, num_classes], got {_describe(logits)}.")
            if targets.max() >= logits.shape[1]:
                raise ValueError(
                    f"`targets` must be class indices below the model's {logits.shape[1]} outputs, "
                    f"got {targets.max().item()}."
                )
            probabilities = logits.float().softmax(dim=1)
            scores[chunk] = probabilities.gather(1, targets[images_in_chunk, None])[:, 0]
    return switched.float() / num_pixels, scores.view(num_images, steps + 1)


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
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)


def _check_blur(kernel_size: int, sigma: float) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be a positive odd integer, got {kernel_size!r}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"`blur_sigma` must be a positive number, got {sigma!r}.")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
