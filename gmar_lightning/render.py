"""Turn explanations and head-importance trajectories into image tensors and matplotlib figures.

Figures are built as `matplotlib.figure.Figure` objects drawn by the Agg canvas, never through
``pyplot``: no global figure registry, no GUI backend, safe in dataloader workers and headless jobs. Such a
figure is freed by garbage collection once the last reference goes; there is no ``plt.close`` to forget.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

from gmar_lightning._checks import check_positive_int
from gmar_lightning.naflex import NaFlexBatch
from gmar_lightning.trajectory import HeadTrajectory

__all__ = [
    "CARD_PIXELS",
    "DEFAULT_ALPHA",
    "DEFAULT_CMAP",
    "MODES",
    "SUMMARY_BOUNDS",
    "check_overlay_style",
    "clip_outliers",
    "denormalize",
    "evenly_spaced",
    "evolution_figure",
    "evolution_page_images",
    "evolution_pages",
    "explanation_figure",
    "figure_to_array",
    "figure_to_png_bytes",
    "head_heatmap_figure",
    "image_to_array",
    "image_to_png_bytes",
    "layer_trajectory_figure",
    "layer_trajectory_images",
    "line_colours",
    "literal",
    "methods_figure",
    "naflex_display",
    "overlay",
    "overlay_grid_figure",
    "overlay_grid_image",
    "overlay_page_images",
    "overlay_pages",
    "specialisation_figure",
    "specialisation_images",
    "trajectory_figure",
    "visualize",
]

DEFAULT_CMAP = "inferno"
"""Colour map of saliency overlays: perceptually uniform, so equal steps in saliency look like equal steps in colour,
and dark where the map is low, so the salient parts stand out (jet's bright cyan band invents edges)."""

DEFAULT_ALPHA = 0.5
"""Opacity of the colour-mapped saliency over the image (grad-cam's ``image_weight`` is ``1 - alpha``)."""

MODES: tuple[str, ...] = ("blended", "masked", "heat_map")
"""How a map is drawn on its image: ``blended`` mixes the colour-mapped map over the image (``alpha`` its weight),
``masked`` multiplies the image by the map (only what the map keeps stays visible), ``heat_map`` shows the
colour-mapped map alone; after Captum's ``blended_heat_map``, ``masked_image`` and ``heat_map``."""

CARD_PIXELS: tuple[int, int] = (372, 215)
"""Width and height in screen pixels that TensorBoard's Time Series tab draws an image card's picture in, at a
1400 px wide browser window with its default card width; a logged image no larger than this is shown unscaled
(measured with headless Chromium, ``benchmarks/tensorboard_screenshots.py``)."""


def literal(text: str) -> str:
    """``text`` as matplotlib should draw it: literally, never as mathtext.

    Matplotlib reads text between two ``$`` as math, so a class named ``"US$ 1 or CA$ 2"`` would lose its dollars
    and ``"$\\frac$"`` would fail to draw at all. Every ``$`` is escaped; matplotlib draws ``\\$`` as ``$``. Every
    string a figure here draws goes through this.

    Examples:
        >>> literal("US$ 1 or CA$ 2")
        'US\\\\$ 1 or CA\\\\$ 2'
    """
    return str(text).replace("$", r"\$")


_DPI = 100
# Text is at least 10 pt at the logged size (about 14 px at 100 dpi); titles one point larger.
_FONT_SIZE = 10
_TITLE_FONT_SIZE = 11
_TILE_INCHES = 1.8
# Tiles of card-sized pages: two overlays with captions, or two rows of four evaluations, fit one TensorBoard card.
_CARD_TILE_PIXELS = 150
_CARD_EVOLUTION_TILE_PIXELS = 75
_COLORBAR_INCHES = (0.15, 0.75)  # bar width and the room for its tick labels and label
# Level 1 compresses these flat-coloured figures nearly as well as the default 6, several times faster.
_PNG_COMPRESS_LEVEL = 1


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


def naflex_display(
    batch: Mapping[str, Tensor],
    patch_size: tuple[int, int],
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> list[Tensor]:
    """Each image of a NaFlex batch (timm's or transformers' dict), rebuilt from its valid patches on its own grid and
    mapped back to displayable ``[0, 1]`` like [`denormalize`][gmar_lightning.render.denormalize].

    Args:
        batch: A NaFlex dict in either spelling (see [`gmar_lightning.naflex`][gmar_lightning.naflex]).
        patch_size: ``(Ph, Pw)`` pixels per patch.
        mean: Per-channel normalisation mean (``None``: per-image min-max).
        std: Per-channel normalisation std.

    Returns:
        One ``[1, C, h * Ph, w * Pw]`` float32 image per batch image, at its own size and aspect ratio.
    """
    return [denormalize(image[None], mean, std) for image in NaFlexBatch.from_dict(batch).images(patch_size)]


def check_overlay_style(cmap: str, alpha: float, mode: str = "blended", outlier_percentile: float = 0.0) -> None:
    """Raise a one-line ``ValueError`` unless the display options are valid.

    ``cmap`` must name a matplotlib colour map, ``alpha`` be in ``[0, 1]``, ``mode`` one of
    [`MODES`][gmar_lightning.render.MODES] and ``outlier_percentile`` in ``[0, 100)``.

    Examples:
        >>> check_overlay_style("viridis", 0.4, "masked", 2.0)
        >>> check_overlay_style("viridis", 2)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be a number in [0, 1], got 2.
    """
    _colormap(cmap)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}.")
    if (
        isinstance(outlier_percentile, bool)
        or not isinstance(outlier_percentile, int | float)
        or not 0.0 <= outlier_percentile < 100.0
    ):
        raise ValueError(f"`outlier_percentile` must be a number in [0, 100), got {outlier_percentile!r}.")


def clip_outliers(maps: Tensor, percentile: float) -> Tensor:
    """Rescale each map so its top ``percentile`` % of values saturate at 1, like Captum's ``outlier_perc``.

    A few very bright patches (often one high-norm token) otherwise squeeze everything else into the dark end of the
    colour map. ``0`` leaves the maps unchanged.

    Args:
        maps: ``[B, H, W]`` maps in ``[0, 1]``; ``NaN`` (outside what the model saw) stays ``NaN``.
        percentile: How much of each map (in percent of its defined values) to saturate, in ``[0, 100)``.

    Returns:
        ``[B, H, W]`` maps in ``[0, 1]``.

    Examples:
        >>> clip_outliers(torch.tensor([[[0.1, 0.2], [0.4, 1.0]]]), 25.0)  # the 75th percentile, 0.55, becomes 1
        tensor([[[0.1818, 0.3636],
                 [0.7273, 1.0000]]])
    """
    check_overlay_style(DEFAULT_CMAP, DEFAULT_ALPHA, outlier_percentile=percentile)
    if percentile == 0:
        return maps
    values = maps.detach().float()
    threshold = torch.stack([row[~row.isnan()].quantile(1.0 - percentile / 100.0) if (~row.isnan()).any()
                             else row.new_ones(()) for row in values.flatten(1)])  # fmt: skip
    scale = threshold.clamp_min(torch.finfo(torch.float32).tiny).view(-1, *([1] * (values.ndim - 1)))
    return (values / scale).clamp(0.0, 1.0)


def _colormap(cmap: str) -> matplotlib.colors.Colormap:
    try:
        return matplotlib.colormaps[cmap]
    except (KeyError, TypeError):
        raise ValueError(
            f"`cmap` must be a matplotlib colormap name such as 'inferno', 'viridis' or 'jet', got {cmap!r}."
        ) from None


def _colormap_table(cmap: str, device: torch.device) -> Tensor:
    """The colormap's 256 RGB entries as a ``[256, 3]`` tensor, so colouring a batch is one gather."""
    colormap = _colormap(cmap)
    table = colormap(np.linspace(0.0, 1.0, min(colormap.N, 256)))[:, :3]
    return torch.as_tensor(table, dtype=torch.float32, device=device)


def overlay(
    images: Tensor,
    maps: Tensor,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> Tensor:
    """Draw saliency maps on images: ``blended`` is ``(1 - alpha) * image + alpha * cmap(map)``.

    Args:
        images: ``[B, 3, H, W]`` (or single-channel ``[B, 1, H, W]``) images in ``[0, 1]``, e.g. from
            [`denormalize`][gmar_lightning.render.denormalize].
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]`` (``Explanation.maps``); values outside are clamped.
        cmap: A matplotlib colour map name (unused by ``masked``).
        alpha: Weight of the map in ``blended`` mode, in ``[0, 1]``.
        mode: One of [`MODES`][gmar_lightning.render.MODES]: ``blended``, ``masked`` (``image * map``) or
            ``heat_map`` (the colour-mapped map alone).
        outlier_percentile: Saturate each map's top ``outlier_percentile`` % first (see
            [`clip_outliers`][gmar_lightning.render.clip_outliers]).

    Returns:
        ``[B, 3, H, W]`` float32 tensor in ``[0, 1]`` on the images' device.

    Examples:
        >>> blended = overlay(torch.ones(2, 3, 4, 4), torch.zeros(2, 4, 4), cmap="gray", alpha=0.5)
        >>> tuple(blended.shape), blended.unique().tolist()
        ((2, 3, 4, 4), [0.5])
        >>> overlay(torch.ones(1, 3, 1, 2), torch.tensor([[[0.0, 0.5]]]), mode="masked")[0, 0]
        tensor([[0.0000, 0.5000]])
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
    check_overlay_style(cmap, alpha, mode, outlier_percentile)
    levels = clip_outliers(maps.detach().to(images.device, torch.float32), outlier_percentile)
    levels = levels.nan_to_num(0.0).clamp(0.0, 1.0)
    base = images.detach().float().clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    if mode == "masked":
        return base * levels.unsqueeze(1)
    table = _colormap_table(cmap, images.device)
    colours = table[(levels * (table.shape[0] - 1)).round().long()].permute(0, 3, 1, 2)
    if mode == "heat_map":
        return colours
    return ((1.0 - alpha) * base + alpha * colours).clamp(0.0, 1.0)


def _select(images: Tensor, maps: Tensor, max_images: int) -> tuple[Tensor, Tensor]:
    check_positive_int("max_images", max_images)
    return images[:max_images], maps[:max_images]


def _grid_columns(count: int) -> int:
    return math.ceil(math.sqrt(count))


def overlay_grid_image(
    images: Tensor,
    maps: Tensor,
    max_images: int = 16,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    padding: int = 2,
) -> Tensor:
    """Overlays of the first ``max_images`` images tiled into one near-square image, for ``add_image``.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]``.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]``.
        max_images: How many images to show at most.
        cmap: A matplotlib colour map name.
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


