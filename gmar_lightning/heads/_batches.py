"""The evaluation loop the head tools share: batches from a dataloader, logits and per-example losses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gmar_lightning._checks import check_logits, check_positive_int
from gmar_lightning.naflex import call_model, is_naflex_batch

__all__ = ["Images", "LossFn", "per_example_cross_entropy"]

Images = Tensor | dict[str, Tensor]
"""A batch of images ``[B, C, H, W]``, or a NaFlex dict (timm's NaFlexViT, transformers' SigLIP 2)."""


LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits [B, C], labels [B]) -> per-example losses [B]``."""


def per_example_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each example, ``[B, C], [B] -> [B]`` (the default ``loss_fn``).

    Examples:
        >>> per_example_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()  # ln 4 each
        [1.3862943649291992, 1.3862943649291992]
    """
    return F.cross_entropy(logits, labels, reduction="none")


def _check_max_batches(max_batches: int | None) -> None:
    check_positive_int("max_batches", max_batches, allow_none=True)


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batches(
    dataloader: Iterable[Any], max_batches: int | None, device: torch.device, progress: bool, description: str
) -> Iterator[tuple[Images, Tensor]]:
    """Yield ``(images, labels)`` on ``device`` from ``(images, labels[, masks, ...])`` batches; ``images`` may be a
    NaFlex dict, whose tensors are moved."""
    try:
        total: int | None = len(dataloader)  # type: ignore[arg-type]
    except TypeError:  # iterables and DataLoaders over an IterableDataset have no length
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batches = tqdm(dataloader, total=total, desc=description, disable=not progress, leave=False)
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if not isinstance(batch, list | tuple) or len(batch) < 2:
                raise TypeError(
                    f"`dataloader` must yield (images, labels) or (images, labels, masks) batches, "
                    f"got {type(batch).__name__}."
                )
            images, labels = batch[0], batch[1]
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
                raise ValueError(
                    "`dataloader` labels must be an integer class-index tensor of shape [B], got "
                    f"{type(labels).__name__}{list(labels.shape) if isinstance(labels, Tensor) else ''}."
                )
            if is_naflex_batch(images):
                yield {key: value.to(device) for key, value in images.items()}, labels.to(device)
            else:
                yield images.to(device), labels.to(device)
    finally:
        batches.close()


def _batch_size(images: Images) -> int:
    return next(iter(images.values())).shape[0] if isinstance(images, Mapping) else images.shape[0]


def _cloned(images: Images) -> Images:
    """A copy of ``images`` (each tensor of a NaFlex dict): batches made under inference mode are inference tensors,
    which autograd cannot save."""
    return {key: value.clone() for key, value in images.items()} if isinstance(images, Mapping) else images.clone()


def _logits(model: nn.Module, images: Images) -> Tensor:
    output = call_model(model, images) if isinstance(images, Mapping) else model(images)
    return check_logits(model, output, _batch_size(images))


def _per_example_loss(loss_fn: LossFn, logits: Tensor, labels: Tensor) -> Tensor:
    losses = loss_fn(logits, labels)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (labels.shape[0],):
        shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-example losses of shape [{labels.shape[0]}], got {shape}; "
            "use reduction='none' (e.g. the default `per_example_cross_entropy`)."
        )
    return losses
