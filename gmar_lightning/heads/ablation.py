"""Trace accuracy and loss as more and more heads are masked in a pruning order, and plot the curves."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from gmar_lightning._io import atomic_write_bytes, atomic_write_csv, atomic_write_text
from gmar_lightning.capture import unwrap_model
from gmar_lightning.heads._batches import (
    LossFn,
    _batches,
    _check_max_batches,
    _logits,
    _model_device,
    _per_example_loss,
    per_example_cross_entropy,
)
from gmar_lightning.heads.masking import _check_order, _maskable_layers, head_mask, mask_from_order
from gmar_lightning.model_state import eval_mode, frozen_parameters, no_grad_checkpointing
from gmar_lightning.render import figure_to_png_bytes

__all__ = ["DEFAULT_FRACTIONS", "AblationCurve", "head_ablation_curve", "plot_ablation_curves"]


DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""Fractions of heads masked by [`head_ablation_curve`][gmar_lightning.heads.ablation.head_ablation_curve] unless told
otherwise: 0, 0.1, ..., 1."""


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
        """Rebuild a curve from `to_dict` output."""
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
        """Read a curve written by `save_json`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def save_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per fraction (``order_name, fraction, num_masked, accuracy, loss``), atomically."""
        rows = zip(self.fractions, self.num_masked, self.accuracy, self.loss, strict=True)
        # repr-exact floats so a CSV round-trip returns the same numbers.
        atomic_write_csv(path, self._CSV_COLUMNS, [(self.order_name, *(repr(value) for value in row)) for row in rows])

    @classmethod
    def load_csv(cls, path: str | os.PathLike[str]) -> AblationCurve:
        """Read a curve written by `save_csv`."""
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
        order: ``[L * H, 2]`` ``(layer, head)`` pruning order, e.g. from `rank_heads` or `random_order`.
        fractions: Distinct increasing fractions of heads to mask, in ``[0, 1]``.
        order_name: Label stored in the curve (legend of
            [`plot_ablation_curves`][gmar_lightning.heads.ablation.plot_ablation_curves]).
        loss_fn: ``loss_fn(logits, labels) -> [B]`` per-example losses.
        max_batches: Stop after this many batches (``None``: the whole dataloader).
        device: Where batches are moved; defaults to the device of the model's parameters.
        progress: Show a tqdm progress bar.

    Examples:
        >>> import timm
        >>> model = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
        >>> from gmar_lightning.heads import random_order
        >>> batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
        >>> curve = head_ablation_curve(model, batches, random_order(2, 2), [0.0, 0.5, 1.0], progress=False)
        >>> curve.num_masked
        [0, 2, 4]
    """
    _check_max_batches(max_batches)
    values = _check_fractions(fractions)
    eager = unwrap_model(model)
    layout = _maskable_layers(eager)
    num_layers, present = len(layout.layers), layout.present
    order = _check_order(order, num_layers, layout.width, present)
    counts = [round(fraction * len(order)) for fraction in values]
    masks = [mask_from_order(order, count, num_layers, layout.width, present) for count in counts]
    device = _model_device(eager, device)
    correct = torch.zeros(len(values), dtype=torch.float64)
    loss_sums = torch.zeros(len(values), dtype=torch.float64)
    num_samples = 0
    with frozen_parameters(eager), no_grad_checkpointing(eager), eval_mode(eager), torch.inference_mode():
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

    Uses `matplotlib.figure.Figure` directly, so no pyplot state or GUI backend is involved.

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
        atomic_write_bytes(path, figure_to_png_bytes(figure, dpi=120))
    return figure
