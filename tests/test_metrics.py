from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gmar_lightning.metrics import (
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    PointingGame,
    deletion_curve,
    insertion_curve,
)


class RegionEvidence(nn.Module):
    """Class 0's logit is the mean of a fixed pixel region (all channels); class 1's is a constant threshold."""

    def __init__(self, region: Tensor, threshold: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.threshold = threshold
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: Tensor) -> Tensor:
        evidence = (x * self.region).sum(dim=(1, 2, 3)) / (self.region.sum() * x.shape[1])
        logit = self.scale * (evidence - self.threshold)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class ConstantLogits(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


def square_masks(batch: int, size: int, top: int, left: int, side: int) -> Tensor:
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    masks[:, top : top + side, left : left + side] = True
    return masks


def peaked_maps(peaks: list[tuple[int, int]], size: int) -> Tensor:
    maps = torch.rand(len(peaks), size, size) * 0.5
    for index, (row, col) in enumerate(peaks):
        maps[index, row, col] = 1.0
    return maps


# ---------------------------------------------------------------- pointing games


def test_pointing_game_hits_inside_and_misses_outside() -> None:
    masks = square_masks(2, 8, top=2, left=2, side=3)
    assert PointingGame()(peaked_maps([(3, 3), (4, 2)], 8), masks).item() == 1.0
    assert PointingGame()(peaked_maps([(0, 0), (7, 5)], 8), masks).item() == 0.0
    assert PointingGame()(peaked_maps([(3, 3), (7, 7)], 8), masks).item() == 0.5


@pytest.mark.parametrize(("peak", "distance"), [((2, 7), 3), ((7, 7), 3), ((5, 6), 2), ((0, 2), 2)])
def test_pointing_game_tolerance_is_chebyshev_and_inclusive(peak: tuple[int, int], distance: int) -> None:
    masks = square_masks(1, 8, top=2, left=2, side=3)  # rows and columns 2..4
    maps = peaked_maps([peak], 8)
    assert PointingGame(tolerance=distance)(maps, masks).item() == 1.0
    assert PointingGame(tolerance=distance - 1)(maps, masks).item() == 0.0


def test_pointing_game_skips_empty_masks_and_resizes_maps() -> None:
    masks = square_masks(3, 8, top=0, left=0, side=4)
    masks[1] = False
    token_maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    metric = PointingGame()
    metric.update(token_maps, masks)
    assert metric.total.item() == 2 and metric.hits.item() == 1
    assert metric.compute().item() == 0.5
    assert math.isnan(PointingGame()(token_maps[1:2], masks[1:2]).item())


def test_energy_pointing_game_exact_value() -> None:
    maps = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]])  # normalised: 0, .25, .5, 1 (centre)
    masks = torch.zeros(1, 3, 3, dtype=torch.bool)
    masks[0, 1, 1] = masks[0, 0, 2] = True
    expected = (1.0 + 0.5) / (0.25 + 0.5 + 1.0)
    assert EnergyPointingGame()(maps, masks).item() == pytest.approx(expected, abs=1e-6)
    # Min-max normalisation makes the score invariant to an affine change of the map.
    assert EnergyPointingGame()(3 * maps - 7, masks).item() == pytest.approx(expected, abs=1e-6)


def test_energy_pointing_game_constant_maps_score_zero_and_empty_masks_are_skipped() -> None:
    masks = square_masks(2, 4, top=0, left=0, side=2)
    masks[1] = False
    maps = torch.stack([torch.full((4, 4), 0.3), torch.rand(4, 4)])
    metric = EnergyPointingGame()
    metric.update(maps, masks)
    assert metric.total.item() == 1
    assert metric.compute().item() == 0.0
    perfect = masks[:1].float() * 2 + 1
    assert EnergyPointingGame()(perfect, masks[:1]).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- deletion and insertion