def _add_colorbar(figure: Figure, cmap: str, bottom: float, height: float, label: str = "saliency") -> None:
    """A vertical colour bar for maps in ``[0, 1]`` at the figure's right edge; ``bottom``/``height`` in inches."""
    width, figure_height = figure.get_size_inches()
    bar_width, label_room = _COLORBAR_INCHES
    axes = figure.add_axes(
        (1 - (bar_width + label_room) / width, bottom / figure_height, bar_width / width, height / figure_height)
    )
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap(cmap))
    colorbar = figure.colorbar(mappable, cax=axes, ticks=(0.0, 0.5, 1.0))
    colorbar.set_label(label, fontsize=_FONT_SIZE)
    axes.tick_params(labelsize=_FONT_SIZE)


def _draw_tiles(
    figure: Figure,
    tiles: Tensor,
    columns: int,
    captions: Sequence[Sequence[str]] | None,
    colours: Sequence[str] | None,
    right: float,
    header: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    left: float = 0.0,
    top: float = 0.0,
) -> None:
    """Tiles ``[N, 3, h, w]`` row-major in one axes, with up to two caption lines above each tile.

    One image in one axes is much faster than one axes per tile. ``header`` are column titles above the first row,
    ``row_labels`` text left of each row; ``left``/``right``/``top`` reserve that many inches at the figure's edges.
    """
    axes = _tile_axes(figure, left, right, top)
    _fill_tiles(axes, tiles, columns, captions, colours, figure.get_size_inches()[0] - left - right, header, row_labels)


def _tile_axes(figure: Figure, left: float, right: float, top: float) -> Axes:
    """The axes `_fill_tiles` draws into, leaving ``left``/``right``/``top`` inches free at the figure's edges."""
    figure_width, figure_height = figure.get_size_inches()
    axes = figure.add_axes((left / figure_width, 0.0, 1 - (left + right) / figure_width, 1 - top / figure_height))
    axes.set_axis_off()
    return axes


def _caption_lines(captions: Sequence[Sequence[str]] | None) -> int:
    return max((len(caption) for caption in captions), default=0) if captions else 0


