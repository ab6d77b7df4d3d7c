"""Act on attention-head importance: mask heads, measure Michel et al. importance, rank heads, trace ablation curves.

Heads are masked by scaling their outputs just before each attention module's output projection ``proj``: a forward
pre-hook views ``proj``'s input ``[B, N, H * head_dim]`` as ``[B, N, H, head_dim]`` and multiplies it by the mask.
Fused attention (``scaled_dot_product_attention``) stays on, because nothing needs the attention probabilities.

Limitation: timm attention modules built with ``scale_norm=True`` (e.g. EVA with ``scale_attn_inner=True``)
normalise the concatenated heads (``self.norm``) before ``proj``. Masking at ``proj``'s input still removes the
masked heads' contribution to the output exactly, but the remaining heads were normalised with statistics that
include the masked heads, so the result is not identical to a model trained without them. No earlier hook point is
better: zeroing a head before the norm still lets its (shifted) channels and the norm's bias reach ``proj``.
A sigmoid ``gate`` (``gated=True``) acts per channel and so per head; it does not affect exactness.

Examples:
    >>> import timm
    >>> model = timm.models.vision_transformer.VisionTransformer(
    ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    >>> attention_head_grid(model)
    (2, 2)
    >>> mask = torch.ones(2, 2)
    >>> mask[0, 1] = 0  # drop head 1 of the first layer
    >>> with head_mask(model, mask):
    ...     logits = model(torch.randn(1, 3, 16, 16))
    >>> logits.shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from gmar_lightning._io import atomic_write_bytes, atomic_write_text
from gmar_lightning.capture import AttentionLayer, eval_mode_without_fast_paths, find_attention_layers, unwrap_model
from gmar_lightning.explanation import Explanation

__all__ = [
    "DEFAULT_FRACTIONS",
    "AblationCurve",
    "attention_head_grid",
    "head_ablation_curve",
    "head_mask",
    "mask_from_order",
    "michel_importance",
    "per_example_cross_entropy",
    "plot_ablation_curves",
    "random_order",
    "rank_heads",
]

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""Fractions of heads masked by :func:`head_ablation_curve` unless told otherwise: 0, 0.1, ..., 1."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits [B, C], labels [B]) -> per-example losses [B]``."""