def region_setup(batch: int = 3, size: int = 8) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A model whose class-0 evidence is the top-left quadrant of bright images, and the map that ranks it first."""
    region = torch.zeros(1, size, size)
    region[:, : size // 2, : size // 2] = 1
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.2 + 0.8
    perfect_maps = region + 0.01 * torch.rand(batch, size, size, generator=generator)
    return RegionEvidence(region), images, perfect_maps, torch.zeros(batch, dtype=torch.long)


def test_deletion_prefers_the_map_that_ranks_the_evidence_first() -> None:
    model, images, perfect, targets = region_setup()
    good = DeletionAUC(model, steps=16)(images, perfect, targets).item()
    inverse = DeletionAUC(model, steps=16)(images, -perfect, targets).item()
    assert good < inverse - 0.2


def test_insertion_prefers_the_map_that_ranks_the_evidence_first() -> None:
    model, images, perfect, targets = region_setup()
    # Only the evidence quadrant is bright: blurring dims it, and revealing it first restores the evidence.
    images[..., 4:] = 0.0
    images[..., 4:, :] = 0.0
    good = InsertionAUC(model, steps=16, blur_kernel_size=7, blur_sigma=3.0)(images, perfect, targets).item()
    inverse = InsertionAUC(model, steps=16, blur_kernel_size=7, blur_sigma=3.0)(images, -perfect, targets).item()
    assert good > inverse + 0.15


@pytest.mark.parametrize("metric_class", [DeletionAUC, InsertionAUC])
def test_constant_model_scores_its_constant_probability(metric_class: type[Metric]) -> None:
    model = ConstantLogits([math.log(3.0), 0.0])  # softmax: 0.75, 0.25
    images, maps = torch.rand(5, 3, 6, 6), torch.rand(5, 6, 6)
    metric = metric_class(model, steps=7)
    assert metric(images, maps, torch.zeros(5, dtype=torch.long)).item() == pytest.approx(0.75, abs=1e-6)
    assert metric_class(model)(images, maps, torch.ones(5, dtype=torch.long)).item() == pytest.approx(0.25, abs=1e-6)


def test_curves_start_and_end_at_the_expected_images() -> None:
    model, images, maps, targets = region_setup(batch=2)
    baseline = torch.tensor([0.5, 0.2, 0.9]).view(3, 1, 1)
    fractions, scores = deletion_curve(model, images, maps, targets, steps=5, baseline=baseline)
    # 64 pixels, ceil(64 / 5) = 13 per step: the last step replaces the remaining 12.
    torch.testing.assert_close(fractions, torch.tensor([0, 13, 26, 39, 52, 64]) / 64)
    with torch.no_grad():
        original = model(images).softmax(dim=1)[:, 0]
        deleted = model(baseline.expand_as(images)).softmax(dim=1)[:, 0]
    torch.testing.assert_close(scores[:, 0], original)
    torch.testing.assert_close(scores[:, -1], deleted)

    _, inserted = insertion_curve(model, images, maps, targets, steps=4, blur_kernel_size=1)
    # A 1-pixel kernel does not blur, so every point sees the original image.
    torch.testing.assert_close(inserted, original[:, None].expand(-1, 5))


@pytest.mark.parametrize("metric_class", [DeletionAUC, InsertionAUC])
def test_chunking_and_split_updates_do_not_change_the_result(metric_class: type[Metric]) -> None:
    model, images, maps, targets = region_setup(batch=6)
    whole = metric_class(model, steps=10, batch_size=1000)
    whole.update(images, maps, targets)
    split = metric_class(model, steps=10, batch_size=7)
    for part in range(3):
        rows = slice(2 * part, 2 * part + 2)
        split.update(images[rows], maps[rows], targets[rows])
    assert split.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)


@pytest.mark.parametrize("metric_class", [PointingGame, EnergyPointingGame])
def test_pointing_games_agree_between_one_batch_and_split_updates(metric_class: type[Metric]) -> None:
    masks = square_masks(6, 8, top=1, left=3, side=4)
    maps = torch.rand(6, 8, 8)
    whole = metric_class()
    whole.update(maps, masks)
    split = metric_class()
    for part in range(3):
        split.update(maps[2 * part : 2 * part + 2], masks[2 * part : 2 * part + 2])
    assert split.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)


def test_model_is_restored_and_kept_out_of_the_metric_state() -> None:
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4
    )
    model.train()
    model.blocks[0].eval()  # a partly frozen model must come back exactly as it was
    flags = [module.training for module in model.modules()]
    metric = DeletionAUC(model, steps=4, batch_size=4)
    images, maps = torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4)

    value = metric(images, maps, torch.tensor([1, 3])).item()
    assert 0.0 <= value <= 1.0
    assert [module.training for module in model.modules()] == flags
    assert all(parameter.grad is None for parameter in model.parameters())
    assert list(metric.children()) == [] and list(metric.parameters()) == []
    assert set(metric.metric_state) == {"auc_sum", "total"}
    assert metric.model is model

    with pytest.raises(ValueError, match="`targets`"):
        metric(images, maps, torch.tensor([1, 4]))
    assert [module.training for module in model.modules()] == flags


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: PointingGame(tolerance=-1), "`tolerance`"),
        (lambda: PointingGame()(torch.rand(2, 4, 4), torch.ones(2, 4, 4)), "`masks`"),
        (lambda: PointingGame()(torch.rand(3, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool)), "`maps`"),
        (lambda: EnergyPointingGame()(torch.rand(2, 1, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool)), "`maps`"),
        (lambda: DeletionAUC(nn.Identity(), steps=0), "`steps`"),
        (lambda: DeletionAUC(nn.Identity(), batch_size=0), "`batch_size`"),
        (lambda: InsertionAUC(nn.Identity(), blur_kernel_size=4), "`blur_kernel_size`"),
        (lambda: InsertionAUC(nn.Identity(), blur_sigma=0.0), "`blur_sigma`"),
        (
            lambda: deletion_curve(nn.Identity(), torch.rand(2, 3, 4), torch.rand(2, 4, 4), torch.zeros(2).long()),
            "`images`",
        ),
        (
            lambda: deletion_curve(nn.Identity(), torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4), torch.zeros(3).long()),
            "`targets`",
        ),
        (
            lambda: deletion_curve(nn.Identity(), torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4), -torch.ones(2).long()),
            "`targets`",
        ),
        (
            lambda: deletion_curve(
                nn.Identity(),
                torch.rand(2, 1, 4, 4),
                torch.rand(2, 4, 4),
                torch.zeros(2).long(),
                baseline=torch.zeros(3),
            ),
            "`baseline`",
        ),
        (
            lambda: deletion_curve(nn.Identity(), torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4), torch.zeros(2).long()),
            "`model`",
        ),
    ],
)
def test_bad_inputs_raise_one_line_errors_naming_the_argument(call: object, argument: str) -> None:
    with pytest.raises(ValueError, match=argument) as error:
        call()  # type: ignore[operator]
    assert "\n" not in str(error.value)


def test_non_module_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="`model`"):
        DeletionAUC(lambda x: x)  # type: ignore[arg-type]
