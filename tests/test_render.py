"""Rendering of overlays, head-importance figures and their conversion to PNG/arrays."""

from __future__ import annotations

import io
import itertools

import matplotlib
import matplotlib.text
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from gmar_lightning.render import (
    clip_outliers,
    denormalize,
    evenly_spaced,
    evolution_figure,
    evolution_page_images,
    evolution_pages,
    figure_to_array,
    figure_to_png_bytes,
    head_heatmap_figure,
    image_to_png_bytes,
    layer_trajectory_figure,
    layer_trajectory_images,
    overlay,
    overlay_grid_figure,
    overlay_grid_image,
    overlay_page_images,
    overlay_pages,
    specialisation_figure,
    specialisation_images,
    trajectory_figure,
    visualize,
)
from gmar_lightning.trajectory import HeadTrajectory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_trajectory(epochs: int = 4, layers: int = 4, heads: int = 4, named: bool = True) -> HeadTrajectory:
    generator = torch.Generator().manual_seed(0)
    trajectory = HeadTrajectory(layer_names=[f"blocks.{i}.attn" for i in range(layers)] if named else [])
    for epoch in range(epochs):
        weights = torch.rand(layers, heads, generator=generator).softmax(dim=1)
        trajectory.append(epoch, 10 * epoch, weights, weights * 3)
    return trajectory


def test_denormalize_with_mean_and_std_round_trips() -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    restored = denormalize((images - mean) / std, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(restored, images, atol=1e-6)


def test_denormalize_clamps_out_of_range_values() -> None:
    restored = denormalize(torch.tensor([-10.0, 10.0]).view(1, 1, 1, 2), mean=[0.5], std=[0.5])
    assert restored.flatten().tolist() == [0.0, 1.0]


def test_denormalize_without_stats_scales_each_image_to_the_unit_range() -> None:
    images = torch.stack([torch.randn(3, 6, 6) * 5 + 3, torch.full((3, 6, 6), 2.0)])
    restored = denormalize(images)
    assert restored[0].min().item() == 0.0 and restored[0].max().item() == pytest.approx(1.0)
    assert restored[1].abs().sum().item() == 0.0  # a constant image has no range: zeros


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": IMAGENET_MEAN}, "`mean` and `std` must be given together"),
        ({"mean": (0.5, 0.5), "std": (0.5, 0.5)}, "`std` must have one value per channel (3)"),
    ],
)
def test_denormalize_rejects_bad_statistics(kwargs: dict[str, tuple[float, ...]], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        denormalize(torch.rand(1, 3, 4, 4), **kwargs)


def test_overlay_shape_range_and_blend() -> None:
    images = torch.rand(3, 3, 16, 12)
    maps = torch.rand(3, 16, 12)
    blended = overlay(images, maps)
    assert blended.shape == (3, 3, 16, 12) and blended.dtype == torch.float32
    assert blended.min().item() >= 0.0 and blended.max().item() <= 1.0
    assert torch.equal(overlay(images, maps, alpha=0.0), images)


def test_overlay_uses_the_matplotlib_colormap() -> None:
    maps = torch.tensor([0.0, 1.0]).view(1, 1, 2).expand(1, 2, 2)
    colours = overlay(torch.zeros(1, 3, 2, 2), maps, cmap="jet", alpha=1.0)[0, :, 0]  # [3, 2]: map 0 then map 1
    jet = matplotlib.colormaps["jet"]
    assert colours[:, 0].tolist() == pytest.approx(jet(0.0)[:3], abs=1e-6)
    assert colours[:, 1].tolist() == pytest.approx(jet(1.0)[:3], abs=1e-6)


def test_overlay_accepts_grayscale_images() -> None:
    assert overlay(torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)).shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("maps", "options", "message"),
    [
        (torch.rand(2, 16, 16), {}, "`maps` must have shape [2, 8, 8]"),
        (torch.rand(2, 8, 8), {"cmap": "no-such-map"}, "`cmap` must be a matplotlib colormap name"),
        (torch.rand(2, 8, 8), {"alpha": 1.5}, "`alpha` must be a number in [0, 1]"),
    ],
)
def test_overlay_rejects_bad_inputs(maps: torch.Tensor, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        overlay(torch.rand(2, 3, 8, 8), maps, **options)


def test_overlay_grid_image_tiles_at_most_max_images() -> None:
    grid = overlay_grid_image(torch.rand(20, 3, 32, 32), torch.rand(20, 32, 32), max_images=16, padding=2)
    assert grid.shape == (3, 4 * 34 + 2, 4 * 34 + 2)  # 4 x 4 tiles of 32 px with 2 px padding
    assert grid.min().item() >= 0.0 and grid.max().item() <= 1.0


def test_overlay_grid_figure_captions_each_shown_image() -> None:
    labels = ["cat", "dog", "cat", "bird", "dog"]
    predictions = ["cat", "cat", "cat", "bird", "dog"]
    figure = overlay_grid_figure(
        torch.rand(5, 3, 32, 32), torch.rand(5, 32, 32), labels, predictions, max_images=4,
        probabilities=[0.9, 0.51, 0.999, 0.25, 0.5],
    )  # fmt: skip
    tiles, colorbar = figure.axes
    assert colorbar.get_ylabel() == "saliency"
    assert [text.get_text() for text in tiles.texts] == [
        "true: cat", "pred: cat 90%", "true: dog", "pred: cat 51%",
        "true: cat", "pred: cat 100%", "true: bird", "pred: bird 25%",
    ]  # fmt: skip
    assert [text.get_color() for text in tiles.texts][::2] == ["green", "red", "green", "green"]
    assert min(text.get_fontsize() for text in figure.findobj(matplotlib.text.Text) if text.get_text()) >= 10


def test_overlay_grid_figure_rejects_too_few_labels() -> None:
    with pytest.raises(ValueError, match="`labels` must be a list with one string per shown image"):
        overlay_grid_figure(torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8), labels=["cat"])


