"""Score attention heads (Michel et al. importance) and turn scores into pruning orders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gmar_lightning._checks import check_positive_int
from gmar_lightning.capture import unwrap_model
from gmar_lightning.explanation import Explanation
from gmar_lightning.heads._batches import (
    LossFn,
    _batch_size,
    _batches,
    _check_max_batches,
    _cloned,
    _logits,
    _model_device,
    _per_example_loss,
    per_example_cross_entropy,
)
from gmar_lightning.heads.masking import _as_float_tensor, _gated_heads, _maskable_layers
from gmar_lightning.model_state import eval_mode, frozen_parameters, no_grad_checkpointing

__all__ = ["michel_importance", "random_order", "rank_heads"]


def michel_importance(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    loss_fn: LossFn = per_example_cross_entropy,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    normalize_per_layer: bool = True,
    progress: bool = True,
) -> Tensor:
    """Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?".

    ``I_h = E_x |dL(x) / d xi_h|`` where ``xi`` is a head mask of ones scaling each head's output. It is exact per
    example: each batch gets a gate ``xi [B, L, H]`` so sample ``b``'s gradient lands in row ``b``; the absolute
    gradients are summed over samples and divided by their number. Only ``xi`` is differentiated
    (``torch.autograd.grad``), so no parameter's ``.grad`` changes. The model runs in eval mode with its training
    flags restored afterwards; it also works when called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Args:
        model: A timm Vision Transformer returning logits ``[B, C]``; it must already be on ``device``.
        dataloader: Yields ``(images, labels)`` or ``(images, labels, masks)``; labels are class indices, images a
            tensor or a NaFlex dict (SigLIP 2's processor output, timm's NaFlex collator's).
        loss_fn: ``loss_fn(logits, labels) -> [B]`` per-example losses.
        max_batches: Stop after this many batches (``None``: the whole dataloader).
        device: Where batches are moved; defaults to the device of the model's parameters.
        normalize_per_layer: Divide each layer's scores by their L2 norm over heads, as Michel et al. do before
            comparing heads across layers.
        progress: Show a tqdm progress bar.

    Returns:
        ``[L, H]`` float32 non-negative importance on the CPU; NaN for heads a pruned layer no longer has (see
        [`attention_head_grid`][gmar_lightning.heads.masking.attention_head_grid]).

    Examples:
        >>> import timm
        >>> model = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
        >>> batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
        >>> importance = michel_importance(model, batches, progress=False)
        >>> importance.shape, bool((importance >= 0).all())
        (torch.Size([2, 2]), True)
    """
    _check_max_batches(max_batches)
    eager = unwrap_model(model)
    layout = _maskable_layers(eager)
    device = _model_device(eager, device)
    num_samples = 0
    # Eval mode without checkpointing: timm checkpoints blocks in eval mode too when `grad_checkpointing` is set, and
    # reentrant checkpointing drops gradients to tensors (like the gate) that reach a block only through hooks.
    with (
        frozen_parameters(eager),
        no_grad_checkpointing(eager),
        eval_mode(eager),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        # Created here, not above, so it is a normal tensor even when the caller is in inference mode.
        totals = [torch.zeros(len(slots), dtype=torch.float64, device=device) for slots in layout.slots]
        for images, labels in _batches(dataloader, max_batches, device, progress, "head importance"):
            images = _cloned(images)
            # One gate per layer, [B, H_l]: layers may have different head counts; a layer without heads has none.
            batch = _batch_size(images)
            gates = [torch.ones(batch, len(slots), device=device, requires_grad=True) for slots in layout.slots]
            with _gated_heads(layout.layers, [gate if gate.shape[1] else None for gate in gates]):
                losses = _per_example_loss(loss_fn, _logits(eager, images), labels.clone())
            gated = [index for index, gate in enumerate(gates) if gate.shape[1]]
            grads = torch.autograd.grad(losses.sum(), [gates[index] for index in gated])
            for index, grad in zip(gated, grads, strict=True):
                totals[index] += grad.detach().abs().sum(dim=0, dtype=torch.float64)
            num_samples += batch
    if num_samples == 0:
        raise ValueError("`dataloader` yielded no batches; head importance needs at least one sample.")
    importance = torch.full((len(layout.layers), layout.width), float("nan"))
    for index, (total, slots) in enumerate(zip(totals, layout.slots, strict=True)):
        row = (total / num_samples).float().cpu()
        if normalize_per_layer:
            row = row / row.norm().clamp_min(1e-20)
        importance[index, slots] = row
    return importance


def _importance_grid(importance: object, epoch: int | Literal["mean"]) -> Tensor:
    if isinstance(importance, Explanation):
        if importance.head_weights is None:
            raise ValueError(
                f"`importance` is a '{importance.method}' Explanation without head weights; "
                "explain with a GMAR method ('gmar_l1' or 'gmar_l2')."
            )
        return importance.head_weights.detach().float().mean(dim=0).cpu()
    if isinstance(importance, Tensor | np.ndarray):
        return _as_float_tensor("importance", importance).detach().cpu()
    weights = getattr(importance, "weights", None)
    if weights is None:
        raise TypeError(
            "`importance` must be an [L, H] tensor/array, an Explanation with head weights, or a trajectory with "
            f"`.weights` [E, L, H], got {type(importance).__name__}."
        )
    weights = _as_float_tensor("importance.weights", weights).detach().cpu()
    if weights.dim() != 3 or weights.shape[0] == 0:
        raise ValueError(f"`importance.weights` must have shape [E, L, H] with E >= 1, got {list(weights.shape)}.")
    if epoch == "mean":
        return weights.mean(dim=0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not -weights.shape[0] <= epoch < weights.shape[0]:
        raise ValueError(
            f"`epoch` must be 'mean' or an integer index into {weights.shape[0]} recorded epochs, got {epoch!r}."
        )
    return weights[epoch]


def rank_heads(
    importance: Tensor | np.ndarray | Explanation | Any,
    *,
    least_important_first: bool = True,
    epoch: int | Literal["mean"] = -1,
) -> Tensor:
    """Turn head importance into a pruning order of ``(layer, head)`` pairs.

    Ties keep layer-major order (layer 0's heads first, then by head index) in both directions. NaN entries are
    heads a pruned layer no longer has: they are left out of the order.

    Args:
        importance: One of: an ``[L, H]`` tensor or array; an [`Explanation`][gmar_lightning.explanation.Explanation] of
            a GMAR method (its ``head_weights`` averaged over the batch); or a trajectory-like object with a
            ``.weights`` attribute ``[E, L, H]`` (one row per epoch).
        least_important_first: Order from least to most important (the pruning order); ``False`` reverses it.
        epoch: For trajectories only: the epoch index to rank (default the last), or ``"mean"`` over epochs.

    Returns:
        ``[K, 2]`` int64 tensor over the ``K`` non-NaN heads (``L * H`` for an unpruned model); row ``i`` is the
        ``(layer, head)`` of the ``i``-th head in the order.

    Examples:
        >>> rank_heads(torch.tensor([[0.5, 0.1], [0.1, 0.9]])).tolist()
        [[0, 1], [1, 0], [0, 0], [1, 1]]
    """
    grid = _importance_grid(importance, epoch)
    if grid.dim() != 2 or grid.numel() == 0:
        raise ValueError(f"`importance` must have shape [L, H] with L, H >= 1, got {list(grid.shape)}.")
    present = (~torch.isnan(grid.flatten())).nonzero().flatten()
    if not len(present):
        raise ValueError("`importance` is all NaN; NaN marks a missing head, and ranking needs at least one head.")
    ranked = torch.sort(grid.flatten()[present], descending=not least_important_first, stable=True).indices
    flat_order = present[ranked]
    num_heads = grid.shape[1]
    return torch.stack((flat_order // num_heads, flat_order % num_heads), dim=1)


def random_order(num_layers: int, num_heads: int, seed: int = 0) -> Tensor:
    """A seeded random pruning order, the baseline for ablation curves; same seed, same order on every machine.

    Examples:
        >>> order = random_order(2, 3, seed=1)
        >>> order.shape, torch.equal(order, random_order(2, 3, seed=1))
        (torch.Size([6, 2]), True)
    """
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads)):
        check_positive_int(name, value)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an integer, got {type(seed).__name__}.")
    flat_order = torch.randperm(num_layers * num_heads, generator=torch.Generator().manual_seed(seed))
    return torch.stack((flat_order // num_heads, flat_order % num_heads), dim=1)
