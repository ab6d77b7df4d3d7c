"""Turn explanations and head-importance trajectories into image tensors and matplotlib figures.

Figures are built as :class:`matplotlib.figure.Figure` objects drawn by the Agg canvas, never through
``pyplot``: no global figure registry, no GUI backend, safe in dataloader workers and headless jobs. Such a
figure is freed by garbage collection once the last reference goes; there is no ``plt.close`` to forget.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from gmar_lightning.trajectory import HeadTrajectory

__all__ = [
    "denormalize",
    "figure_to_array",
    "figure_to_png_bytes",
    "head_heatmap_figure",
    "overlay",
    "overlay_grid_figure",
    "overlay_grid_image",
    "specialisation_figure",
    "trajectory_figure",
]

_DPI = 100
_PANEL_COLUMNS = 4
_CAPTION_FONT_SIZE = 6
_TILE_INCHES = 1.6


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, C, H, W], got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`{name}` must have shape [B, C, H, W] with B >= 1, got {list(images.shape)}.")


def _channel_stats(name: str, values: Sequence[float] | Tensor, channels: int, images: Tensor) -> Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32, device=images.device).flatten()
    if stats.numel() != channels:
        raise ValueError(f"`{name}` must have one value per channel ({channels}), got {stats.numel()} values.")
    return stats.view(1, channels, 1, 1)


def denormalize(
    images: Tensor, mean: Sequence[float] | Tensor | None = None, std: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Map normalised model inputs back to displayable ``[0, 1]`` images.

    With ``mean`` and ``std`` (e.g. timm's ``pretrained_cfg["mean"]``/``["std"]``) the normalisation is undone,
    ``x * std + mean``, then clamped. Without them each image is min-max scaled on its own (a constant image
    becomes zeros).

    Args:
        images: ``[B, C, H, W]`` normalised images.
        mean: ``C`` per-channel means used for normalisation; give together with ``std``.
        std: ``C`` per-channel standard deviations.

    Returns:
        ``[B, C, H, W]`` float32 images in ``[0, 1]``, on the input's device.

    Examples:
        >>> mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        >>> denormalize(torch.tensor([-2.0, 0.0, 1.0, 4.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2), mean, std)[0, 0]
        tensor([[0.0000, 0.5000],
                [0.7500, 1.0000]])
        >>> denormalize(torch.tensor([2.0, 4.0, 6.0, 10.0]).view(1, 1, 2, 2))[0, 0]
        tensor([[0.0000, 0.2500],
                [0.5000, 1.0000]])
    """
    _check_images(images)
    if (mean is None) != (std is None):
        raise ValueError("`mean` and `std` must be given together (or both left out for per-image min-max scaling).")
    images = images.detach().float()
    if mean is not None and std is not None:
        channels = images.shape[1]
        restored = images * _channel_stats("std", std, channels, images) + _channel_stats(
            "mean", mean, channels, images
        )
        return restored.clamp(0.0, 1.0)
    flat = images.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1, 1) - low).clamp_min(torch.finfo(torch.float32).tiny)
    return ((images - low) / span).clamp(0.0, 1.0)