def test_head_heatmap_figure_labels_layers_and_has_a_colorbar() -> None:
    names = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    figure = head_heatmap_figure(torch.rand(8, 3, 4), names)  # [B, L, H] is averaged over the batch
    heatmap, colorbar = figure.axes
    assert [label.get_text() for label in heatmap.get_yticklabels()] == names
    assert len(heatmap.get_xticklabels()) == 4
    assert colorbar.get_ylabel() == "weight"


def test_head_heatmap_figure_rejects_mismatched_layer_names() -> None:
    with pytest.raises(ValueError, match="`layer_names` must name each of the 3 layers"):
        head_heatmap_figure(torch.rand(3, 4), ["only one"])


def test_trajectory_figure_has_one_panel_per_layer_and_one_line_per_head() -> None:
    figure = trajectory_figure(make_trajectory(epochs=3, layers=5, heads=6))
    assert len(figure.axes) == 5
    # A near-square grid of layers (3 columns x 2 rows for 5), not one long row.
    assert sorted({round(axes.get_position().x0, 3) for axes in figure.axes}).__len__() == 3
    assert len({round(axes.get_position().y0, 3) for axes in figure.axes}) == 2
    assert all(len(axes.get_lines()) == 6 for axes in figure.axes)
    assert len({line.get_color() for line in figure.axes[0].get_lines()}) == 6
    trajectory = make_trajectory(epochs=3, layers=5, heads=6)
    assert list(figure.axes[0].get_lines()[0].get_xdata()) == trajectory.steps  # x is the global step
    assert [axes.get_title() for axes in figure.axes] == [f"blocks.{i}.attn" for i in range(5)]


def test_trajectory_figure_of_an_empty_trajectory() -> None:
    assert len(trajectory_figure(HeadTrajectory()).axes) == 1
    assert len(trajectory_figure(HeadTrajectory(layer_names=["a", "b"])).axes) == 2
    assert figure_to_png_bytes(trajectory_figure(HeadTrajectory())).startswith(PNG_SIGNATURE)


def test_specialisation_figure_has_three_panels_with_one_line_per_layer() -> None:
    figure = specialisation_figure(make_trajectory(layers=3, named=False))
    assert len(figure.axes) == 3
    assert all(len(axes.get_lines()) == 3 for axes in figure.axes)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["layer 0", "layer 1", "layer 2"]
    assert [axes.get_ylim() for axes in figure.axes] == [(-0.05, 1.05), (-0.05, 1.05), (-1.1, 1.1)]
    assert len(specialisation_figure(HeadTrajectory(layer_names=["a"])).axes) == 3


def test_figure_conversions() -> None:
    figure = head_heatmap_figure(torch.rand(2, 2))
    png = figure_to_png_bytes(figure)
    assert png.startswith(PNG_SIGNATURE)
    width, height = Image.open(io.BytesIO(png)).size
    assert (width, height) == pytest.approx(figure.get_size_inches() * figure.dpi, abs=1)
    array = figure_to_array(figure)
    assert array.shape == (height, width, 3) and array.dtype.name == "uint8"
    assert array.min() < 128 < array.max()  # something was drawn on the white background