def per_example_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each example, ``[B, C], [B] -> [B]`` (the default ``loss_fn``).

    Examples:
        >>> per_example_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()  # ln 4 each
        [1.3862943649291992, 1.3862943649291992]
    """
    return F.cross_entropy(logits, labels, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# Masking heads
# ----------------------------------------------------------------------------------------------------------------


def _maskable_layers(model: nn.Module) -> tuple[list[AttentionLayer], int]:
    """The attention layers with the head count they share; errors if a layer has no ``proj``/``num_heads``."""
    layers = find_attention_layers(model)
    head_counts = set()
    for layer in layers:
        num_heads = getattr(layer.module, "num_heads", None)
        if not isinstance(num_heads, int) or not isinstance(getattr(layer.module, "proj", None), nn.Module):
            raise TypeError(
                f"`model` attention layer `{layer.name}` ({type(layer.module).__name__}) needs an integer `num_heads` "
                "and a `proj` output projection for head masking; only timm-style attention is supported."
            )
        head_counts.add(num_heads)
    if len(head_counts) != 1:
        raise ValueError(
            f"`model` must have the same number of heads in every attention layer for an [L, H] head mask, "
            f"got head counts {sorted(head_counts)}."
        )
    return layers, head_counts.pop()


def attention_head_grid(model: nn.Module) -> tuple[int, int]:
    """The shape ``(L, H)`` of head masks and importance for ``model``: attention layers by heads per layer.

    Examples:
        >>> import timm
        >>> attention_head_grid(timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=6))
        (3, 6)
    """
    layers, num_heads = _maskable_layers(model)
    return len(layers), num_heads


def _gate_hook(layer_name: str, gate: Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """A ``proj`` pre-hook scaling head ``h``'s input slice by ``gate[..., h]``; ``gate`` is ``[H]`` or ``[B, H]``."""
    num_heads = gate.shape[-1]

    def hook(_proj: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        head_outputs = inputs[0]
        if head_outputs.shape[-1] % num_heads != 0:
            raise ValueError(
                f"`model` layer `{layer_name}`: `proj` input width {head_outputs.shape[-1]} is not divisible by "
                f"{num_heads} heads, so it cannot be split per head."
            )
        per_head = head_outputs.unflatten(-1, (num_heads, -1))
        if gate.dim() == 1:
            scale = gate.view(num_heads, 1)
        elif head_outputs.shape[0] == gate.shape[0]:
            # Broadcast each sample's gate over every middle (token) dimension.
            scale = gate.view(gate.shape[0], *([1] * (per_head.dim() - 3)), num_heads, 1)
        else:
            raise ValueError(
                f"`model` layer `{layer_name}`: `proj` input has leading dimension {head_outputs.shape[0]} but the "
                f"batch has {gate.shape[0]} samples; per-sample head gates need unwindowed attention."
            )
        scale = scale.to(device=per_head.device, dtype=per_head.dtype)
        return ((per_head * scale).flatten(-2), *inputs[1:])

    return hook


@contextlib.contextmanager
def _gated_heads(layers: list[AttentionLayer], gates: Sequence[Tensor | None]) -> Iterator[None]:
    """Scale each layer's head outputs by ``gates[l]`` (``[H]``, ``[B, H]`` or ``None`` to leave it alone)."""
    handles = []
    try:
        for layer, gate in zip(layers, gates, strict=True):
            if gate is not None:
                handles.append(layer.module.proj.register_forward_pre_hook(_gate_hook(layer.name, gate)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_float_tensor(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.float()
    if isinstance(value, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32)
    raise TypeError(f"`{name}` must be a tensor or array, got {type(value).__name__}.")


@contextlib.contextmanager
def head_mask(model: nn.Module, mask: Tensor | np.ndarray) -> Iterator[None]:
    """Scale (usually zero) chosen attention heads' outputs inside the ``with`` block.

    Each head's output is multiplied by its mask entry just before the attention module's output projection, so a
    0 removes the head's contribution to the output (see the module docstring for ``scale_norm`` models). Rows that
    are all ones get no hook, so an all-ones mask leaves outputs bit-identical. Hooks are removed on exit, also
    when the body raises; the model itself is never changed.

    Args:
        model: A timm Vision Transformer (or ``torch.compile`` of one).
        mask: ``[L, H]`` over the model's attention layers in :func:`~gmar_lightning.capture.find_attention_layers`
            order: 0/1, bool, or float weights. A mask that requires grad is always applied, so gradients reach it.

    Raises:
        ValueError: If ``mask`` is not ``[L, H]`` or has non-finite entries, or the layers' head counts differ.

    Examples:
        >>> import timm
        >>> model = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
        >>> images = torch.randn(2, 3, 16, 16)
        >>> reference = model(images)
        >>> with head_mask(model, torch.ones(2, 2)):
        ...     unchanged = torch.equal(model(images), reference)
        >>> with head_mask(model, torch.tensor([[0, 0], [1, 1]])):  # silence every head of layer 0
        ...     changed = not torch.allclose(model(images), reference)
        >>> unchanged, changed
        (True, True)
    """
    layers, num_heads = _maskable_layers(model)
    mask = _as_float_tensor("mask", mask)
    if tuple(mask.shape) != (len(layers), num_heads):
        raise ValueError(
            f"`mask` must have shape [L, H] = [{len(layers)}, {num_heads}] (attention layers x heads), "
            f"got {list(mask.shape)}."
        )
    if not torch.isfinite(mask).all():
        raise ValueError("`mask` must contain only finite values; use 0 to drop a head and 1 to keep it.")
    keep_all = (mask == 1).all(dim=-1).tolist()
    gates = [None if keep and not mask.requires_grad else row for row, keep in zip(mask, keep_all, strict=True)]
    with _gated_heads(layers, gates):
        yield


def mask_from_order(order: Tensor | Sequence[Sequence[int]], count: int, num_layers: int, num_heads: int) -> Tensor:
    """The ``[L, H]`` 0/1 mask that drops the first ``count`` heads of a pruning ``order``.

    Examples:
        >>> mask_from_order([(1, 0), (0, 1), (0, 0), (1, 1)], 2, num_layers=2, num_heads=2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    order = _check_order(order, num_layers, num_heads)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(order):
        raise ValueError(f"`count` must be an integer in [0, {len(order)}], got {count!r}.")
    mask = torch.ones(num_layers, num_heads)
    dropped = order[:count]
    mask[dropped[:, 0], dropped[:, 1]] = 0.0
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Iterating over data
# ----------------------------------------------------------------------------------------------------------------


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}.")


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batches(
    dataloader: Iterable[Any], max_batches: int | None, device: torch.device, progress: bool, description: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` on ``device`` from ``(images, labels[, masks, ...])`` batches."""
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
            yield images.to(device), labels.to(device)
    finally:
        batches.close()


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    logits = model(images)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError(
            f"`model` must return logits of shape [B, C], got {type(logits).__name__}"
            f"{list(logits.shape) if isinstance(logits, Tensor) else ''}."
        )
    return logits


def _per_example_loss(loss_fn: LossFn, logits: Tensor, labels: Tensor) -> Tensor:
    losses = loss_fn(logits, labels)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (labels.shape[0],):
        shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-example losses of shape [{labels.shape[0]}], got {shape}; "
            "use reduction='none' (e.g. the default `per_example_cross_entropy`)."
        )
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Michel et al. importance
# ----------------------------------------------------------------------------------------------------------------


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
        dataloader: Yields ``(images, labels)`` or ``(images, labels, masks)``; labels are class indices.
        loss_fn: ``loss_fn(logits, labels) -> [B]`` per-example losses.
        max_batches: Stop after this many batches (``None``: the whole dataloader).
        device: Where batches are moved; defaults to the device of the model's parameters.
        normalize_per_layer: Divide each layer's scores by their L2 norm over heads, as Michel et al. do before
            comparing heads across layers.
        progress: Show a tqdm progress bar.

    Returns:
        ``[L, H]`` float32 non-negative importance on the CPU.

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
    layers, num_heads = _maskable_layers(eager)
    device = _model_device(eager, device)
    num_samples = 0
    # Eval mode without checkpointing: timm checkpoints blocks in eval mode too when `grad_checkpointing` is set, and
    # reentrant checkpointing drops gradients to tensors (like the gate) that reach a block only through hooks.
    with (
        eval_mode_without_fast_paths(eager, []),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        # Created here, not above, so it is a normal tensor even when the caller is in inference mode.
        total = torch.zeros(len(layers), num_heads, dtype=torch.float64, device=device)
        for images, labels in _batches(dataloader, max_batches, device, progress, "head importance"):
            # Batches made under inference mode are inference tensors, which autograd cannot save; clone them.
            images = images.clone()
            gates = torch.ones(images.shape[0], len(layers), num_heads, device=device, requires_grad=True)
            with _gated_heads(layers, gates.unbind(dim=1)):
                losses = _per_example_loss(loss_fn, _logits(eager, images), labels.clone())
            (gate_grad,) = torch.autograd.grad(losses.sum(), gates)
            total += gate_grad.detach().abs().sum(dim=0, dtype=torch.float64)
            num_samples += images.shape[0]
    if num_samples == 0:
        raise ValueError("`dataloader` yielded no batches; head importance needs at least one sample.")
    importance = (total / num_samples).float().cpu()
    if normalize_per_layer:
        importance = importance / importance.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    return importance


# ----------------------------------------------------------------------------------------------------------------
# Ranking heads
# ----------------------------------------------------------------------------------------------------------------


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

    Ties keep layer-major order (layer 0's heads first, then by head index) in both directions.

    Args:
        importance: One of: an ``[L, H]`` tensor or array; an :class:`~gmar_lightning.explanation.Explanation` of a
            GMAR method (its ``head_weights`` averaged over the batch); or a trajectory-like object with a
            ``.weights`` attribute ``[E, L, H]`` (one row per epoch).
        least_important_first: Order from least to most important (the pruning order); ``False`` reverses it.
        epoch: For trajectories only: the epoch index to rank (default the last), or ``"mean"`` over epochs.

    Returns:
        ``[L * H, 2]`` int64 tensor; row ``i`` is the ``(layer, head)`` of the ``i``-th head in the order.

    Examples:
        >>> rank_heads(torch.tensor([[0.5, 0.1], [0.1, 0.9]])).tolist()
        [[0, 1], [1, 0], [0, 0], [1, 1]]
    """
    grid = _importance_grid(importance, epoch)
    if grid.dim() != 2 or grid.numel() == 0:
        raise ValueError(f"`importance` must have shape [L, H] with L, H >= 1, got {list(grid.shape)}.")
    if torch.isnan(grid).any():
        raise ValueError("`importance` contains NaN; ranking needs comparable scores for every head.")
    flat_order = torch.sort(grid.flatten(), descending=not least_important_first, stable=True).indices
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
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an integer, got {type(seed).__name__}.")
    flat_order = torch.randperm(num_layers * num_heads, generator=torch.Generator().manual_seed(seed))
    return torch.stack((flat_order // num_heads, flat_order % num_heads), dim=1)


def _check_order(order: Tensor | Sequence[Sequence[int]], num_layers: int, num_heads: int) -> Tensor:
    """``order`` as an int64 ``[L * H, 2]`` tensor covering every head exactly once."""
    order = torch.as_tensor(order)
    expected = num_layers * num_heads
    if order.shape != (expected, 2) or order.is_floating_point():
        raise ValueError(
            f"`order` must be {expected} integer (layer, head) pairs, shape [{expected}, 2], got "
            f"{order.dtype} of shape {list(order.shape)}; build it with `rank_heads` or `random_order`."
        )
    order = order.long()
    in_range = (order[:, 0] >= 0) & (order[:, 0] < num_layers) & (order[:, 1] >= 0) & (order[:, 1] < num_heads)
    if not in_range.all() or torch.unique(order[:, 0] * num_heads + order[:, 1]).numel() != expected:
        raise ValueError(
            f"`order` must list every (layer, head) of the {num_layers}x{num_heads} grid exactly once; "
            "build it with `rank_heads` or `random_order`."
        )
    return order


# ----------------------------------------------------------------------------------------------------------------
# Ablation curves
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AblationCurve:
    """Accuracy and mean loss as more and more heads are masked in a given order.

    Attributes:
        fractions: Requested fractions of heads masked, increasing.
        num_masked: Heads actually masked for each fraction, ``round(fraction * L * H)``.
        accuracy: Top-1 accuracy for each fraction.
        loss: Mean per-example loss for each fraction.
        order_name: Label of the pruning order (for legends and files).

    Examples:
        >>> curve = AblationCurve([0.0, 1.0], [0, 4], [0.75, 0.25], [0.5, 1.5], "gmar")
        >>> AblationCurve.from_dict(curve.to_dict()) == curve
        True
    """

    fractions: list[float]
    num_masked: list[int]
    accuracy: list[float]
    loss: list[float]
    order_name: str

    _CSV_COLUMNS = ("order_name", "fraction", "num_masked", "accuracy", "loss")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationCurve:
        """Rebuild a curve from :meth:`to_dict` output."""
        return cls(
            fractions=[float(v) for v in data["fractions"]],
            num_masked=[int(v) for v in data["num_masked"]],
            accuracy=[float(v) for v in data["accuracy"]],
            loss=[float(v) for v in data["loss"]],
            order_name=str(data["order_name"]),
        )

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write the curve as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> AblationCurve:
        """Read a curve written by :meth:`save_json`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def save_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per fraction (``order_name, fraction, num_masked, accuracy, loss``), atomically."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self._CSV_COLUMNS)
        for row in zip(self.fractions, self.num_masked, self.accuracy, self.loss, strict=True):
            # repr-exact floats so a CSV round-trip returns the same numbers.
            writer.writerow((self.order_name, *(repr(value) for value in row)))
        atomic_write_text(path, buffer.getvalue())

    @classmethod
    def load_csv(cls, path: str | os.PathLike[str]) -> AblationCurve:
        """Read a curve written by :meth:`save_csv`."""
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"`path` {os.fspath(path)!r} holds no ablation rows; write it with `save_csv`.")
        return cls(
            fractions=[float(row["fraction"]) for row in rows],
            num_masked=[int(row["num_masked"]) for row in rows],
            accuracy=[float(row["accuracy"]) for row in rows],
            loss=[float(row["loss"]) for row in rows],
            order_name=rows[0]["order_name"],
        )


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions] if isinstance(fractions, Sequence) else []
    if not values or any(not 0.0 <= f <= 1.0 for f in values) or values != sorted(set(values)):
        raise ValueError(f"`fractions` must be distinct increasing numbers in [0, 1], got {fractions!r}.")
    return values


def head_ablation_curve(
    model: nn.Module,
    dataloader: Iterable[Any],
    order: Tensor | Sequence[Sequence[int]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    order_name: str = "order",
    loss_fn: LossFn = per_example_cross_entropy,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> AblationCurve:
    """Accuracy and loss after masking the first ``round(fraction * L * H)`` heads of ``order``, per fraction.

    ``round`` is Python's (halves go to the even count); the counts used are stored in ``num_masked``.

    The dataloader is read once: every batch is evaluated under each fraction's mask before the next batch is
    fetched, so random augmentations are identical across fractions and nothing is cached. Fraction 0 runs the
    unmasked model. The model runs in eval mode under ``torch.inference_mode()``; its training flags are restored.

    Args:
        model: A timm Vision Transformer returning logits ``[B, C]``; it must already be on ``device``.
        dataloader: Yields ``(images, labels)`` or ``(images, labels, masks)``; labels are class indices.
        order: ``[L * H, 2]`` ``(layer, head)`` pruning order, e.g. from :func:`rank_heads` or :func:`random_order`.
        fractions: Distinct increasing fractions of heads to mask, in ``[0, 1]``.
        order_name: Label stored in the curve (legend of :func:`plot_ablation_curves`).
        loss_fn: ``loss_fn(logits, labels) -> [B]`` per-example losses.
        max_batches: Stop after this many batches (``None``: the whole dataloader).
        device: Where batches are moved; defaults to the device of the model's parameters.
        progress: Show a tqdm progress bar.

    Examples:
        >>> import timm
        >>> model = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
        >>> batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
        >>> curve = head_ablation_curve(model, batches, random_order(2, 2), [0.0, 0.5, 1.0], progress=False)
        >>> curve.num_masked
        [0, 2, 4]
    """
    _check_max_batches(max_batches)
    values = _check_fractions(fractions)
    eager = unwrap_model(model)
    layers, num_heads = _maskable_layers(eager)
    order = _check_order(order, len(layers), num_heads)
    counts = [round(fraction * len(order)) for fraction in values]
    masks = [mask_from_order(order, count, len(layers), num_heads) for count in counts]
    device = _model_device(eager, device)
    correct = torch.zeros(len(values), dtype=torch.float64)
    loss_sums = torch.zeros(len(values), dtype=torch.float64)
    num_samples = 0
    with eval_mode_without_fast_paths(eager, []), torch.inference_mode():
        for images, labels in _batches(dataloader, max_batches, device, progress, f"head ablation ({order_name})"):
            for index, mask in enumerate(masks):
                with head_mask(eager, mask):
                    logits = _logits(eager, images)
                loss_sums[index] += _per_example_loss(loss_fn, logits, labels).double().sum().item()
                correct[index] += (logits.argmax(dim=-1) == labels).sum().item()
            num_samples += labels.shape[0]
    if num_samples == 0:
        raise ValueError("`dataloader` yielded no batches; an ablation curve needs at least one sample.")
    return AblationCurve(
        fractions=values,
        num_masked=counts,
        accuracy=(correct / num_samples).tolist(),
        loss=(loss_sums / num_samples).tolist(),
        order_name=order_name,
    )


def plot_ablation_curves(
    curves: AblationCurve | Sequence[AblationCurve], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Plot accuracy against the fraction of heads masked, one line per pruning order; save a PNG if ``path``.

    Uses :class:`matplotlib.figure.Figure` directly, so no pyplot state or GUI backend is involved.

    Examples:
        >>> figure = plot_ablation_curves([AblationCurve([0.0, 1.0], [0, 4], [0.9, 0.1], [0.2, 2.0], "gmar")])
        >>> figure.axes[0].get_legend_handles_labels()[1]
        ['gmar']
    """
    curves = [curves] if isinstance(curves, AblationCurve) else list(curves)
    if not curves or not all(isinstance(curve, AblationCurve) for curve in curves):
        raise TypeError("`curves` must be a non-empty list of AblationCurve, e.g. from `head_ablation_curve`.")
    figure = Figure(figsize=(5.0, 3.5), layout="constrained")
    axes = figure.subplots()
    for curve in curves:
        axes.plot(curve.fractions, curve.accuracy, marker="o", label=curve.order_name)
    axes.set_xlabel("fraction of heads masked")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    if path is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        atomic_write_bytes(path, buffer.getvalue())
    return figure
