from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from gmar_lightning.metrics import (
    ROAD,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    PointingGame,
    SaliencySegmentation,
    TokenPerturbationAUC,
    average_precision,
    deletion_curve,
    energy_shares,
    insertion_curve,
    noisy_linear_imputation,
    patch_masks,
    pointing_hits,
    road_curve,
    saliency_segmentation,
    token_perturbation_curve,
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


# ---------------------------------------------------------------- shared ties, patch-level pointing


def test_pointing_hits_share_tied_maxima() -> None:
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, :2, :] = True  # the top half: area share 0.5
    flat = torch.zeros(3, 4, 4)
    flat[1, 0, 0] = flat[1, 3, 3] = 1.0  # two maxima, one on the object
    flat[2, 0, :3] = 1.0  # three maxima, all on the object
    hits = pointing_hits(flat, masks)
    assert hits.tolist() == [0.5, 0.5, 1.0]
    # The old first-in-row-major rule would have scored the constant map 1.0 (pixel (0, 0) is on the object).
    assert PointingGame()(flat[:1], masks[:1]).item() == 0.5


def test_pointing_hits_is_nan_for_empty_masks_and_tolerance_dilates() -> None:
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 0, 0] = True
    maps = torch.zeros(2, 5, 5)
    maps[:, 2, 2] = 1.0
    hits = pointing_hits(maps, masks, tolerance=2)
    assert hits[0].item() == 1.0 and math.isnan(hits[1].item())
    assert pointing_hits(maps, masks, tolerance=1)[0].item() == 0.0


def test_a_constant_map_scores_the_area_share_and_patch_level_pointing_ignores_upsampling() -> None:
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(6, 16, 16, generator=generator) < 0.3
    area_share = masks.flatten(1).float().mean(dim=1)
    torch.testing.assert_close(pointing_hits(torch.zeros(6, 16, 16), masks), area_share)

    token_maps = torch.rand(6, 4, 4, generator=generator)
    patches = patch_masks(masks, (4, 4))
    # Reference: the peak token's 4x4 block of the mask, checked with plain loops.
    for image in range(6):
        row, col = divmod(int(token_maps[image].argmax()), 4)
        expected = bool(masks[image, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].any())
        assert pointing_hits(token_maps[image : image + 1], patches[image : image + 1]).item() == float(expected)


def test_patch_masks_rejects_a_grid_that_does_not_divide_the_masks() -> None:
    with pytest.raises(ValueError, match="`grid_size`") as error:
        patch_masks(torch.zeros(1, 6, 6, dtype=torch.bool), (4, 4))
    assert "\n" not in str(error.value)


def test_energy_shares_per_image_match_the_metric() -> None:
    masks = square_masks(4, 8, top=1, left=2, side=3)
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    shares = energy_shares(maps, masks)
    assert shares.mean().item() == pytest.approx(EnergyPointingGame()(maps, masks).item(), abs=1e-6)


# ---------------------------------------------------------------- Chefer et al.'s segmentation test


def test_average_precision_hand_computed_with_ties() -> None:
    # Scores 3, 2, 2, 1 with labels 1, 0, 1, 0: thresholds 3 (P 1, R 1/2), 2 (P 2/3, R 1), 1 (R unchanged).
    maps = torch.tensor([[[3.0, 2.0], [2.0, 1.0]]])
    masks = torch.tensor([[[True, False], [True, False]]])
    assert average_precision(maps, masks).item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(maps, torch.zeros_like(masks)).item())


def test_average_precision_agrees_with_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    # Quantised scores, so that many pixels tie.
    maps = (torch.rand(5, 12, 12, generator=generator) * 6).floor()
    masks = torch.rand(5, 12, 12, generator=generator) < 0.25
    ours = average_precision(maps, masks)
    for image in range(5):
        reference = sklearn_metrics.average_precision_score(
            masks[image].flatten().numpy(), maps[image].flatten().numpy()
        )
        assert ours[image].item() == pytest.approx(reference, abs=1e-6)


def test_segmentation_test_agrees_with_scikit_learn_on_pooled_pixels() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 2, 2, generator=generator)  # token maps, resized to the masks like the other metrics
    masks = torch.rand(4, 8, 8, generator=generator) < 0.3
    resized = torch.nn.functional.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    predicted = (resized > resized.mean(dim=(1, 2), keepdim=True)).flatten().numpy()
    truth = masks.flatten().numpy()
    metric = SaliencySegmentation()
    metric.update(maps[:2], masks[:2])
    metric.update(maps[2:], masks[2:])
    scores = metric.compute()
    assert scores["pixel_accuracy"].item() == pytest.approx(sklearn_metrics.accuracy_score(truth, predicted))
    iou = sklearn_metrics.jaccard_score(truth, predicted, average=None)
    assert scores["miou"].item() == pytest.approx(iou.mean())
    ap = [
        sklearn_metrics.average_precision_score(masks[i].flatten().numpy(), resized[i].flatten().numpy())
        for i in range(4)
    ]
    assert scores["map"].item() == pytest.approx(sum(ap) / 4, abs=1e-6)
    functional = saliency_segmentation(maps, masks)
    for name in scores:
        assert functional[name].item() == pytest.approx(scores[name].item(), abs=1e-6)