def _fill_tiles(
    axes: Axes,
    tiles: Tensor,
    columns: int,
    captions: Sequence[Sequence[str]] | None,
    colours: Sequence[str] | None,
    inches_wide: float,
    header: Sequence[str] = (),
    row_labels: Sequence[str] = (),
) -> list[Artist]:
    """The tiles as one image in ``axes`` (``inches_wide`` wide) with their captions, header and row labels.

    Returns:
        The artists added, the image first and then the texts: the order a draw of the axes paints them in.
    """
    count, (height, width) = tiles.shape[0], tiles.shape[2:]
    rows = math.ceil(count / columns)
    padding = _tile_padding(width)
    inches_per_pixel = inches_wide / (columns * width + (columns + 1) * padding)
    lines = _caption_lines(captions)
    caption_band = math.ceil(lines * 1.35 * _FONT_SIZE / 72 / inches_per_pixel) if lines else 0
    header_band = math.ceil(1.6 * _TITLE_FONT_SIZE / 72 / inches_per_pixel) if header else 0
    cell_height, cell_width = height + caption_band + padding, width + padding
    # NumPy, not torch: small tensor ops cost milliseconds each on a busy machine (thread start-up).
    pixels = tiles.permute(0, 2, 3, 1).numpy()
    canvas = np.ones((header_band + rows * cell_height + padding, columns * cell_width + padding, 3), np.float32)
    texts = []
    for index in range(count):
        top = header_band + (index // columns) * cell_height + padding + caption_band
        left_pixel = (index % columns) * cell_width + padding
        canvas[top : top + height, left_pixel : left_pixel + width] = pixels[index]
        for line, text in enumerate(captions[index] if captions else ()):
            texts.append(axes.text(
                left_pixel + width / 2,
                top - caption_band + (line + 0.5) * caption_band / lines,
                literal(text),
                ha="center",
                va="center",
                fontsize=_FONT_SIZE,
                color=colours[index] if colours else "black",
            ))  # fmt: skip
    for column, text in enumerate(header):
        texts.append(axes.text(column * cell_width + padding + width / 2, header_band / 2, literal(text), ha="center",
                               va="center", fontsize=_FONT_SIZE, fontweight="bold"))  # fmt: skip
    for row, text in enumerate(row_labels):
        texts.append(axes.text(-padding, header_band + row * cell_height + padding + caption_band + height / 2,
                               literal(text), ha="right", va="center", fontsize=_FONT_SIZE))  # fmt: skip
    image = axes.imshow(canvas, interpolation="nearest", aspect="auto")
    return [image, *texts]


def _tile_padding(width: int) -> int:
    return max(1, round(0.05 * width / _TILE_INCHES))


def _canvas_inches(
    count: int, columns: int, tile: Tensor, lines: int, header: bool = False, tile_inches: float = _TILE_INCHES
) -> tuple[float, float]:
    """Width and height in inches of tiles drawn by `_draw_tiles`, ``tile_inches`` wide each."""
    height, width = tile.shape[-2:]
    rows = math.ceil(count / columns)
    inches_per_pixel = tile_inches / width
    padding = _tile_padding(width)
    caption = math.ceil(lines * 1.35 * _FONT_SIZE / 72 / inches_per_pixel) if lines else 0
    header_band = math.ceil(1.6 * _TITLE_FONT_SIZE / 72 / inches_per_pixel) if header else 0
    pixels_wide = columns * (width + padding) + padding
    pixels_high = header_band + rows * (height + caption + padding) + padding
    return pixels_wide * inches_per_pixel, pixels_high * inches_per_pixel


def overlay_grid_figure(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[str] | None = None,
    predictions: Sequence[str] | None = None,
    max_images: int = 16,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    probabilities: Sequence[float] | None = None,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> Figure:
    """A captioned grid of overlays with a colour bar: each tile titled ``"true: <label>"`` / ``"pred: <prediction>"``.

    A caption is green when the prediction matches the label and red otherwise; with ``probabilities`` the predicted
    class's probability follows its name. Captions are 10 pt at the logged size.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]``.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]``.
        labels: True class names, one per image (at least the shown ones); ``None`` leaves them out.
        predictions: Predicted class names, likewise.
        max_images: How many images to show at most.
        cmap: A matplotlib colour map name.
        alpha: Opacity of the map.
        probabilities: The predicted class's probability per image, likewise.
        mode: One of [`MODES`][gmar_lightning.render.MODES].
        outlier_percentile: Saturate each map's top percent first.

    Returns:
        A figure with two axes: the tiles and the colour bar.

    Examples:
        >>> figure = overlay_grid_figure(torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), ["cat", "dog"], ["cat", "cat"])
        >>> len(figure.axes), [text.get_text() for text in figure.axes[0].texts]
        (2, ['true: cat', 'pred: cat', 'true: dog', 'pred: cat'])
    """
    _check_images(images)
    images, maps = _select(images, maps, max_images)
    count = images.shape[0]
    captions, colours = _overlay_captions(
        _check_names("labels", labels, count), _check_names("predictions", predictions, count), probabilities, count
    )
    tiles = overlay(images, maps, cmap, alpha, mode, outlier_percentile).cpu()
    columns = _grid_columns(count)
    lines = len(captions[0]) if captions else 0
    width, height = _canvas_inches(count, columns, tiles[0], lines)
    colorbar_width = sum(_COLORBAR_INCHES) + 0.1
    figure = Figure(figsize=(width + colorbar_width, height), dpi=_DPI)
    _draw_tiles(figure, tiles, columns, captions, colours, right=colorbar_width)
    _add_colorbar(figure, "gray" if mode == "masked" else cmap, bottom=0.15 * height, height=0.7 * height,
                  label=_colorbar_label(mode))  # fmt: skip
    return figure


def _overlay_captions(
    labels: list[str] | None,
    predictions: list[str] | None,
    probabilities: Sequence[float] | None,
    count: int,
) -> tuple[list[list[str]] | None, list[str] | None]:
    """Per image ``["true: <label>", "pred: <prediction> <p>%"]`` and its colour: green right, red wrong."""
    if probabilities is not None and (isinstance(probabilities, str) or len(probabilities) < count):
        raise ValueError(f"`probabilities` must hold one number per shown image ({count}), got {probabilities!r}.")
    if labels is None and predictions is None:
        return None, None
    captions, colours = [], []
    for index in range(count):
        lines = []
        if labels is not None:
            lines.append(f"true: {labels[index]}")
        if predictions is not None:
            probability = f" {float(probabilities[index]):.0%}" if probabilities is not None else ""
            lines.append(f"pred: {predictions[index]}{probability}")
        captions.append(lines)
        right = labels is not None and predictions is not None and labels[index] == predictions[index]
        colours.append("black" if labels is None or predictions is None else ("green" if right else "red"))
    return captions, colours


def _resized(tiles: Tensor, side: int) -> Tensor:
    """Tiles scaled so their longer side is ``side`` pixels: a card page draws them 1:1, never resampled again."""
    height, width = tiles.shape[-2:]
    size = (max(1, round(height * side / max(height, width))), max(1, round(width * side / max(height, width))))
    if size == (height, width):
        return tiles
    return torch.nn.functional.interpolate(tiles, size=size, mode="bilinear", antialias=True, align_corners=False)


def _colorbar_label(mode: str) -> str:
    return "saliency (brightness)" if mode == "masked" else "saliency"


# One page of `_tile_page`: its tiles, their captions and caption colours, and its row labels.
_Page = tuple[Tensor, Sequence[Sequence[str]] | None, Sequence[str] | None, Sequence[str]]


def _tile_page_frame(
    tiles: Tensor,
    columns: int,
    captions: Sequence[Sequence[str]] | None,
    title: str | None,
    cmap: str,
    mode: str,
    header: bool,
    row_labels: bool,
) -> tuple[Figure, Axes, float]:
    """A `_tile_page` figure without its tiles and texts: the title, the colour bar and the empty tile axes, with the
    width in inches of that axes."""
    width, height = _canvas_inches(
        tiles.shape[0], columns, tiles[0], _caption_lines(captions), header=header, tile_inches=tiles.shape[-1] / _DPI
    )
    row_label_width = 0.6 if row_labels else 0.0
    colorbar_width = sum(_COLORBAR_INCHES) + 0.1
    title_height = 0.3 if title else 0.0
    figure = Figure(figsize=(row_label_width + width + colorbar_width, height + title_height), dpi=_DPI)
    if title:
        figure.suptitle(literal(title), fontsize=_TITLE_FONT_SIZE, y=1 - 0.04 / (height + title_height), va="top")
    axes = _tile_axes(figure, row_label_width, colorbar_width, title_height)
    _add_colorbar(figure, "gray" if mode == "masked" else cmap, bottom=0.1 * height, height=0.8 * height,
                  label=_colorbar_label(mode))  # fmt: skip
    return figure, axes, figure.get_size_inches()[0] - row_label_width - colorbar_width


def _tile_page(
    tiles: Tensor,
    columns: int,
    captions: Sequence[Sequence[str]] | None,
    colours: Sequence[str] | None,
    title: str | None,
    cmap: str,
    mode: str,
    header: Sequence[str] = (),
    row_labels: Sequence[str] = (),
) -> Figure:
    """Tiles drawn 1:1 at ``_DPI`` with their captions, an optional title and a labelled colour bar."""
    figure, axes, inches_wide = _tile_page_frame(tiles, columns, captions, title, cmap, mode, bool(header),
                                                 bool(row_labels))  # fmt: skip
    _fill_tiles(axes, tiles, columns, captions, colours, inches_wide, header, row_labels)
    return figure


def _tile_page_images(
    pages: Sequence[_Page], columns: int, title: str | None, cmap: str, mode: str, header: Sequence[str] = ()
) -> list[np.ndarray]:
    """``figure_to_array(_tile_page(...))`` of each page, pixel for pixel, for a fraction of the cost.

    Creating and drawing a whole figure per page (title, colour bar, their text) cost most of an evaluation's
    rendering. Pages of one layout share all of that: it is drawn once, its pixels are kept (Agg's
    ``copy_from_bbox``), and each page puts them back and draws only its own image and texts over them, in the order
    a full draw paints them; they cover nothing of the shared part, so the pixels are those of a full draw.
    """
    images: list[np.ndarray] = []
    layout, artists = None, []
    for tiles, captions, colours, row_labels in pages:
        page_layout = (math.ceil(tiles.shape[0] / columns), _caption_lines(captions), bool(row_labels))
        if page_layout != layout:
            layout = page_layout
            figure, axes, inches_wide = _tile_page_frame(tiles, columns, captions, title, cmap, mode, bool(header),
                                                         bool(row_labels))  # fmt: skip
            canvas = FigureCanvasAgg(figure)
            canvas.draw()
            frame = canvas.copy_from_bbox(figure.bbox)
        else:
            canvas.restore_region(frame)
            for artist in artists:
                artist.remove()
        artists = _fill_tiles(axes, tiles, columns, captions, colours, inches_wide, header, row_labels)
        for artist in artists:
            figure.draw_artist(artist)
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images


def overlay_pages(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[str] | None = None,
    predictions: Sequence[str] | None = None,
    probabilities: Sequence[float] | None = None,
    max_images: int = 16,
    per_page: int = 2,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> list[Figure]:
    """Captioned overlays in pages small enough for a TensorBoard card: ``per_page`` images in a row each.

    Each page draws its images 150 px wide with 10 pt captions (``"true: <label>"`` / ``"pred: <prediction> p%"``,
    green when right, red when wrong), an optional title and a labelled colour bar, about 412 x 230 px in all: a
    TensorBoard Time Series card shows it at 0.90 of that size (see
    [`CARD_PIXELS`][gmar_lightning.render.CARD_PIXELS]), so captions are 12.5 screen pixels tall unexpanded.

    Args:
        images: ``[B, 3, H, W]`` images in ``[0, 1]``.
        maps: ``[B, H, W]`` saliency maps in ``[0, 1]``.
        labels: True class names, one per image (at least the shown ones); ``None`` leaves them out.
        predictions: Predicted class names, likewise.
        probabilities: The predicted class's probability per image, likewise.
        max_images: How many images to show at most, over all pages.
        per_page: Images per page.
        title: Text above each page, e.g. the method and what its map shows.
        cmap: A matplotlib colour map name.
        alpha: Weight of the map (``blended`` mode).
        mode: One of [`MODES`][gmar_lightning.render.MODES].
        outlier_percentile: Saturate each map's top percent first.

    Returns:
        One figure per page, images ``1..per_page`` first.

    Examples:
        >>> pages = overlay_pages(torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8), ["cat"] * 3, ["cat", "dog", "cat"])
        >>> len(pages), [text.get_text() for text in pages[0].axes[0].texts]
        (2, ['true: cat', 'pred: cat', 'true: cat', 'pred: dog'])
    """
    pages = _overlay_page_list(images, maps, labels, predictions, probabilities, max_images, per_page, cmap, alpha,
                               mode, outlier_percentile)  # fmt: skip
    return [_tile_page(tiles, per_page, captions, colours, title, cmap, mode) for tiles, captions, colours, _ in pages]


def overlay_page_images(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[str] | None = None,
    predictions: Sequence[str] | None = None,
    probabilities: Sequence[float] | None = None,
    max_images: int = 16,
    per_page: int = 2,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> list[np.ndarray]:
    """The pages of [`overlay_pages`][gmar_lightning.render.overlay_pages] as ``[H, W, 3]`` uint8 arrays, the pixels
    [`figure_to_array`][gmar_lightning.render.figure_to_array] gives of each of its figures, drawn several times
    faster: the title and the colour bar, the same on every page, are drawn once.

    Arguments as for [`overlay_pages`][gmar_lightning.render.overlay_pages].

    Examples:
        >>> pages = overlay_page_images(torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8), ["cat"] * 3, ["cat", "dog", "cat"])
        >>> len(pages), pages[0].dtype
        (2, dtype('uint8'))
    """
    pages = _overlay_page_list(images, maps, labels, predictions, probabilities, max_images, per_page, cmap, alpha,
                               mode, outlier_percentile)  # fmt: skip
    return _tile_page_images(pages, per_page, title, cmap, mode)


def _overlay_page_list(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[str] | None,
    predictions: Sequence[str] | None,
    probabilities: Sequence[float] | None,
    max_images: int,
    per_page: int,
    cmap: str,
    alpha: float,
    mode: str,
    outlier_percentile: float,
) -> list[_Page]:
    _check_images(images)
    check_positive_int("per_page", per_page)
    images, maps = _select(images, maps, max_images)
    count = images.shape[0]
    captions, colours = _overlay_captions(
        _check_names("labels", labels, count), _check_names("predictions", predictions, count), probabilities, count
    )
    tiles = _resized(overlay(images, maps, cmap, alpha, mode, outlier_percentile).cpu(), _CARD_TILE_PIXELS)
    return [
        (
            tiles[start : start + per_page],
            captions[start : start + per_page] if captions else None,
            colours[start : start + per_page] if colours else None,
            (),
        )
        for start in range(0, count, per_page)
    ]


def evenly_spaced(count: int, most: int) -> list[int]:
    """At most ``most`` indices into ``range(count)``, evenly spread, always with the first and the last.

    Examples:
        >>> evenly_spaced(16, 6)
        [0, 3, 6, 9, 12, 15]
        >>> evenly_spaced(3, 6), evenly_spaced(5, 2), evenly_spaced(1, 6)
        ([0, 1, 2], [0, 4], [0])
    """
    if isinstance(most, bool) or not isinstance(most, int) or most < 1:
        raise ValueError(f"`most` must be a positive integer, got {most!r}.")
    if count <= most:
        return list(range(count))
    if most == 1:
        return [count - 1]
    return sorted({round(index * (count - 1) / (most - 1)) for index in range(most)})


def evolution_figure(
    images: Tensor,
    maps: Tensor,
    epochs: Sequence[int],
    max_columns: int = 5,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    title: str | None = None,
) -> Figure:
    """How the maps of a few probe images evolved: images in rows, evaluations in columns.

    With more evaluations than ``max_columns`` an evenly spaced subset is shown (see
    [`evenly_spaced`][gmar_lightning.render.evenly_spaced]); the first and the latest are always in it.

    Args:
        images: ``[R, 3, H, W]`` images in ``[0, 1]``, one per row.
        maps: ``[E, R, h, w]`` maps in ``[0, 1]`` of the ``E`` evaluations so far; resized to the image size.
        epochs: The epoch of each evaluation, for the column titles.
        max_columns: Most evaluations shown.
        cmap: A matplotlib colour map name.
        alpha: Opacity of the map.
        title: Figure title; none by default.

    Returns:
        A figure with two axes: the tiles and the colour bar.

    Examples:
        >>> figure = evolution_figure(torch.rand(2, 3, 8, 8), torch.rand(10, 2, 4, 4), list(range(10)), max_columns=3)
        >>> [text.get_text() for text in figure.axes[0].texts]
        ['epoch 0', 'epoch 4', 'epoch 9', 'image 1', 'image 2']
    """
    shown, tiles = _evolution_tiles(images, maps, epochs, max_columns, cmap, alpha, "blended", 0.0)
    rows, columns = images.shape[0], len(shown)
    width, height = _canvas_inches(rows * columns, columns, tiles[0], lines=0, header=True, tile_inches=1.2)
    row_label_width = 0.75
    colorbar_width = sum(_COLORBAR_INCHES) + 0.1
    title_height = 0.35 if title else 0.0
    figure = Figure(figsize=(row_label_width + width + colorbar_width, height + title_height), dpi=_DPI)
    if title:
        figure.suptitle(literal(title), fontsize=_TITLE_FONT_SIZE, y=1 - 0.05 / (height + title_height))
    _draw_tiles(
        figure,
        tiles,
        columns,
        captions=None,
        colours=None,
        right=colorbar_width,
        header=[f"epoch {epochs[index]}" for index in shown],
        row_labels=[f"image {row + 1}" for row in range(rows)],
        left=row_label_width,
        top=title_height,
    )
    _add_colorbar(figure, cmap, bottom=0.15 * height, height=0.7 * height)
    return figure


def evolution_pages(
    images: Tensor,
    maps: Tensor,
    epochs: Sequence[int],
    rows_per_page: int = 2,
    max_columns: int = 4,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> list[Figure]:
    """[`evolution_figure`][gmar_lightning.render.evolution_figure] in pages that fit a TensorBoard card.

    Each page holds ``rows_per_page`` images (rows) at up to ``max_columns`` evaluations (columns, evenly spaced,
    always the first and the latest), tiles 75 px wide with 10 pt headings and a labelled colour bar.

    Examples:
        >>> pages = evolution_pages(torch.rand(3, 3, 8, 8), torch.rand(6, 3, 4, 4), list(range(6)))
        >>> len(pages), [text.get_text() for text in pages[1].axes[0].texts]
        (2, ['epoch 0', 'epoch 2', 'epoch 3', 'epoch 5', 'image 3'])
    """
    header, pages = _evolution_page_list(images, maps, epochs, rows_per_page, max_columns, cmap, alpha, mode,
                                         outlier_percentile)  # fmt: skip
    columns = len(header)
    return [_tile_page(tiles, columns, None, None, None, cmap, mode, header, labels) for tiles, _, _, labels in pages]


def evolution_page_images(
    images: Tensor,
    maps: Tensor,
    epochs: Sequence[int],
    rows_per_page: int = 2,
    max_columns: int = 4,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
    first_image: int = 1,
) -> list[np.ndarray]:
    """The pages of [`evolution_pages`][gmar_lightning.render.evolution_pages] as ``[H, W, 3]`` uint8 arrays, the
    pixels [`figure_to_array`][gmar_lightning.render.figure_to_array] gives of each of its figures, drawn faster: the
    colour bar, the same on every page, is drawn once.

    Arguments as for [`evolution_pages`][gmar_lightning.render.evolution_pages], and ``first_image``: the number the
    first row is labelled with (``image 1``, ...), for images drawn apart from those before them.

    Examples:
        >>> pages = evolution_page_images(torch.rand(3, 3, 8, 8), torch.rand(6, 3, 4, 4), list(range(6)))
        >>> len(pages), pages[0].dtype
        (2, dtype('uint8'))
    """
    header, pages = _evolution_page_list(images, maps, epochs, rows_per_page, max_columns, cmap, alpha, mode,
                                         outlier_percentile, first_image)  # fmt: skip
    return _tile_page_images(pages, len(header), None, cmap, mode, header)


def _evolution_page_list(
    images: Tensor,
    maps: Tensor,
    epochs: Sequence[int],
    rows_per_page: int,
    max_columns: int,
    cmap: str,
    alpha: float,
    mode: str,
    outlier_percentile: float,
    first_image: int = 1,
) -> tuple[list[str], list[_Page]]:
    """The column headings (the shown evaluations) and the pages of `evolution_pages`."""
    check_positive_int("rows_per_page", rows_per_page)
    shown, tiles = _evolution_tiles(images, maps, epochs, max_columns, cmap, alpha, mode, outlier_percentile)
    rows, columns = images.shape[0], len(shown)
    tiles = _resized(tiles, _CARD_EVOLUTION_TILE_PIXELS)
    pages: list[_Page] = [
        (
            tiles[first * columns : (first + rows_per_page) * columns],
            None,
            None,
            [f"image {row + first_image}" for row in range(first, min(first + rows_per_page, rows))],
        )
        for first in range(0, rows, rows_per_page)
    ]
    return [f"epoch {epochs[index]}" for index in shown], pages


def _evolution_tiles(
    images: Tensor,
    maps: Tensor,
    epochs: Sequence[int],
    max_columns: int,
    cmap: str,
    alpha: float,
    mode: str,
    outlier_percentile: float,
) -> tuple[list[int], Tensor]:
    """The shown evaluations and the row-major overlay tiles: row r holds image r at each shown evaluation."""
    _check_images(images)
    if not isinstance(maps, Tensor) or maps.ndim != 4 or maps.shape[1] != images.shape[0] or maps.shape[0] == 0:
        shape = list(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"`maps` must have shape [E, {images.shape[0]}, h, w] with E >= 1, got {shape}.")
    if len(epochs) != maps.shape[0]:
        raise ValueError(f"`epochs` must hold one epoch per evaluation ({maps.shape[0]}), got {len(epochs)}.")
    shown = evenly_spaced(maps.shape[0], max_columns)
    rows, columns = images.shape[0], len(shown)
    resized = torch.nn.functional.interpolate(
        maps[shown].float().flatten(0, 1).unsqueeze(1), size=images.shape[2:], mode="bilinear", align_corners=False
    ).view(columns, rows, *images.shape[2:])
    # One overlay call for all tiles (each map is drawn, and its outliers clipped, on its own).
    tiles = overlay(images.repeat_interleave(columns, dim=0), resized.transpose(0, 1).flatten(0, 1), cmap, alpha,
                    mode, outlier_percentile)  # fmt: skip
    return shown, tiles


def _full_resolution_overlay(
    image: Tensor, saliency: Tensor, cmap: str, alpha: float, mode: str = "blended", outlier_percentile: float = 0.0
) -> np.ndarray:
    """``[H, W, 3]`` overlay where ``saliency`` is defined; outside it (NaN) the image is washed out towards gray."""
    covered = ~torch.isnan(saliency)
    clipped = clip_outliers(saliency[None], outlier_percentile).nan_to_num(0.0)
    blended = overlay(image[None], clipped, cmap=cmap, alpha=alpha, mode=mode)[0]
    washed = 0.4 * image.expand(3, -1, -1) + 0.6 * 0.5
    return torch.where(covered, blended, washed).permute(1, 2, 0).numpy()


def _check_saliency(image: Tensor, saliency: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"`image` must be a [3, H, W] tensor in [0, 1], got {shape}.")
    if not isinstance(saliency, Tensor) or tuple(saliency.shape) != tuple(image.shape[1:]):
        shape = list(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
        raise ValueError(f"`saliency` must have the image's shape {list(image.shape[1:])}, got {shape}.")


def explanation_figure(
    image: Tensor,
    saliency: Tensor,
    caption: str,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    box: tuple[float, float, float, float] | None = None,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> Figure:
    """One image at its own resolution with its map overlaid, a caption above and a colour bar on the right.

    The image area of the figure is exactly ``W x H`` pixels at the figure's dpi; text grows with the image (at
    least 10 pt) so it stays readable on large photographs.

    Args:
        image: ``[3, H, W]`` image in ``[0, 1]``.
        saliency: ``[H, W]`` map in ``[0, 1]``; ``NaN`` where the model did not see the image (outside its crop),
            which is shown washed out.
        caption: Text above the image, e.g. the method and the predicted class with its probability.
        cmap: A matplotlib colour map name.
        alpha: Opacity of the map.
        box: ``(left, top, right, bottom)`` in pixels of the region the model saw, outlined when given.
        mode: One of [`MODES`][gmar_lightning.render.MODES].
        outlier_percentile: Saturate the map's top percent first.

    Returns:
        A figure with two axes: the image and the colour bar.

    Examples:
        >>> figure = explanation_figure(torch.rand(3, 30, 40), torch.rand(30, 40), "gmar_l1: cat (91%)")
        >>> image_axes = figure.axes[0]
        >>> [round(size) for size in image_axes.get_window_extent().size], image_axes.get_title()
        ([40, 30], 'gmar_l1: cat (91%)')
    """
    _check_saliency(image, saliency)
    height, width = image.shape[1:]
    scale = max(1.0, width / 450)
    font = _FONT_SIZE * scale
    caption_height = 2.0 * font / 72
    bar_width, label_room = (value * scale for value in _COLORBAR_INCHES)
    right = bar_width + label_room + 0.15 * scale
    image_width, image_height = width / _DPI, height / _DPI
    figure = Figure(figsize=(image_width + right, image_height + caption_height), dpi=_DPI)
    total_width, total_height = figure.get_size_inches()
    axes = figure.add_axes((0.0, 0.0, image_width / total_width, image_height / total_height))
    axes.set_axis_off()
    style = (cmap, alpha, mode, outlier_percentile)
    pixels = _full_resolution_overlay(image.float().cpu(), saliency.float().cpu(), *style)
    axes.imshow(pixels, interpolation="nearest", aspect="auto")
    axes.set_title(literal(caption), fontsize=font, pad=0.4 * font)
    if box is not None:
        left, top, right_edge, bottom = box
        axes.add_patch(
            Rectangle((left - 0.5, top - 0.5), right_edge - left, bottom - top, fill=False, edgecolor="white",
                      linestyle="--", linewidth=scale)
        )  # fmt: skip
    bar = figure.add_axes(
        (1 - (bar_width + label_room) / total_width, 0.15 * image_height / total_height, bar_width / total_width,
         0.7 * image_height / total_height)
    )  # fmt: skip
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap("gray" if mode == "masked" else cmap))
    colorbar = figure.colorbar(mappable, cax=bar, ticks=(0, 1))
    colorbar.set_label(_colorbar_label(mode), fontsize=font)
    bar.tick_params(labelsize=font)
    return figure


def methods_figure(
    image: Tensor,
    saliency: dict[str, Tensor],
    title: str,
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    panel_pixels: int = 400,
    mode: str = "blended",
    outlier_percentile: float = 0.0,
) -> Figure:
    """The image and each method's map side by side, each panel at most ``panel_pixels`` wide or high.

    Args:
        image: ``[3, H, W]`` image in ``[0, 1]``.
        saliency: Method -> ``[H, W]`` map in ``[0, 1]`` (``NaN`` outside what the model saw).
        title: Figure title, e.g. the image name and the predicted class.
        cmap: A matplotlib colour map name.
        alpha: Opacity of the maps.
        panel_pixels: Longest side of each panel.
        mode: One of [`MODES`][gmar_lightning.render.MODES].
        outlier_percentile: Saturate each map's top percent first.

    Returns:
        A figure with one axes per panel (image first) and a colour bar.

    Examples:
        >>> maps = {"gmar_l1": torch.rand(30, 40), "rollout": torch.rand(30, 40)}
        >>> figure = methods_figure(torch.rand(3, 30, 40), maps, "photo.jpg: cat (91%)")
        >>> [axes.get_title() for axes in figure.axes]
        ['image', 'gmar_l1', 'rollout', '']
    """
    for values in saliency.values():
        _check_saliency(image, values)
    if not saliency:
        raise ValueError("`saliency` must hold at least one method's map.")
    height, width = image.shape[1:]
    shrink = panel_pixels / max(height, width)
    panel = (width * shrink / _DPI, height * shrink / _DPI)
    figure, grid = _panel_grid(1, len(saliency) + 1, panel, margins=(0.1, 1.1, 0.1, 0.75), gaps=(0.1, 0.0))
    figure.suptitle(literal(title), fontsize=_TITLE_FONT_SIZE)
    panels = [("image", image.float().permute(1, 2, 0).expand(-1, -1, 3).numpy())]
    panels += [(method, _full_resolution_overlay(image.float(), values.float(), cmap, alpha, mode, outlier_percentile))
               for method, values in saliency.items()]  # fmt: skip
    for axes, (name, pixels) in zip(grid[0], panels, strict=True):
        axes.imshow(pixels, interpolation="antialiased", aspect="auto")
        axes.set_title(literal(name), fontsize=_FONT_SIZE)
        axes.set_axis_off()
    _add_colorbar(figure, "gray" if mode == "masked" else cmap, bottom=0.1 + 0.15 * panel[1], height=0.7 * panel[1],
                  label=_colorbar_label(mode))  # fmt: skip
    return figure


def visualize(
    image: Tensor,
    saliency: Tensor,
    mode: str = "blended",
    cmap: str = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    outlier_percentile: float = 0.0,
    title: str | None = None,
    colorbar: bool = True,
    axes: Axes | None = None,
) -> tuple[Figure, Axes]:
    """Draw one map on its image and return the figure and axes for further composition, like Captum's
    ``visualize_image_attr``.

    Args:
        image: ``[3, H, W]`` (or ``[1, H, W]``) image in ``[0, 1]``, e.g. ``denormalize(images)[0]``.
        saliency: ``[H, W]`` map in ``[0, 1]``, e.g. ``Explanation.maps[0]``.
        mode: One of [`MODES`][gmar_lightning.render.MODES].
        cmap: A matplotlib colour map name.
        alpha: Weight of the map in ``blended`` mode.
        outlier_percentile: Saturate the map's top percent first.
        title: Axes title.
        colorbar: Add a colour bar labelled with what the colours mean.
        axes: Draw into these axes (of your own figure) instead of a new 4 x 4 inch figure.

    Returns:
        ``(figure, axes)``.

    Examples:
        >>> figure, axes = visualize(torch.rand(3, 16, 16), torch.rand(16, 16), mode="masked", title="gmar_l1")
        >>> axes.get_title(), len(figure.axes)
        ('gmar_l1', 2)
        >>> figure = Figure()
        >>> left, right = figure.subplots(1, 2)
        >>> _ = visualize(torch.rand(3, 8, 8), torch.rand(8, 8), axes=left, colorbar=False)
        >>> visualize(torch.rand(3, 8, 8), torch.rand(8, 8), mode="heat_map", axes=right)[1] is right
        True
    """
    _check_saliency(image, saliency)
    pixels = overlay(image[None].float().cpu(), saliency[None].float().cpu(), cmap, alpha, mode, outlier_percentile)
    if axes is None:
        figure = Figure(figsize=(4.0, 4.0), dpi=_DPI)
        axes = figure.add_subplot()
    figure = axes.get_figure()
    axes.imshow(pixels[0].permute(1, 2, 0).numpy(), interpolation="antialiased")
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=_TITLE_FONT_SIZE)
    if colorbar:
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap("gray" if mode == "masked" else cmap))
        bar = figure.colorbar(mappable, ax=axes, ticks=(0.0, 0.5, 1.0), fraction=0.046, pad=0.04)
        bar.set_label(_colorbar_label(mode), fontsize=_FONT_SIZE)
        bar.ax.tick_params(labelsize=_FONT_SIZE)
    return figure, axes


def _layer_labels(layer_names: Sequence[str] | None, count: int) -> list[str]:
    if not layer_names:
        return [f"layer {index}" for index in range(count)]
    if len(layer_names) != count:
        raise ValueError(f"`layer_names` must name each of the {count} layers, got {len(layer_names)} names.")
    return [literal(name) for name in layer_names]


def line_colours(count: int) -> list[tuple[float, float, float, float]]:
    """``count`` colours that can be told apart: tab10 up to 10 lines, tab20 up to 20, then a sampled rainbow.

    Examples:
        >>> len(line_colours(3)), line_colours(12)[0] == line_colours(12)[1]
        (3, False)
    """
    if count <= 10:
        return [matplotlib.colormaps["tab10"](index) for index in range(count)]
    if count <= 20:
        # tab20 pairs a dark and a light shade; dark ones first keeps the first ten as distinct as tab10.
        return [matplotlib.colormaps["tab20"]((2 * index) % 20 + (2 * index) // 20) for index in range(count)]
    return [matplotlib.colormaps["turbo"](value) for value in np.linspace(0.05, 0.95, count)]


# Fixed layouts in inches: matplotlib's constrained layout measures every tick label on each draw and alone
# costs more than the whole rendering budget of an evaluation.
_TEXT_INCHES_PER_CHAR = 0.085
_LEGEND_HANDLE_INCHES = 0.8


def _panel_grid(
    rows: int,
    columns: int,
    panel: tuple[float, float],
    margins: tuple[float, float, float, float],
    gaps: tuple[float, float] = (0.35, 0.55),
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
    """A layers x heads heatmap of head importance with a colour bar.

    Args:
        weights: ``[L, H]`` head weights (e.g. the batch mean of ``Explanation.head_weights``) or ``[B, L, H]``,
            which is averaged over the batch. NaN cells (heads a pruned layer no longer has) are drawn light grey.
        layer_names: ``L`` row labels; defaults to ``layer 0 .. layer L-1``.
        title: Figure title.

    Returns:
        A figure with two axes: the heatmap and its colour bar.

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
    panel = (max(2.0, 0.4 * num_heads), max(1.4, 0.3 * num_layers))
    figure, grid = _panel_grid(1, 1, panel, margins=(left, 1.3, 0.6, 0.4))
    axes = grid[0, 0]
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axes.imshow(values.numpy(), cmap=colormap, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(num_heads), [str(head) for head in range(num_heads)])
    axes.set_yticks(range(num_layers), labels)
    axes.tick_params(labelsize=_FONT_SIZE)
    axes.set_xlabel("head", fontsize=_FONT_SIZE)
    axes.set_title(literal(title), fontsize=_TITLE_FONT_SIZE)
    width, height = figure.get_size_inches()
    colorbar_axes = figure.add_axes((1 - 1.1 / width, 0.6 / height, 0.15 / width, panel[1] / height))
    figure.colorbar(image, cax=colorbar_axes).set_label("weight", fontsize=_FONT_SIZE)
    colorbar_axes.tick_params(labelsize=_FONT_SIZE)
    return figure


def _empty_note(axes: Axes, text: str) -> None:
    axes.text(
        0.5, 0.5, literal(text), ha="center", va="center", transform=axes.transAxes, color="gray", fontsize=_FONT_SIZE
    )


def _step_ticks(axes: Axes, steps: Sequence[int], panel_inches: float) -> None:
    """Integer step ticks that never overlap: as many as labels of the largest step's width fit the panel."""
    if len(set(steps)) == 1:  # one evaluation: matplotlib would widen the axis to fractional steps around it
        axes.set_xticks(list(steps))
        axes.set_xlim(steps[0] - 1, steps[0] + 1)
        return
    digits = len(str(max((int(step) for step in steps), default=0)))
    label_inches = digits * _TEXT_INCHES_PER_CHAR * 1.1 + 0.2  # each label with a gap to the next
    # MaxNLocator places at most nbins + 1 ticks.
    axes.xaxis.set_major_locator(MaxNLocator(nbins=max(1, int(panel_inches / label_inches) - 1), integer=True))


def _mark_prunings(axes: Axes, pruned_at: Sequence[int]) -> None:
    """A dashed line at each step heads were removed: GMAR weights renormalise over the remaining heads there, so a
    jump at such a line is the pruning, not a change in importance."""
    for index, step in enumerate(pruned_at):
        axes.axvline(step, color="0.45", linestyle="--", linewidth=1.0, label="heads pruned" if index == 0 else None)


def layer_trajectory_figure(
    trajectory: HeadTrajectory, layer: int, title: str | None = None, pruned_at: Sequence[int] = ()
) -> Figure:
    """One layer's head weights over global steps, one coloured line per head named in a legend.

    Sized for a TensorBoard card (about 430 x 240 px, 10 pt text), so each head's colour and name read unexpanded:
    TensorBoard's Custom Scalars tab colours lines by run, not by tag, so its per-layer charts cannot.

    Args:
        trajectory: The recorded trajectory.
        layer: Which layer, ``0 .. num_layers - 1``.
        title: Figure title; defaults to the layer's name.
        pruned_at: Global steps at which heads were removed (``HeadPruning.history``), each marked by a dashed line.

    Returns:
        A figure with one axes.

    Examples:
        >>> trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.ones(2, 2))
        >>> figure = layer_trajectory_figure(trajectory, 1)
        >>> figure.axes[0].get_title(), [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        ('blocks.1.attn', ['head 0', 'head 1'])
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    num_layers, num_heads = trajectory.num_layers, trajectory.num_heads
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"`layer` must be an index in [0, {num_layers}), got {layer!r}.")
    head_labels = [f"head {head}" for head in range(num_heads)] + (["heads pruned"] if pruned_at else [])
    legend_columns = math.ceil(len(head_labels) / 8)
    panel = (2.3, 1.45)
    figure, grid = _panel_grid(1, 1, panel, margins=(0.85, 0.1 + legend_columns * _legend_width(head_labels) * 0.8,
                                                      0.5, 0.35))  # fmt: skip
    axes = grid[0, 0]
    weights = trajectory.weights.numpy()
    for head, (label, colour) in enumerate(zip(head_labels, line_colours(num_heads), strict=False)):
        axes.plot(trajectory.steps, weights[:, layer, head], marker="o", markersize=3, color=colour, label=label)
    _mark_prunings(axes, pruned_at)
    axes.set_title(literal(title) if title else _layer_labels(trajectory.layer_names, num_layers)[layer],
                   fontsize=_TITLE_FONT_SIZE)  # fmt: skip
    axes.tick_params(labelsize=_FONT_SIZE)
    axes.set_xlabel("global step", fontsize=_FONT_SIZE)
    axes.set_ylabel("weight", fontsize=_FONT_SIZE)
    _step_ticks(axes, trajectory.steps, panel[0])
    if not len(trajectory):
        _empty_note(axes, "no evaluations yet")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=_FONT_SIZE, frameon=False,
                ncols=legend_columns, handlelength=1.2, columnspacing=0.8, borderaxespad=0.0)  # fmt: skip
    return figure


def layer_trajectory_images(trajectory: HeadTrajectory, pruned_at: Sequence[int] = ()) -> list[np.ndarray]:
    """Every layer's [`layer_trajectory_figure`][gmar_lightning.render.layer_trajectory_figure] as an ``[H, W, 3]``
    uint8 array, the pixels [`figure_to_array`][gmar_lightning.render.figure_to_array] gives of it, drawn faster.

    The layers' figures differ only in their lines and title: one figure is built and drawn again for each layer with
    those changed (and the y-axis rescaled to them), which spares building a figure and its ticks per layer.

    Args:
        trajectory: The recorded trajectory.
        pruned_at: Global steps at which heads were removed, each marked by a dashed line.

    Returns:
        One array per layer, layer 0 first.

    Examples:
        >>> trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.ones(2, 2))
        >>> [pixels.shape for pixels in layer_trajectory_images(trajectory)]
        [(230, 429, 3), (230, 429, 3)]
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    if not len(trajectory):  # no lines to rescale to: a new figure keeps the axes' default limits, relim drops them
        return [figure_to_array(layer_trajectory_figure(trajectory, layer, pruned_at=pruned_at))
                for layer in range(trajectory.num_layers)]  # fmt: skip
    figure = layer_trajectory_figure(trajectory, 0, pruned_at=pruned_at)
    axes = figure.axes[0]
    weights, titles = trajectory.weights.numpy(), _layer_labels(trajectory.layer_names, trajectory.num_layers)

    def show(layer: int) -> None:
        for head, line in enumerate(axes.get_lines()[: trajectory.num_heads]):
            line.set_ydata(weights[:, layer, head])
        axes.set_title(titles[layer], fontsize=_TITLE_FONT_SIZE)
        # What the y-axis of a new figure of these lines autoscales to.
        axes.relim()
        axes.autoscale_view()

    return _redrawn(figure, axes, trajectory.num_layers, show)


def _redrawn(figure: Figure, axes: Axes, count: int, show: Callable[[int], None]) -> list[np.ndarray]:
    """The pixels of ``figure`` as drawn, then after ``show(1)``, ..., ``show(count - 1)`` (each changing only the
    lines, y-axis and title of its one ``axes``), each those of a whole draw of that figure.

    A whole draw per picture would redraw the x-axis and legend, the same in all of them. They are drawn once and
    copied instead (Agg's ``copy_from_bbox``); each picture draws what differs (the y-axis with its label, the lines,
    the title) and the spines over the lines, in the order a whole draw paints them: by z-order, then as added.
    Nothing that differs overlaps the copied part. A picture whose x-axis differs (lines spanning other steps) is drawn
    whole.
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    images = [np.asarray(canvas.buffer_rgba())[..., :3].copy()]
    changing = sorted([axes.yaxis, *axes.get_lines(), *axes.spines.values(), axes.title], key=lambda a: a.zorder)
    for artist in changing:
        artist.set_visible(False)
    canvas.draw()
    frame, frame_steps = canvas.copy_from_bbox(figure.bbox), axes.get_xlim()
    for artist in changing:
        artist.set_visible(True)
    for index in range(1, count):
        show(index)
        if axes.get_xlim() == frame_steps:
            canvas.restore_region(frame)
            for artist in changing:
                figure.draw_artist(artist)
        else:
            canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images


def trajectory_figure(
    trajectory: HeadTrajectory, title: str = "GMAR head importance over training", pruned_at: Sequence[int] = ()
) -> Figure:
    """A grid of panels, one per layer, one line per head: head weight (y) against global step (x).

    The grid is near-square (2 x 2 for 4 layers, 4 x 3 for 12), so the figure keeps a shape that stays readable
    when TensorBoard scales it to a card.

    Args:
        trajectory: The recorded trajectory; an empty one gives empty panels (or a single note when even the
            number of layers is unknown).
        title: Figure title.
        pruned_at: Global steps at which heads were removed, each marked by a dashed line in every panel.

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
    columns = _grid_columns(panels)
    rows = math.ceil(panels / columns)
    head_labels = [f"head {head}" for head in range(num_heads)]
    right = _legend_width([*head_labels, "heads pruned"] if pruned_at else head_labels) if len(trajectory) else 0.2
    figure, grid = _panel_grid(rows, columns, (2.4, 1.7), margins=(0.8, right, 0.6, 0.6), sharex=True, sharey=True)
    grid = grid.flatten()
    for unused in grid[panels:]:
        figure.delaxes(unused)
    figure.suptitle(literal(title), fontsize=_TITLE_FONT_SIZE)
    if num_layers == 0:
        grid[0].set_axis_off()
        _empty_note(grid[0], "no head importance recorded yet")
        return figure
    labels = _layer_labels(trajectory.layer_names, num_layers)
    weights = trajectory.weights.numpy()
    colours = line_colours(num_heads)
    for layer, axes in enumerate(grid[:panels]):
        for head, head_label in enumerate(head_labels):
            axes.plot(
                trajectory.steps, weights[:, layer, head], marker="o", markersize=3, color=colours[head],
                label=head_label,
            )  # fmt: skip
        _mark_prunings(axes, pruned_at)
        axes.set_title(labels[layer], fontsize=_FONT_SIZE)
        axes.tick_params(labelsize=_FONT_SIZE, labelbottom=True)
        _step_ticks(axes, trajectory.steps, 2.4)
        if not len(trajectory):
            _empty_note(axes, "no evaluations yet")
    for axes in grid[max(panels - columns, 0) : panels]:
        axes.set_xlabel("global step", fontsize=_FONT_SIZE)
    for axes in grid[:panels:columns]:
        axes.set_ylabel("weight", fontsize=_FONT_SIZE)
    if len(trajectory):
        figure.legend(*grid[0].get_legend_handles_labels(), loc="upper right", fontsize=_FONT_SIZE, frameon=False)
    return figure


SUMMARY_BOUNDS: dict[str, tuple[float, float]] = {
    "entropy": (0.0, 1.0),
    "top_share": (0.0, 1.0),
    "stability": (-1.0, 1.0),
}
"""The natural range of each specialisation statistic, which fixes the y-axis of its plot."""

_SUMMARY_PANELS: tuple[tuple[str, str], ...] = (
    ("entropy", "normalised head entropy"),
    ("top_share", "top-head share"),
    ("stability", "rank stability (Spearman)"),
)


def specialisation_figure(
    trajectory: HeadTrajectory, title: str = "GMAR head specialisation", statistic: str | None = None
) -> Figure:
    """Three panels over global steps, one line per layer: head entropy, top-head share and rank stability.

    Each y-axis spans the statistic's natural range (entropy and share ``[0, 1]``, rank correlation ``[-1, 1]``), so
    noise does not look like change. See [`specialisation`][gmar_lightning.trajectory.specialisation] and
    [`rank_stability`][gmar_lightning.trajectory.rank_stability] for the definitions.

    Args:
        trajectory: The recorded trajectory (may be empty).
        title: Figure title (unused with ``statistic``).
        statistic: Only this statistic (``"entropy"``, ``"top_share"`` or ``"stability"``), in one panel sized for a
            TensorBoard card (about 430 x 240 px) with the layers named in a legend beside it.

    Returns:
        A figure with three axes, stacked, or one with ``statistic``.

    Examples:
        >>> trajectory = HeadTrajectory()
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
        >>> [axes.get_title() for axes in specialisation_figure(trajectory).axes]
        ['normalised head entropy', 'top-head share', 'rank stability (Spearman)']
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    shown = [(key, name) for key, name in _SUMMARY_PANELS if statistic in (None, key)]
    if not shown:
        raise ValueError(f"`statistic` must be one of {', '.join(SUMMARY_BOUNDS)} or None, got {statistic!r}.")
    summaries = trajectory.summaries()
    # Layer names without any recorded row give no lines: the statistics need head weights.
    recorded_layers = trajectory.weights.shape[1]
    labels = _layer_labels(trajectory.layer_names, recorded_layers) if recorded_layers else []
    colours = line_colours(len(labels))
    legend_columns = max(1, math.ceil(len(labels) / 8)) if statistic else 1
    right = legend_columns * _legend_width(labels) if labels else 0.2
    panel, margins = ((2.3, 1.45), (0.85, right, 0.5, 0.35)) if statistic else ((3.6, 1.5), (0.7, right, 0.6, 0.6))
    figure, grid = _panel_grid(len(shown), 1, panel, margins=margins, gaps=(0.5, 0.5), sharex=True)
    panels = grid[:, 0]
    if statistic is None:
        figure.suptitle(literal(title), fontsize=_TITLE_FONT_SIZE)
    for axes, (key, name) in zip(panels, shown, strict=True):
        values = summaries[key].numpy()
        for layer, label in enumerate(labels):
            axes.plot(trajectory.steps, values[:, layer], marker="o", markersize=3, color=colours[layer], label=label)
        axes.set_title(literal(name), fontsize=_FONT_SIZE)
        low, high = SUMMARY_BOUNDS[key]
        margin = 0.05 * (high - low)
        axes.set_ylim(low - margin, high + margin)
        axes.tick_params(labelsize=_FONT_SIZE, labelbottom=True)
        _step_ticks(axes, trajectory.steps, panel[0])
        if not len(trajectory):
            _empty_note(axes, "no evaluations yet")
    panels[-1].set_xlabel("global step", fontsize=_FONT_SIZE)
    if labels and statistic:
        panels[0].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=_FONT_SIZE, frameon=False,
                         ncols=legend_columns, handlelength=1.2, columnspacing=0.8, borderaxespad=0.0)  # fmt: skip
    elif labels:
        figure.legend(*panels[0].get_legend_handles_labels(), loc="upper right", fontsize=_FONT_SIZE, frameon=False)
    return figure


def specialisation_images(trajectory: HeadTrajectory) -> dict[str, np.ndarray]:
    """Each statistic's [`specialisation_figure`][gmar_lightning.render.specialisation_figure] (one panel, sized for
    a TensorBoard card) as an ``[H, W, 3]`` uint8 array, the pixels
    [`figure_to_array`][gmar_lightning.render.figure_to_array] gives of it, drawn faster: one figure is drawn again
    for each statistic with its lines, y-range and title changed.

    Args:
        trajectory: The recorded trajectory.

    Returns:
        Statistic (``"entropy"``, ``"top_share"``, ``"stability"``) -> its picture.

    Examples:
        >>> trajectory = HeadTrajectory()
        >>> trajectory.append(0, 5, torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
        >>> {key: pixels.shape for key, pixels in specialisation_images(trajectory).items()}
        {'entropy': (230, 454, 3), 'top_share': (230, 454, 3), 'stability': (230, 454, 3)}
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    keys = [key for key, _ in _SUMMARY_PANELS]
    if not len(trajectory):  # no lines: drawn whole, like the empty layer figures
        return {key: figure_to_array(specialisation_figure(trajectory, statistic=key)) for key in keys}
    figure = specialisation_figure(trajectory, statistic=keys[0])
    axes, summaries = figure.axes[0], trajectory.summaries()
    layers = trajectory.weights.shape[1]

    def show(index: int) -> None:
        key, name = _SUMMARY_PANELS[index]
        values = summaries[key].numpy()
        for layer, line in enumerate(axes.get_lines()[:layers]):
            line.set_ydata(values[:, layer])
        axes.set_title(literal(name), fontsize=_FONT_SIZE)
        # The steps a new figure's x-axis autoscales to (rank stability has no value at the first evaluation); the
        # y-range is the statistic's own.
        axes.relim()
        axes.autoscale_view()
        low, high = SUMMARY_BOUNDS[key]
        axes.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))

    return dict(zip(keys, _redrawn(figure, axes, len(keys), show), strict=True))


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


def figure_to_png_bytes(figure: Figure, dpi: float | None = None) -> bytes:
    """Encode a figure as PNG bytes at ``dpi`` (default: the figure's own), with fast (light) compression.

    Examples:
        >>> figure_to_png_bytes(Figure(figsize=(1, 1), dpi=20))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if not isinstance(figure, Figure):
        raise TypeError(f"`figure` must be a matplotlib Figure, got {type(figure).__name__}.")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi or "figure", pil_kwargs={"compress_level": _PNG_COMPRESS_LEVEL})
    return buffer.getvalue()


def image_to_array(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` (``C`` 1 or 3) float in ``[0, 1]`` or uint8 -> ``[H, W, 3]`` uint8, the layout every image writer
    takes.

    Examples:
        >>> image_to_array(torch.full((1, 2, 2), 0.5)).shape, image_to_array(torch.full((1, 2, 2), 0.5))[0, 0]
        ((2, 2, 3), array([128, 128, 128], dtype=uint8))
        >>> image_to_array(torch.full((3, 1, 1), 7, dtype=torch.uint8))[0, 0]
        array([7, 7, 7], dtype=uint8)
    """
    if image.dtype == torch.uint8:  # rasterised already (a figure's pixels): no round trip through floats
        return image.detach().cpu().expand(3, -1, -1).permute(1, 2, 0).numpy()
    pixels = image.detach().float().cpu().clamp(0.0, 1.0).expand(3, -1, -1)
    return (pixels * 255.0).round().byte().permute(1, 2, 0).numpy()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def image_to_png_bytes(image: Tensor) -> bytes:
    """Encode a ``[C, H, W]`` image (float in ``[0, 1]`` or uint8) as 8-bit RGB PNG bytes (the one PNG encoder of
    images in the package).

    Rows go unfiltered into zlib at level 1: for these renderings (flat colours, text, photographs) that is 2 to 3
    times faster than Pillow's encoder, which tries five filters on every row, for files within about a tenth of its
    size (smaller for figures, larger for photographs). A faster strategy (run-length) gives larger files, and bytes
    cost more than encoding: TensorBoard's event writer checksums every byte in Python, about 0.2 s per MB here.

    Examples:
        >>> image_to_png_bytes(torch.zeros(3, 2, 2))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    pixels = image_to_array(image)
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # each row: filter type 0 (none), then its RGB bytes
    rows[:, 1:] = pixels.reshape(height, 3 * width)
    data = zlib.compress(rows, 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no filter set, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
