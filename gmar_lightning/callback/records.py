"""Turn one evaluation's explanations into an [`EvaluationRecord`][gmar_lightning.callback.records.EvaluationRecord] of
plain data.

The callback decides *when* to explain and keeps the state; this module decides *what* is logged: overlay pages, the
evolution of a few probe images' maps, per-layer and per-head head-weight histograms, per-head and specialisation
scalars with the charts that group them, figures, a head-weight table and probe-batch metric scores. Tags live under
``gmar/``; layers are numbered ``layer_00, layer_01, ...`` and heads ``head_00, head_01, ...`` in forward order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from gmar_lightning import metrics
from gmar_lightning._checks import check_non_negative_int
from gmar_lightning.explanation import Explanation
from gmar_lightning.methods import METHOD_TABLE
from gmar_lightning.render import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    denormalize,
    evolution_page_images,
    figure_to_array,
    head_heatmap_figure,
    layer_trajectory_images,
    naflex_display,
    overlay,
    overlay_page_images,
    specialisation_images,
)
from gmar_lightning.trajectory import HeadTrajectory

__all__ = [
    "EVOLUTION_ROWS",
    "METRICS",
    "EvaluationRecord",
    "MapHistory",
    "Probe",
    "evaluation_record",
    "map_meaning",
    "probe_metric_scores",
]

METRICS: tuple[str, ...] = tuple(metrics.METRICS)
"""Metric names the callback accepts in ``metrics=`` (the names of ``gmar_lightning.metrics.METRICS``); those scored
against masks are skipped when the probe has none."""

_SUMMARY_TAGS = {"entropy": "entropy", "top_share": "top_head_share", "stability": "rank_stability"}

_TABLE_COLUMNS = ("step", "epoch", "layer", "layer_name", "head", "weight")

EVOLUTION_ROWS = 4
"""How many probe images (the first ones) the evolution figure follows over the evaluations."""

# The evolution figure shows maps at tile size, and maps are smooth upsamplings of the patch grid: 64 px per side keep
# every detail while a long run's history stays small in memory and in checkpoints.
_HISTORY_SIDE = 64


@dataclass(eq=False)
class EvaluationRecord:
    """Everything one evaluation logs, as plain data keyed by tag (e.g. ``"gmar/overlay/gmar_l1"``).

    Attributes:
        step: Trainer global step the values belong to.
        epoch: Trainer epoch.
        images: Tag -> ``[3, H, W]`` (or ``[1, H, W]``) image, float in ``[0, 1]`` or uint8 (a rasterised page), e.g.
            an overlay page.
        figures: Tag -> matplotlib figure (head heatmap, trajectory, ...).
        histograms: Tag -> 1-D values, e.g. one layer's head weights.
        scalars: Tag -> number, e.g. one layer's head entropy.
        captions: Tag -> caption for the image or figure of the same tag.
        galleries: Tag -> ``(image, caption)`` pairs, one per probe image, for back-ends that show captioned image
            lists (W&B); TensorBoard and files get the grid in ``images`` instead.
        tables: Tag -> ``(columns, rows)`` of a small table (W&B table, TensorBoard text, CSV file).
        line_charts: Chart tag -> the scalar tags drawn as the lines of one chart (TensorBoard custom-scalars
            layout, W&B line series); every tag is also in ``scalars``.

    Examples:
        >>> import torch
        >>> record = EvaluationRecord(step=120, epoch=2, scalars={"gmar/entropy/layer_00": 0.93})
        >>> record.step, record.images, record.scalars
        (120, {}, {'gmar/entropy/layer_00': 0.93})
    """

    step: int
    epoch: int
    images: dict[str, Tensor] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    galleries: dict[str, list[tuple[Tensor, str]]] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    line_charts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_non_negative_int("step", self.step)
        check_non_negative_int("epoch", self.epoch)
        for tag, image in self.images.items():
            if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
                shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"`images[{tag!r}]` must be a [3, H, W] or [1, H, W] tensor, got {shape}.")
        for tag, figure in self.figures.items():
            if not isinstance(figure, Figure):
                raise TypeError(f"`figures[{tag!r}]` must be a matplotlib Figure, got {type(figure).__name__}.")
        for tag, values in self.histograms.items():
            if not isinstance(values, Tensor):
                raise TypeError(f"`histograms[{tag!r}]` must be a torch.Tensor, got {type(values).__name__}.")


@dataclass
class Probe:
    """The fixed batch explained at every evaluation, kept on the CPU.

    Attributes:
        images: ``[B, C, H, W]`` model inputs, or a NaFlex dict (timm's or transformers' keys, see
            [`gmar_lightning.naflex`][gmar_lightning.naflex]) of ``B`` images of their own sizes.
        labels: ``[B]`` class labels, if known.
        masks: ``[B, H, W]`` boolean object masks, if known (needed by the pointing games).
    """

    images: Tensor | dict[str, Tensor]
    labels: Tensor | None = None
    masks: Tensor | None = None

    def __len__(self) -> int:
        images = self.images if isinstance(self.images, Tensor) else next(iter(self.images.values()))
        return int(images.shape[0])

    def state_dict(self) -> dict[str, Tensor | dict[str, Tensor] | None]:
        return {"images": self.images, "labels": self.labels, "masks": self.masks}


@dataclass
class MapHistory:
    """The maps of the first [`EVOLUTION_ROWS`][gmar_lightning.callback.records.EVOLUTION_ROWS] probe images at every
    evaluation, per method, for the evolution figure; stored as ``uint8`` at most 64 px per side.

    Attributes:
        epochs: The epoch of each evaluation.
        maps: Method -> ``[E, R, h, w]`` uint8 maps (``255`` is saliency 1).

    Examples:
        >>> history = MapHistory()
        >>> history.append(0, {"gmar_l1": torch.rand(8, 224, 224)})
        >>> history.epochs, tuple(history.maps["gmar_l1"].shape), history.maps["gmar_l1"].dtype
        ([0], (1, 4, 64, 64), torch.uint8)
    """

    epochs: list[int] = field(default_factory=list)
    maps: dict[str, Tensor] = field(default_factory=dict)

    def append(self, epoch: int, maps: dict[str, Tensor]) -> None:
        """Add one evaluation: method -> ``[B, H, W]`` maps in ``[0, 1]`` of the whole probe."""
        for method, values in maps.items():
            # NaN outside a NaFlex image's own grid: nothing there, and no NaN spread into the pooled border.
            rows = values[:EVOLUTION_ROWS].detach().float().cpu().nan_to_num(0.0).unsqueeze(1)
            side = (min(rows.shape[-2], _HISTORY_SIDE), min(rows.shape[-1], _HISTORY_SIDE))
            small = torch.nn.functional.adaptive_avg_pool2d(rows, side).squeeze(1)
            quantised = (small.clamp(0.0, 1.0) * 255).round().to(torch.uint8).unsqueeze(0)
            previous = self.maps.get(method)
            self.maps[method] = quantised if previous is None else torch.cat([previous, quantised])
        self.epochs.append(int(epoch))

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the callback's checkpoint state."""
        return {"epochs": list(self.epochs), "maps": dict(self.maps)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MapHistory:
        """Rebuild a history from `state_dict` output."""
        return cls(epochs=list(state["epochs"]), maps=dict(state["maps"]))


# Overlays per TensorBoard card, and probe images per evolution card: what fits a card unexpanded.
_OVERLAYS_PER_PAGE = 2
_EVOLUTION_ROWS_PER_PAGE = 2


def map_meaning(method: str) -> tuple[str, str]:
    """What a method's map shows: a short title for the overlay and a sentence for its caption.

    Rollout-type maps (GMAR, rollout, raw attention) follow where attention carries information through the layers;
    on the project's evaluation they hardly change with the explained class or with the classifier's weights.
    ``grad_rollout`` (Chefer et al.'s rule) weighs attention by the explained class's gradient, so it does.

    Examples:
        >>> map_meaning("grad_rollout")[0], map_meaning("gmar_l1")[0]
        ('evidence for the class', 'where attention carries information')
    """
    if METHOD_TABLE[method].reduce == "gradient_relevance":
        return "evidence for the class", (
            "the map weighs attention by the explained class's gradient, so it changes with the class and with the "
            "classifier: it answers 'why this class'"
        )
    return "where attention carries information", (
        "the map follows where attention carries information through the layers; it barely changes with the "
        "explained class, so it does not say why the model chose this class"
    )


def _page_images(page: int, per_page: int, count: int) -> str:
    """The 1-based images on a page: ``"3-4"``, or ``"5"`` alone."""
    first, last = page * per_page + 1, min((page + 1) * per_page, count)
    return str(first) if first == last else f"{first}-{last}"


def _page_tag(base: str, page: int, per_page: int, count: int) -> str:
    """``base`` for the first page, ``base/images_<first>-<last>`` for the others."""
    return base if page == 0 else f"{base}/images_{_page_images(page, per_page, count)}"


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else str(index)


def probe_metric_scores(
    model: nn.Module, probe: Probe, explanation: Explanation, names: Sequence[str]
) -> dict[str, float]:
    """Score one method's maps on the probe with the named metrics; metrics undefined without masks are skipped."""
    if not names:
        return {}
    if not isinstance(probe.images, Tensor):
        raise ValueError(
            f"`metrics` {list(names)} score image tensors [B, C, H, W]; the probe is a NaFlex batch: pass metrics=()."
        )
    images = probe.images.to(explanation.maps.device)
    return {
        name: metrics.METRICS[name].score(model, images, explanation.maps, explanation.targets, probe.masks)
        for name in names
        if probe.masks is not None or metrics.METRICS[name].inputs != "masks"
    }


def evaluation_record(
    *,
    step: int,
    epoch: int,
    probe: Probe,
    explanations: dict[str, Explanation],
    trajectory: HeadTrajectory,
    head_method: str | None,
    map_history: MapHistory | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = 16,
    class_names: Sequence[str] | None = None,
    per_head_histograms: bool = True,
    metric_scores: dict[str, dict[str, float]] | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
    pruned_at: Sequence[int] = (),
) -> EvaluationRecord:
    """Assemble everything one evaluation logs.

    Args:
        step: Trainer global step.
        epoch: Trainer epoch.
        probe: The explained batch.
        explanations: Method name -> its explanation of the probe.
        trajectory: The head-importance trajectory, already updated with this evaluation.
        head_method: The GMAR method whose head weights feed histograms and the heatmap (``None``: no head data).
        map_history: The maps of earlier evaluations and this one, for the evolution figures (``None``: none).
        mean: Per-channel normalisation mean for display (``None``: per-image min-max).
        std: Per-channel normalisation std for display.
        max_images: Most probe images shown per grid.
        class_names: Names for class indices in captions.
        per_head_histograms: Also log one histogram per head.
        metric_scores: Method -> metric name -> score on the probe.
        cmap: Colour map of the overlays.
        alpha: Weight of the map in ``blended`` overlays.
        mode: How maps are drawn, one of [`MODES`][gmar_lightning.render.MODES].
        outlier_percentile: Saturate each map's top percent before drawing it.
        pruned_at: Global steps at which heads were removed, marked on the trajectory figures.

    Returns:
        The record. Images, each sized to be read in a TensorBoard card unexpanded: ``gmar/overlay/<method>`` (the
        first 2 probe images, captioned, titled with what the map shows, with a colour bar) and
        ``gmar/overlay/<method>/images_3-4`` and so on for the others up to ``max_images``; ``gmar/evolution/<method>``
        (probe images 1-2 over evaluations) and ``gmar/evolution/<method>/images_3-4``; galleries
        ``gmar/probe/<method>`` (one captioned overlay per probe image).
        With head data: histograms ``gmar/head_weights/layer_XX`` and ``gmar/head_weights/layer_XX/head_YY``; scalars
        ``gmar/head_mean/layer_XX/head_YY`` (probe mean) grouped into one line chart per layer,
        ``gmar/{entropy,top_head_share,rank_stability}/layer_XX`` grouped into one chart per statistic; figures,
        rasterised as images: ``gmar/head_importance``, ``gmar/trajectory/layer_XX`` (one coloured, named line per
        head) and ``gmar/specialisation/{entropy,top_head_share,rank_stability}``; table ``gmar/head_weights_table``.
        Scalars ``gmar/metrics/<method>/<metric>`` for the metric scores.
    """
    record = EvaluationRecord(step=step, epoch=epoch)
    truths = probe.labels.tolist() if probe.labels is not None else None
    displays, per_page = _displayed(probe, next(iter(explanations.values())), max_images, mean, std)
    for method, explanation in explanations.items():
        shown = min(max_images, explanation.batch_size)
        predictions = explanation.predictions[:shown].tolist()
        probabilities = explanation.logits[:shown].float().softmax(dim=-1).amax(dim=-1).tolist()
        labels = [_class_name(int(truth), class_names) for truth in truths[:shown]] if truths is not None else None
        predicted = [_class_name(int(prediction), class_names) for prediction in predictions]
        maps = explanation.maps[:shown].cpu()
        style = {"cmap": cmap, "alpha": alpha, "mode": mode, "outlier_percentile": outlier_percentile}
        title, meaning = map_meaning(method)
        # (first image, images, their maps cropped to them): a NaFlex map fills its image's corner of the canvas.
        groups, first = [], 0
        for images in displays:
            groups.append((first, images, maps[first : first + len(images), : images.shape[-2], : images.shape[-1]]))
            first += len(images)
        pages, tiles = [], []
        for first, images, own in groups:
            part = slice(first, first + len(images))
            pages += overlay_page_images(images, own, labels[part] if labels else None, predicted[part],
                                         probabilities[part], max_images, per_page, title=f"{method}: {title}",
                                         **style)  # fmt: skip
            tiles += list(overlay(images, own, **style))
        hits = sum(truth == prediction for truth, prediction in zip(truths or [], predictions, strict=False))
        right = f"{hits}/{shown} probe images predicted right" if truths is not None else f"{shown} probe images"
        for page, pixels in enumerate(pages):
            tag = _page_tag(f"gmar/overlay/{method}", page, per_page, shown)
            record.images[tag] = _page_image(pixels)
            record.captions[tag] = f"{method} at epoch {epoch}, step {step}: {right}; {meaning}."
        record.galleries[f"gmar/probe/{method}"] = [
            (tile, f"{'true: ' + labels[index] + ', ' if labels else ''}pred: {predicted[index]} "
                   f"({probabilities[index]:.0%})")
            for index, tile in enumerate(tiles)
        ]  # fmt: skip
        if map_history is not None and method in map_history.maps:
            history = map_history.maps[method].float() / 255.0
            evaluations, rows, height, width = history.shape
            evolution, evolution_per_page = [], min(per_page, _EVOLUTION_ROWS_PER_PAGE)
            for first, images, _ in groups:
                if first >= rows:
                    break
                images = images[: rows - first]
                # The history holds the whole canvas, pooled: an image's own share of it.
                own_height = max(1, round(height * images.shape[-2] / maps.shape[-2]))
                own_width = max(1, round(width * images.shape[-1] / maps.shape[-1]))
                evolution += evolution_page_images(
                    images,
                    history[:, first : first + len(images), :own_height, :own_width],
                    # A method added when a run resumed has maps of the latest evaluations only.
                    map_history.epochs[-evaluations:],
                    rows_per_page=evolution_per_page,
                    first_image=first + 1,
                    **style,
                )
            for page, pixels in enumerate(evolution):
                tag = _page_tag(f"gmar/evolution/{method}", page, evolution_per_page, rows)
                record.images[tag] = _page_image(pixels)
                record.captions[tag] = (
                    f"{method} maps of probe images {_page_images(page, evolution_per_page, rows)} at "
                    f"{evaluations} evaluations (at most 4 shown, evenly spaced, always the first and the latest)"
                )
        for metric, score in (metric_scores or {}).get(method, {}).items():
            record.scalars[f"gmar/metrics/{method}/{metric}"] = score

    if head_method is not None:
        _add_head_data(record, explanations[head_method], trajectory, per_head_histograms, pruned_at)
    return record


def _displayed(
    probe: Probe, explanation: Explanation, max_images: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[Tensor], int]:
    """The shown probe images in ``[0, 1]``, as groups of one size, and the overlays per page: image tensors are one
    group, two per page; a NaFlex batch's images each at their own size and aspect ratio, one per page (a page puts
    tiles of one size side by side)."""
    if isinstance(probe.images, Tensor):
        return [denormalize(probe.images[:max_images], mean, std)], _OVERLAYS_PER_PAGE
    grid = explanation.grid_sizes.amax(dim=0).tolist()
    patch_size = (explanation.maps.shape[-2] // grid[0], explanation.maps.shape[-1] // grid[1])
    shown = {key: value[:max_images] for key, value in probe.images.items()}
    return naflex_display(shown, patch_size, mean, std), 1


def _page_image(pixels: np.ndarray) -> Tensor:
    """A rasterised page (``[H, W, 3]`` uint8) as a ``[3, H, W]`` uint8 image, so every back-end logs the same
    pixels."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _add_head_data(
    record: EvaluationRecord,
    explanation: Explanation,
    trajectory: HeadTrajectory,
    per_head_histograms: bool,
    pruned_at: Sequence[int] = (),
) -> None:
    weights = explanation.head_weights.cpu()
    num_layers, num_heads = weights.shape[1:]
    layer_names = trajectory.layer_names or [f"layer {layer}" for layer in range(num_layers)]
    means = weights.mean(dim=0)
    rows = []
    for layer in range(num_layers):
        layer_tag = f"layer_{layer:02d}"
        # NaN marks heads a pruned layer no longer has: they get no histogram, scalar or row, a layer without heads
        # no histogram and no chart.
        values = weights[:, layer].flatten()
        if not values.isnan().all():
            record.histograms[f"gmar/head_weights/{layer_tag}"] = values[~values.isnan()]
        head_tags = []
        for head in range(num_heads):
            if weights[:, layer, head].isnan().any():
                continue
            if per_head_histograms:
                record.histograms[f"gmar/head_weights/{layer_tag}/head_{head:02d}"] = weights[:, layer, head]
            head_tags.append(f"gmar/head_mean/{layer_tag}/head_{head:02d}")
            record.scalars[head_tags[-1]] = float(means[layer, head])
            rows.append([record.step, record.epoch, layer, layer_names[layer], head, float(means[layer, head])])
        if head_tags:
            record.line_charts[f"gmar/head_mean/{layer_tag}"] = head_tags
    record.tables["gmar/head_weights_table"] = (list(_TABLE_COLUMNS), rows)
    for name, values in trajectory.summaries().items():
        chart = []
        for layer, value in enumerate(values[-1].tolist()):
            if not math.isnan(value):
                chart.append(f"gmar/{_SUMMARY_TAGS[name]}/layer_{layer:02d}")
                record.scalars[chart[-1]] = value
        if chart:
            record.line_charts[f"gmar/{_SUMMARY_TAGS[name]}"] = chart
    heatmap = head_heatmap_figure(weights, trajectory.layer_names or None)
    record.images["gmar/head_importance"] = _page_image(figure_to_array(heatmap))
    for layer, pixels in enumerate(layer_trajectory_images(trajectory, pruned_at)):
        record.images[f"gmar/trajectory/layer_{layer:02d}"] = _page_image(pixels)
    for name, pixels in specialisation_images(trajectory).items():
        record.images[f"gmar/specialisation/{_SUMMARY_TAGS[name]}"] = _page_image(pixels)