# ---------------------------------------------------------------- Chefer et al.'s token perturbation


class QuadrantEvidence(nn.Module):
    """Class 0 while the mean of the top-left quadrant stays above 0.6, else class 1."""

    def forward(self, x: Tensor) -> Tensor:
        evidence = x[..., :4, :4].mean(dim=(1, 2, 3))
        return torch.stack([evidence - 0.6, torch.zeros_like(evidence)], dim=1)


def test_token_perturbation_hand_computed() -> None:
    images = torch.ones(1, 1, 8, 8)
    token_maps = torch.zeros(1, 4, 4)
    token_maps[0, :2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # the top-left quadrant's 4 patches rank first
    fractions = (1 / 16, 2 / 16, 3 / 16)
    _, positive = token_perturbation_curve(QuadrantEvidence(), images, token_maps, torch.tensor([0]), fractions)
    # 1 patch of 4 gone: mean 0.75 > 0.6; 2 gone: 0.5; 3 gone: 0.25.
    assert positive.tolist() == [[1.0, 0.0, 0.0]]
    _, negative = token_perturbation_curve(
        QuadrantEvidence(), images, token_maps, torch.tensor([0]), fractions, negative=True
    )
    assert negative.tolist() == [[1.0, 1.0, 1.0]]
    metric = TokenPerturbationAUC(QuadrantEvidence(), fractions=fractions)
    metric.update(images, token_maps, torch.tensor([0]))
    assert metric.compute().item() == pytest.approx(0.25)  # (1 + 0) / 2 * (1/16) / (2/16)


def _reference_token_perturbation(model, images, token_maps, targets, fractions, negative):  # type: ignore[no-untyped-def]
    """Chefer et al.'s procedure, one image and one fraction at a time, written out with loops."""
    grid_h, grid_w = token_maps.shape[-2:]
    patch_h, patch_w = images.shape[-2] // grid_h, images.shape[-1] // grid_w
    rows = []
    for image, relevance, target in zip(images, token_maps, targets, strict=True):
        flat = relevance.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (flat[i] if negative else -flat[i], i))
        row = []
        for fraction in fractions:
            perturbed = image.clone()
            for token in order[: int(fraction * len(flat) + 1e-9)]:
                r, c = divmod(token, grid_w)
                perturbed[:, r * patch_h : (r + 1) * patch_h, c * patch_w : (c + 1) * patch_w] = 0.0
            with torch.no_grad():
                row.append(float(model(perturbed[None]).argmax(dim=1).item() == target))
        rows.append(row)
    return torch.tensor(rows)


def tiny_vit(img_size: int, seed: int) -> nn.Module:
    """A random one-block ViT with 4-pixel patches and 3 classes, in eval mode."""
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3
    ).eval()


@pytest.mark.parametrize("negative", [False, True])
def test_token_perturbation_agrees_with_a_loop_reference_on_a_vit(negative: bool) -> None:
    model = tiny_vit(16, seed=0)
    images = torch.randn(4, 3, 16, 16)
    token_maps = torch.rand(4, 4, 4)
    targets = model(images).argmax(dim=1)
    fractions = (0.1, 0.3, 0.5, 0.9)
    _, ours = token_perturbation_curve(model, images, token_maps, targets, fractions, negative, batch_size=5)
    expected = _reference_token_perturbation(model, images, token_maps, targets, fractions, negative)
    torch.testing.assert_close(ours, expected)


# ---------------------------------------------------------------- ROAD


def _reference_imputation(image: Tensor, keep: Tensor) -> Tensor:
    """ROAD's noiseless linear imputation from its definition, with scipy's sparse direct solver."""
    sparse = pytest.importorskip("scipy.sparse")
    linalg = pytest.importorskip("scipy.sparse.linalg")
    import numpy as np

    height, width = keep.shape
    neighbours = [(-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6)]
    neighbours += [(1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12)]
    unknown = [(r, c) for r in range(height) for c in range(width) if not keep[r, c]]
    index = {pixel: i for i, pixel in enumerate(unknown)}
    system = sparse.lil_matrix((len(unknown), len(unknown)))
    values = image.double().numpy()
    rhs = np.zeros((len(unknown), values.shape[0]))
    for i, (r, c) in enumerate(unknown):
        for dr, dc, weight in neighbours:
            rr, cc = r + dr, c + dc
            if 0 <= rr < height and 0 <= cc < width:
                system[i, i] += weight
                if keep[rr, cc]:
                    rhs[i] += weight * values[:, rr, cc]
                else:
                    system[i, index[(rr, cc)]] -= weight
    solution = linalg.spsolve(system.tocsc(), rhs)
    result = values.copy()
    for i, (r, c) in enumerate(unknown):
        result[:, r, c] = solution[i]
    return torch.from_numpy(result).float()