def _colormap_table(cmap: str, device: torch.device) -> Tensor:
    """The colormap's 256 RGB entries as a ``[256, 3]`` tensor, so colouring a batch is one gather."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"`cmap` must be a matplotlib colormap name such as 'jet' or 'viridis', got {cmap!r}."
        ) from None
    table = colormap(np.linspace(0.0, 1.0, min(colormap.N, 256)))[:, :3]
    return torch.as_tensor(table, dtype=torch.float32, device=device)


def overlay(images: Tensor, maps: Tensor, cmap: str = "jet", alpha: float = 0.5) -> Tensor:
    """Blend colour-mapped saliency maps over images: ``(1 - alpha) * image + alpha * cmap(map)``.

    Args:
        images: ``[B, 3, H, W]`` (or single-channel ``[B, 1, H, W]``) images in ``[0, 1]``, e.g. from
            :func:`denormalize`.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]`` (``Explanation.maps``); values outside are clamped.
        cmap: A matplotlib colormap name.
        alpha: Opacity of the map, in ``[0, 1]``.

    Returns:
        ``[B, 3, H, W]`` float32 tensor in ``[0, 1]`` on the images' device.

    Examples:
        >>> blended = overlay(torch.ones(2, 3, 4, 4), torch.zeros(2, 4, 4), cmap="gray", alpha=0.5)
        >>> tuple(blended.shape), blended.unique().tolist()
        ((2, 3, 4, 4), [0.5])
    """
    _check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have 1 or 3 channels, got {images.shape[1]}; pass RGB or grayscale images.")
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (images.shape[0], *images.shape[2:]):
        shape = list(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(
            f"`maps` must have shape {[images.shape[0], *images.shape[2:]]} (one map per image, at image size), "
            f"got {shape}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
    table = _colormap_table(cmap, images.device)
    levels = maps.detach().to(images.device, torch.float32).nan_to_num(0.0).clamp(0.0, 1.0)
    indices = (levels * (table.shape[0] - 1)).round().long()
    colours = table[indices].permute(0, 3, 1, 2)
    base = images.detach().float().clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    return ((1.0 - alpha) * base + alpha * colours).clamp(0.0, 1.0)


def _select(images: Tensor, maps: Tensor, max_images: int) -> tuple[Tensor, Tensor]:
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"`max_images` must be a positive integer, got {max_images!r}.")
    return images[:max_images], maps[:max_images]


def _grid_columns(count: int) -> int:
    return math.ceil(math.sqrt(count))


def overlay_grid_image(
    images: Tensor, maps: Tensor, max_images: int = 16, cmap: str = "jet", alpha: float = 0.5, padding: int = 2
) -> Tensor:
    """Overlays of the first ``max_images`` images tiled into one near-square image, for ``add_image``.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]``.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]``.
        max_images: How many images to show at most.
        cmap: A matplotlib colormap name.
        alpha: Opacity of the map.
        padding: Pixels between tiles.

    Returns:
        ``[3, H_grid, W_grid]`` float32 CPU tensor in ``[0, 1]``.

    Examples:
        >>> overlay_grid_image(torch.rand(5, 3, 8, 8), torch.rand(5, 8, 8), max_images=4, padding=1).shape
        torch.Size([3, 19, 19])
    """
    _check_images(images)
    images, maps = _select(images, maps, max_images)
    tiles = overlay(images, maps, cmap=cmap, alpha=alpha).cpu()
    return make_grid(tiles, nrow=_grid_columns(tiles.shape[0]), padding=padding, pad_value=1.0)


def _check_names(name: str, names: Sequence[str] | None, count: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or len(names) < count:
        raise ValueError(f"`{name}` must be a list with one string per shown image ({count}), got {names!r}.")
    return [str(value) for value in names[:count]]


def overlay_grid_figure(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[str] | None = None,
    predictions: Sequence[str] | None = None,
    max_images: int = 16,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """A captioned grid of overlays: each tile titled ``"true: <label> / pred: <prediction>"``.

    The grid is drawn as one image in a single axes (much faster than one axes per tile); a caption is green
    when the prediction matches the label and red otherwise.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]``.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]``.
        labels: True class names, one per image (at least the shown ones); ``None`` leaves them out.
        predictions: Predicted class names, likewise.
        max_images: How many images to show at most.
        cmap: A matplotlib colormap name.
        alpha: Opacity of the map.

    Returns:
        A figure with one axes.

    Examples:
        >>> figure = overlay_grid_figure(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), ["cat", "dog"], ["cat", "cat"])
        >>> len(figure.axes), [text.get_text() for text in figure.axes[0].texts]
        (1, ['true: cat / pred: cat', 'true: dog / pred: cat'])
    """
    _check_images(images)
    images, maps = _select(images, maps, max_images)
    count = images.shape[0]
    labels = _check_names("labels", labels, count)
    predictions = _check_names("predictions", predictions, count)
    tiles = overlay(images, maps, cmap=cmap, alpha=alpha).cpu()
    height, width = tiles.shape[2:]
    columns = _grid_columns(count)
    rows = math.ceil(count / columns)
    inches_per_pixel = _TILE_INCHES / width
    padding = max(1, round(0.05 / inches_per_pixel))
    has_captions = labels is not None or predictions is not None
    # Room above each tile for one caption line, measured in image pixels because the grid is scaled to fit.
    caption_band = math.ceil(2.2 * _CAPTION_FONT_SIZE / 72 / inches_per_pixel) if has_captions else 0
    cell_height, cell_width = height + caption_band + padding, width + padding
    canvas = torch.ones(3, rows * cell_height + padding, columns * cell_width + padding)
    figure = Figure(figsize=(canvas.shape[2] * inches_per_pixel, canvas.shape[1] * inches_per_pixel), dpi=_DPI)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.set_axis_off()
    for index in range(count):
        top = (index // columns) * cell_height + padding + caption_band
        left = (index % columns) * cell_width + padding
        canvas[:, top : top + height, left : left + width] = tiles[index]
        if has_captions:
            label = labels[index] if labels is not None else "?"
            prediction = predictions[index] if predictions is not None else "?"
            colour = "black" if labels is None or predictions is None else ("green" if label == prediction else "red")
            axes.text(
                left + width / 2,
                top - caption_band / 2,
                f"true: {label} / pred: {prediction}",
                ha="center",
                va="center",
                fontsize=_CAPTION_FONT_SIZE,
                color=colour,
            )
    axes.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    return figure


def _layer_labels(layer_names: Sequence[str] | None, count: int) -> list[str]:
    if not layer_names:
        return [f"layer {index}" for index in range(count)]
    if len(layer_names) != count:
        raise ValueError(f"`layer_names` must name each of the {count} layers, got {len(layer_names)} names.")
    return [str(name) for name in layer_names]


# Fixed layouts in inches: matplotlib's constrained layout measures every tick label on each draw and alone
# costs more than the whole rendering budget of an evaluation.
_TEXT_INCHES_PER_CHAR = 0.065
_LEGEND_HANDLE_INCHES = 0.7


def _panel_grid(
    rows: int,
    columns: int,
    panel: tuple[float, float],
    margins: tuple[float, float, float, float],
    gaps: tuple[float, float] = (0.35, 0.45),
    **subplot_options: bool,
) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x columns`` panels of ``panel`` inches, with margins ``(left, right, bottom, top)``."""
    panel_width, panel_height = panel
    left, right, bottom, top = margins
    gap_width, gap_height = gaps
    width = left + columns * panel_width + (columns - 1) * gap_width + right
    height = bottom + rows * panel_height + (rows - 1) * gap_height + top
    figure = Figure(figsize=(width, height), dpi=_DPI)
    grid = figure.subplots(
        rows,
        columns,
        squeeze=False,
        gridspec_kw={
            "left": left / width,
            "right": 1 - right / width,
            "bottom": bottom / height,
            "top": 1 - top / height,
            "wspace": gap_width / panel_width,
            "hspace": gap_height / panel_height,
        },
        **subplot_options,
    )
    return figure, grid