def test_figure_conversions_reject_non_figures() -> None:
    with pytest.raises(TypeError, match="`figure` must be a matplotlib Figure"):
        figure_to_png_bytes(torch.rand(3, 4, 4))  # type: ignore[arg-type]


def test_specialisation_figure_tells_twelve_layers_apart() -> None:
    figure = specialisation_figure(make_trajectory(layers=12, heads=3))
    assert len({tuple(line.get_color()) for line in figure.axes[0].get_lines()}) == 12


@pytest.mark.parametrize(
    ("count", "most", "expected"), [(16, 5, [0, 4, 8, 11, 15]), (4, 5, [0, 1, 2, 3]), (9, 2, [0, 8])]
)
def test_evenly_spaced_always_keeps_the_first_and_the_last(count: int, most: int, expected: list[int]) -> None:
    assert evenly_spaced(count, most) == expected


def test_evolution_figure_puts_images_in_rows_and_sampled_evaluations_in_columns() -> None:
    images = torch.rand(3, 3, 16, 16)
    maps = torch.zeros(16, 3, 8, 8)
    maps[-1] = 1.0  # only the latest evaluation is salient everywhere
    figure = evolution_figure(images, maps, epochs=list(range(0, 32, 2)), cmap="gray", alpha=1.0)
    tiles, colorbar = figure.axes
    texts = [text.get_text() for text in tiles.texts]
    assert texts == ["epoch 0", "epoch 8", "epoch 16", "epoch 22", "epoch 30", "image 1", "image 2", "image 3"]
    canvas = tiles.get_images()[0].get_array()
    # The last column is white (map 1 in gray at full opacity), the first black (map 0).
    columns = canvas.shape[1]
    row = canvas[canvas.shape[0] // 2]
    assert row[int(columns * 0.93)].min() == pytest.approx(1.0) and row[int(columns * 0.08)].max() == pytest.approx(0.0)
    assert colorbar.get_ylabel() == "saliency"
    with pytest.raises(ValueError, match=r"`epochs` must hold one epoch per evaluation \(16\)"):
        evolution_figure(images, maps, epochs=[0])


# The box TensorBoard's Time Series tab draws an image card's picture in at a 1400 x 1000 window, measured with
# headless Chromium (tests/test_tensorboard_server.py measures it again on a live server).
CARD_BOX = (372, 215)


def _texts(figure: Figure) -> list[matplotlib.text.Text]:
    return [text for text in figure.findobj(matplotlib.text.Text) if text.get_text() and text.get_visible()]


def _card_scale(figure: Figure) -> float:
    width, height = figure.get_size_inches() * figure.dpi
    return min(CARD_BOX[0] / width, CARD_BOX[1] / height, 1.0)


@pytest.mark.parametrize("count", [1, 2, 5, 16])
def test_overlay_pages_fit_a_tensorboard_card_with_captions_over_9_screen_pixels(count: int) -> None:
    names = ["triangle"] * count
    pages = overlay_pages(torch.rand(count, 3, 224, 224), torch.rand(count, 224, 224), names, names,
                          [0.994] * count, title="gmar_l1: where attention carries information")  # fmt: skip
    assert len(pages) == (count + 1) // 2
    for page in pages:
        texts = _texts(page)
        assert {"true: triangle", "pred: triangle 99%", "saliency"} <= {text.get_text() for text in texts}
        assert min(text.get_fontsize() for text in texts) >= 10
        # 10 pt at 100 dpi is 13.9 logged pixels; scaled into the card it stays at least 9 screen pixels tall.
        assert 10 / 72 * page.dpi * _card_scale(page) >= 9
        _assert_no_text_overlaps(page)


def test_evolution_pages_fit_a_tensorboard_card() -> None:
    pages = evolution_pages(torch.rand(4, 3, 64, 64), torch.rand(9, 4, 8, 8), list(range(9)))
    assert len(pages) == 2
    assert [text.get_text() for text in pages[1].axes[0].texts][-2:] == ["image 3", "image 4"]
    for page in pages:
        assert min(text.get_fontsize() for text in _texts(page)) >= 10
        assert 10 / 72 * page.dpi * _card_scale(page) >= 9


@pytest.mark.parametrize("mode", ["blended", "masked"])
def test_page_images_are_the_pixels_of_the_page_figures_each_drawn_whole(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images, maps = torch.rand(5, 3, 40, 40, generator=generator), torch.rand(5, 40, 40, generator=generator)
    names, predicted = ["cat", "dog", "US$ 1", "cat", "owl"], ["cat", "cat", "US$ 1", "owl", "owl"]
    options = {"title": "gmar_l1: where attention carries information", "mode": mode}
    for labels, predictions in ((names, predicted), (None, predicted), (None, None)):
        figures = overlay_pages(images, maps, labels, predictions, [0.5] * 5, **options)
        drawn = overlay_page_images(images, maps, labels, predictions, [0.5] * 5, **options)
        # Three pages, the last with one image: every page differs, so a stale image or caption would show.
        assert len(drawn) == 3
        for figure, pixels in zip(figures, drawn, strict=True):
            assert (pixels == figure_to_array(figure)).all()
    history = torch.rand(6, 5, 8, 8, generator=generator)
    evolution = evolution_page_images(images, history, list(range(6)), mode=mode)
    figures = evolution_pages(images, history, list(range(6)), mode=mode)
    assert len(evolution) == 3  # images 1-2 and 3-4 share a layout (row labels beside the tiles differ), 5 has its own
    for figure, pixels in zip(figures, evolution, strict=True):
        assert (pixels == figure_to_array(figure)).all()


def test_trajectory_images_are_the_pixels_of_each_figure_drawn_whole() -> None:
    trajectory = make_trajectory(epochs=3, layers=4, heads=3)
    # A pruned head (NaN from its pruning on) and a layer whose heads were all removed.
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)).softmax(dim=1)
    weights[1, 2], weights[3] = float("nan"), float("nan")
    trajectory.append(3, 30, weights, weights)
    empty = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    for history, pruned_at in ((trajectory, [25]), (trajectory, []), (empty, [])):
        drawn = layer_trajectory_images(history, pruned_at)
        assert len(drawn) == history.num_layers
        for layer, pixels in enumerate(drawn):
            assert (pixels == figure_to_array(layer_trajectory_figure(history, layer, pruned_at=pruned_at))).all()
        statistics = specialisation_images(history)
        assert list(statistics) == ["entropy", "top_share", "stability"]
        for statistic, pixels in statistics.items():
            assert (pixels == figure_to_array(specialisation_figure(history, statistic=statistic))).all()