def test_noisy_linear_imputation_agrees_with_a_sparse_direct_solve() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 12, 12, generator=generator)
    keep = torch.rand(3, 12, 12, generator=generator) < 0.4
    keep[2, 3:10, 2:11] = False  # one large hole
    ours = noisy_linear_imputation(images, keep, noise_std=0.0, tolerance=1e-7)
    for image in range(3):
        torch.testing.assert_close(ours[image], _reference_imputation(images[image], keep[image]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[keep[:, None].expand_as(ours)], images[keep[:, None].expand_as(images)])


def test_imputation_noise_touches_only_removed_pixels_and_has_the_given_spread() -> None:
    images = torch.zeros(1, 3, 32, 32)
    keep = torch.ones(1, 32, 32, dtype=torch.bool)
    keep[0, 8:24, 8:24] = False
    noisy = noisy_linear_imputation(images, keep, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[0, :, keep[0]], images[0, :, keep[0]])
    assert noisy[0, :, ~keep[0]].std().item() == pytest.approx(0.5, rel=0.1)


def test_road_curve_agrees_with_a_loop_reference() -> None:
    model = tiny_vit(12, seed=1)
    images = torch.randn(3, 3, 12, 12)
    maps = torch.rand(3, 12, 12)
    targets = model(images).argmax(dim=1)
    fractions = (0.2, 0.6)
    for most_relevant_first in (True, False):
        _, ours = road_curve(model, images, maps, targets, fractions, most_relevant_first, noise_std=0.0)
        for image in range(3):
            order = maps[image].flatten().argsort(descending=most_relevant_first, stable=True)
            for column, fraction in enumerate(fractions):
                keep = torch.ones(144, dtype=torch.bool)
                keep[order[: int(fraction * 144)]] = False
                imputed = _reference_imputation(images[image], keep.view(12, 12))
                with torch.no_grad():
                    expected = float(model(imputed[None]).argmax().item() == targets[image].item())
                assert ours[image, column].item() == expected


def test_road_metric_is_reproducible_and_split_updates_agree() -> None:
    model, images, maps, targets = region_setup(batch=4)
    # Only the evidence quadrant is bright, so imputing it from its neighbours removes the evidence.
    images[..., 4:] = 0.0
    images[..., 4:, :] = 0.0
    whole = ROAD(model, fractions=(0.2, 0.5, 0.8), seed=3)
    whole.update(images, maps, targets)
    again = ROAD(model, fractions=(0.2, 0.5, 0.8), seed=3)
    again.update(images, maps, targets)
    assert whole.compute().item() == again.compute().item()
    # The evidence quadrant ranked first: removing it first (MoRF) hurts more than removing it last (LeRF).
    lerf = ROAD(model, most_relevant_first=False, fractions=(0.2, 0.5, 0.8), seed=3)
    lerf.update(images, maps, targets)
    assert whole.compute().item() < lerf.compute().item()
    split = ROAD(model, fractions=(0.2, 0.5, 0.8), seed=3, batch_size=5)
    split.update(images[:2], maps[:2], targets[:2])
    split.update(images[2:], maps[2:], targets[2:])
    assert split.total.item() == 4 and 0.0 <= split.compute().item() <= 1.0


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: TokenPerturbationAUC(nn.Identity(), fractions=(0.5, 0.2)), "`fractions`"),
        (lambda: ROAD(nn.Identity(), fractions=()), "`fractions`"),
        (lambda: ROAD(nn.Identity(), fractions=(1.5,)), "`fractions`"),
        (lambda: ROAD(nn.Identity(), noise_std=-0.1), "`noise_std`"),
        (lambda: noisy_linear_imputation(torch.rand(1, 3, 4, 4), torch.ones(1, 4, 4)), "`keep`"),
        (
            lambda: noisy_linear_imputation(torch.rand(1, 3, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), -1.0),
            "`noise_std`",
        ),
        (
            lambda: token_perturbation_curve(
                nn.Identity(), torch.rand(1, 3, 6, 6), torch.rand(1, 4, 4), torch.zeros(1).long()
            ),
            "`token_maps`",
        ),
    ],
)
def test_new_protocols_reject_bad_arguments_in_one_line(call: object, argument: str) -> None:
    with pytest.raises(ValueError, match=argument) as error:
        call()  # type: ignore[operator]
    assert "\n" not in str(error.value)