def _legend_width(labels: Sequence[str]) -> float:
    return _LEGEND_HANDLE_INCHES + _TEXT_INCHES_PER_CHAR * max((len(label) for label in labels), default=0)


def head_heatmap_figure(
    weights: Tensor, layer_names: Sequence[str] | None = None, title: str = "GMAR head importance"
) -> Figure:
    """A layers x heads heatmap of head importance with a colorbar.

    Args:
        weights: ``[L, H]`` head weights (e.g. the batch mean of ``Explanation.head_weights``) or ``[B, L, H]``,
            which is averaged over the batch. NaN cells (heads a pruned layer no longer has) are drawn light grey.
        layer_names: ``L`` row labels; defaults to ``layer 0 .. layer L-1``.
        title: Figure title.

    Returns:
        A figure with two axes: the heatmap and its colorbar.

    Examples:
        >>> len(head_heatmap_figure(torch.rand(3, 4), ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]).axes)
        2
    """
    if not isinstance(weights, Tensor) or weights.ndim not in (2, 3) or 0 in weights.shape:
        shape = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"`weights` must be a non-empty tensor of shape [L, H] or [B, L, H], got {shape}.")
    values = weights.detach().float().cpu()
    if values.ndim == 3:
        values = values.mean(dim=0)
    num_layers, num_heads = values.shape
    labels = _layer_labels(layer_names, num_layers)
    left = 0.3 + _TEXT_INCHES_PER_CHAR * max(len(label) for label in labels)
    panel = (max(1.6, 0.4 * num_heads), max(1.0, 0.3 * num_layers))
    figure, grid = _panel_grid(1, 1, panel, margins=(left, 1.1, 0.5, 0.35))
    axes = grid[0, 0]
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axes.imshow(values.numpy(), cmap=colormap, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(num_heads), [str(head) for head in range(num_heads)])
    axes.set_yticks(range(num_layers), labels)
    axes.tick_params(labelsize=8)
    axes.set_xlabel("head", fontsize=9)
    axes.set_title(title, fontsize=10)
    width, height = figure.get_size_inches()
    colorbar_axes = figure.add_axes((1 - 0.95 / width, 0.5 / height, 0.15 / width, panel[1] / height))
    figure.colorbar(image, cax=colorbar_axes).set_label("weight", fontsize=9)
    colorbar_axes.tick_params(labelsize=8)
    return figure


def _empty_note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray", fontsize=8)