def test_image_png_bytes_decode_to_the_images_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    colour = torch.rand(3, 7, 5, generator=generator)
    grey = torch.rand(1, 3, 4, generator=generator)
    flat = torch.randint(0, 256, (3, 6, 9), generator=generator, dtype=torch.uint8)
    for image, expected in (
        (colour, (colour * 255).round().byte()),
        (grey, (grey * 255).round().byte().expand(3, -1, -1)),
        (flat, flat),
        (flat.permute(0, 2, 1), flat.permute(0, 2, 1)),  # not contiguous
    ):
        decoded = Image.open(io.BytesIO(image_to_png_bytes(image)))
        decoded.load()  # reads every chunk and checks their CRCs
        assert decoded.mode == "RGB" and decoded.size == (image.shape[2], image.shape[1])
        assert (np.asarray(decoded) == expected.permute(1, 2, 0).numpy()).all()


def test_overlay_modes_and_outlier_clipping_follow_their_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    images, maps = torch.rand(2, 3, 5, 5, generator=generator), torch.rand(2, 5, 5, generator=generator)
    torch.testing.assert_close(overlay(images, maps, mode="masked"), images * maps[:, None])
    table = torch.tensor(matplotlib.colormaps["viridis"](torch.linspace(0, 1, 256).numpy())[:, :3]).float()
    expected_heat = table[(maps * 255).round().long()].permute(0, 3, 1, 2)
    torch.testing.assert_close(overlay(images, maps, cmap="viridis", mode="heat_map"), expected_heat)
    blended = overlay(images, maps, cmap="viridis", alpha=0.3)
    torch.testing.assert_close(blended, 0.7 * images + 0.3 * expected_heat)
    # Clipping the top 10 %: each map divided by its own 90th percentile (numpy's linear interpolation), then clamped.
    thresholds = torch.tensor([float(torch.quantile(row, 0.9)) for row in maps.flatten(1)])
    torch.testing.assert_close(clip_outliers(maps, 10.0), (maps / thresholds[:, None, None]).clamp(max=1.0))
    assert torch.equal(clip_outliers(maps, 0.0), maps)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "shaded"}, "`mode` must be one of blended, masked, heat_map"),
        ({"outlier_percentile": 100}, "`outlier_percentile` must be a number in \\[0, 100\\)"),
        ({"outlier_percentile": -1.0}, "`outlier_percentile` must be a number in \\[0, 100\\)"),
    ],
)
def test_display_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        overlay(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), **options)