def trajectory_figure(trajectory: HeadTrajectory, title: str = "GMAR head importance over training") -> Figure:
    """One panel per layer, one line per head: head weight (y) against epoch (x).

    Args:
        trajectory: The recorded trajectory; an empty one gives empty panels (or a single note when even the
            number of layers is unknown).
        title: Figure title.

    Returns:
        A figure with one axes per layer (at least one).

    Examples:
        >>> trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.ones(2, 2))
        >>> len(trajectory_figure(trajectory).axes)
        2
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    num_layers, num_heads = trajectory.num_layers, trajectory.num_heads
    panels = max(num_layers, 1)
    columns = min(panels, _PANEL_COLUMNS)
    rows = math.ceil(panels / columns)
    head_labels = [f"head {head}" for head in range(num_heads)]
    right = _legend_width(head_labels) if len(trajectory) else 0.2
    figure, grid = _panel_grid(rows, columns, (2.3, 1.6), margins=(0.6, right, 0.45, 0.55), sharex=True, sharey=True)
    grid = grid.flatten()
    for unused in grid[panels:]:
        figure.delaxes(unused)
    figure.suptitle(title, fontsize=10)
    if num_layers == 0:
        grid[0].set_axis_off()
        _empty_note(grid[0], "no head importance recorded yet")
        return figure
    labels = _layer_labels(trajectory.layer_names, num_layers)
    weights = trajectory.weights.numpy()
    for layer, axes in enumerate(grid[:panels]):
        for head, head_label in enumerate(head_labels):
            axes.plot(trajectory.epochs, weights[:, layer, head], marker="o", markersize=2.5, label=head_label)
        axes.set_title(labels[layer], fontsize=8)
        axes.tick_params(labelsize=7, labelbottom=True)
        if not len(trajectory):
            _empty_note(axes, "no epochs yet")
    for axes in grid[(rows - 1) * columns : panels]:
        axes.set_xlabel("epoch", fontsize=8)
    for axes in grid[:panels:columns]:
        axes.set_ylabel("weight", fontsize=8)
    if len(trajectory):
        figure.legend(*grid[0].get_legend_handles_labels(), loc="upper right", fontsize=7, frameon=False)
    return figure


_SUMMARY_PANELS: tuple[tuple[str, str], ...] = (
    ("entropy", "normalised head entropy"),
    ("top_share", "top-head share"),
    ("stability", "rank stability (Spearman)"),
)


def specialisation_figure(trajectory: HeadTrajectory, title: str = "GMAR head specialisation") -> Figure:
    """Three panels over epochs, one line per layer: head entropy, top-head share and rank stability.

    See :func:`gmar_lightning.trajectory.specialisation` and :func:`~gmar_lightning.trajectory.rank_stability`
    for the definitions.

    Args:
        trajectory: The recorded trajectory (may be empty).
        title: Figure title.

    Returns:
        A figure with three axes.

    Examples:
        >>> trajectory = HeadTrajectory()
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
        >>> [axes.get_title() for axes in specialisation_figure(trajectory).axes]
        ['normalised head entropy', 'top-head share', 'rank stability (Spearman)']
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    summaries = trajectory.summaries()
    # Layer names without any recorded row give no lines: the statistics need head weights.
    recorded_layers = trajectory.weights.shape[1]
    labels = _layer_labels(trajectory.layer_names, recorded_layers) if recorded_layers else []
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(labels), 1)))
    right = _legend_width(labels) if labels else 0.2
    figure, grid = _panel_grid(
        1, len(_SUMMARY_PANELS), (2.8, 2.0), margins=(0.45, right, 0.45, 0.55), gaps=(0.5, 0.45), sharex=True
    )
    panels = grid[0]
    figure.suptitle(title, fontsize=10)
    for axes, (key, name) in zip(panels, _SUMMARY_PANELS, strict=True):
        values = summaries[key].numpy()
        for layer, label in enumerate(labels):
            axes.plot(
                trajectory.epochs, values[:, layer], marker="o", markersize=2.5, color=colours[layer], label=label
            )
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.set_ylim(-1.05 if key == "stability" else -0.05, 1.05)
        axes.tick_params(labelsize=7)
        if not len(trajectory):
            _empty_note(axes, "no epochs yet")
    if labels:
        figure.legend(*panels[0].get_legend_handles_labels(), loc="upper right", fontsize=7, frameon=False)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a figure with the Agg canvas to an ``[H, W, 3]`` uint8 RGB array.

    Examples:
        >>> figure = Figure(figsize=(2, 1), dpi=50)
        >>> figure_to_array(figure).shape, figure_to_array(figure).dtype
        ((50, 100, 3), dtype('uint8'))
    """
    if not isinstance(figure, Figure):
        raise TypeError(f"`figure` must be a matplotlib Figure, got {type(figure).__name__}.")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figure_to_png_bytes(figure: Figure) -> bytes:
    """Encode a figure as PNG bytes at the figure's own dpi, with fast (light) compression.

    Examples:
        >>> figure_to_png_bytes(Figure(figsize=(1, 1), dpi=20))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not isinstance(figure, Figure):
        raise TypeError(f"`figure` must be a matplotlib Figure, got {type(figure).__name__}.")
    buffer = io.BytesIO()
    # Level 1 compresses these flat-coloured plots nearly as well as the default 6, several times faster.
    figure.savefig(buffer, format="png", pil_kwargs={"compress_level": 1})
    return buffer.getvalue()