def test_visualize_returns_a_figure_and_axes_to_compose() -> None:
    figure = Figure(figsize=(6, 3))
    _, right = figure.subplots(1, 2)
    image, saliency = torch.rand(3, 16, 16), torch.rand(16, 16)
    returned, axes = visualize(image, saliency, mode="masked", title="gmar_l1", axes=right)
    assert returned is figure and axes is right and axes.get_title() == "gmar_l1"
    shown = axes.get_images()[0].get_array()
    expected = (image * saliency).permute(1, 2, 0).numpy()
    assert abs(shown - expected).max() < 1e-6
    assert figure.axes[-1].get_ylabel() == "saliency (brightness)"  # the colour bar says what grey means
    alone, _ = visualize(image, saliency)
    assert figure_to_png_bytes(alone).startswith(PNG_SIGNATURE)


def test_layer_trajectory_figure_gives_each_head_its_own_colour_and_a_named_legend() -> None:
    trajectory = make_trajectory(epochs=5, layers=3, heads=12)
    figure = layer_trajectory_figure(trajectory, 2)
    lines = figure.axes[0].get_lines()
    assert len({line.get_color() for line in lines}) == 12
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [f"head {head}" for head in range(12)]
    assert figure.axes[0].get_title() == "blocks.2.attn"
    assert min(text.get_fontsize() for text in _texts(figure)) >= 10
    assert 10 / 72 * figure.dpi * _card_scale(figure) >= 9
    _assert_no_text_overlaps(figure)  # the legend stays beside the panel, inside the figure
    with pytest.raises(ValueError, match="`layer` must be an index in \\[0, 3\\)"):
        layer_trajectory_figure(trajectory, 3)


def _assert_no_text_overlaps(figure: Figure) -> None:
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    hidden = set()  # tick labels matplotlib made but does not draw: their tick is outside the axes' view
    for axes in figure.axes:
        for labels, view, coordinate in ((axes.get_xticklabels(), axes.get_xlim(), 0),
                                         (axes.get_yticklabels(), axes.get_ylim(), 1)):  # fmt: skip
            low, high = sorted(view)
            hidden |= {id(label) for label in labels
                       if not axes.axison or not low <= label.get_position()[coordinate] <= high}  # fmt: skip
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in _texts(figure) if id(text) not in hidden]
    width, height = figure.get_size_inches() * figure.dpi
    for name, box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (name, box)
    for index, (name, box) in enumerate(boxes):
        for other, other_box in boxes[index + 1 :]:
            assert not box.overlaps(other_box), (name, other)


def _assert_ticks_apart(figure: Figure) -> None:
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    for axes in figure.axes:
        labels = [label for label in axes.get_xticklabels() if label.get_text() and label.get_visible()]
        inside = [label for label in labels if axes.get_xlim()[0] <= label.get_position()[0] <= axes.get_xlim()[1]]
        boxes = sorted((label.get_window_extent(renderer) for label in inside), key=lambda box: box.x0)
        for left, right in itertools.pairwise(boxes):
            assert left.x1 + 2 <= right.x0, [label.get_text() for label in inside]


@pytest.mark.parametrize("evaluations", [1, 2, 7, 60, 400])
@pytest.mark.parametrize("step_size", [1, 94, 12_345])
def test_step_ticks_never_overlap(evaluations: int, step_size: int) -> None:
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    generator = torch.Generator().manual_seed(0)
    for evaluation in range(evaluations):
        weights = torch.rand(2, 4, generator=generator).softmax(dim=1)
        trajectory.append(evaluation, step_size * (evaluation + 1) - 1, weights, weights)
    for figure in (
        trajectory_figure(trajectory),
        layer_trajectory_figure(trajectory, 0),
        specialisation_figure(trajectory),
        specialisation_figure(trajectory, statistic="stability"),
    ):
        _assert_ticks_apart(figure)


@pytest.mark.parametrize("heads", [4, 12])
def test_pruning_marks_are_named_in_the_legend_without_overlapping_text(heads: int) -> None:
    trajectory = make_trajectory(epochs=6, layers=2, heads=heads)
    for figure in (
        layer_trajectory_figure(trajectory, 1, pruned_at=[15, 35]),
        trajectory_figure(trajectory, pruned_at=[15]),
    ):
        axes = figure.axes[0]
        marks = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
        assert sorted(line.get_xdata()[0] for line in marks) == ([15, 35] if len(figure.axes) == 1 else [15])
        labels = [text.get_text() for text in (axes.get_legend() or figure.legends[0]).get_texts()]
        assert labels.count("heads pruned") == 1 and len(labels) == heads + 1
        _assert_no_text_overlaps(figure)
