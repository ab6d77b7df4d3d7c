"""Head masking, Michel et al. importance, head ranking and ablation curves on tiny timm ViTs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gmar_lightning.capture import find_attention_layers
from gmar_lightning.explanation import Explanation
from gmar_lightning.heads import (
    AblationCurve,
    attention_head_grid,
    head_ablation_curve,
    head_mask,
    mask_from_order,
    michel_importance,
    plot_ablation_curves,
    random_order,
    rank_heads,
)
from gmar_lightning.trajectory import HeadTrajectory
from tests.models import TINY, make_images, make_model, sharpen

FAMILIES = ("vit", "beit", "eva")
NUM_LAYERS, NUM_HEADS = TINY["depth"], TINY["num_heads"]


def make_scale_norm_eva() -> nn.Module:
    """EVA whose attention normalises the concatenated heads before `proj` (the documented limitation)."""
    torch.manual_seed(0)
    return sharpen(Eva(scale_attn_inner=True, **TINY)).eval()


def models_under_test() -> list[tuple[str, nn.Module]]:
    return [(family, make_model(family)) for family in FAMILIES] + [("eva_scale_norm", make_scale_norm_eva())]


def zero_proj_columns(model: nn.Module, mask: Tensor) -> nn.Module:
    """A copy whose `proj` weight columns of head h in layer l are scaled by mask[l, h]: the reference masking."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, row in zip(find_attention_layers(reference), mask, strict=True):
            weight = layer.module.proj.weight
            weight.mul_(row.repeat_interleave(weight.shape[1] // row.numel()))
    return reference


def labelled_loader(num_samples: int = 12, batch_size: int = 4, with_masks: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(num_samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, TINY["num_classes"], (num_samples,), generator=generator)
    tensors = (images, labels, torch.ones(num_samples, 32, 32)) if with_masks else (images, labels)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------
# head_mask
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_mask_is_bit_identical_with_fused_attention(family: str) -> None:
    model = make_model(family)
    assert all(layer.module.fused_attn for layer in find_attention_layers(model))
    images = make_images(family)
    expected = model(images)
    for ones in (torch.ones(NUM_LAYERS, NUM_HEADS), torch.ones(NUM_LAYERS, NUM_HEADS, dtype=torch.bool)):
        with head_mask(model, ones):
            assert torch.equal(model(images), expected)


def test_masking_equals_scaling_proj_columns_and_changes_output() -> None:
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 1.0]])
    for family, model in models_under_test():
        images = make_images("vit")
        unmasked = model(images)
        with head_mask(model, mask):
            masked = model(images)
        assert torch.allclose(masked, zero_proj_columns(model, mask)(images), atol=1e-5), family
        assert not torch.allclose(masked, unmasked, atol=1e-3), family


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_every_head_of_a_layer_leaves_only_the_proj_bias(family: str) -> None:
    model, images = make_model(family), make_images(family)
    target = find_attention_layers(model)[1].module
    with torch.no_grad():
        target.proj.bias.normal_()  # a non-zero bias, so the reference is not just "attention output = 0"

    def bias_only(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return module.proj.bias.expand_as(output)

    handle = target.register_forward_hook(bias_only)
    try:
        expected = model(images)
    finally:
        handle.remove()
    mask = torch.ones(NUM_LAYERS, NUM_HEADS)
    mask[1] = 0
    with head_mask(model, mask):
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_head_mask_restores_the_model_on_exit_and_on_error() -> None:
    model, images = make_model("vit"), make_images("vit")
    model.train()
    state = copy.deepcopy(model.state_dict())
    mask = torch.zeros(NUM_LAYERS, NUM_HEADS)
    with head_mask(model, mask):
        pass
    with pytest.raises(RuntimeError, match="boom"), head_mask(model, mask):
        raise RuntimeError("boom")
    for layer in find_attention_layers(model):
        assert not layer.module.proj._forward_pre_hooks
        assert layer.module.fused_attn
    assert model.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    model.eval()
    assert torch.equal(model(images), make_model("vit")(images))


def test_head_mask_passes_gradients_to_a_mask_that_requires_grad() -> None:
    model, images = make_model("vit"), make_images("vit")
    mask = torch.ones(NUM_LAYERS, NUM_HEADS, requires_grad=True)
    with head_mask(model, mask):
        model(images).sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (torch.ones(NUM_HEADS, NUM_LAYERS), ValueError, r"`mask` must have shape \[L, H\] = \[3, 4\].*got \[4, 3\]"),
        (torch.ones(NUM_LAYERS * NUM_HEADS), ValueError, r"`mask` must have shape \[L, H\]"),
        (torch.full((NUM_LAYERS, NUM_HEADS), float("nan")), ValueError, "`mask` must contain only finite values"),
        ("all", TypeError, "`mask` must be a tensor or array, got str"),
    ],
)
def test_head_mask_rejects_bad_masks_in_one_line(mask: object, error: type[Exception], message: str) -> None:
    model = make_model("vit")
    with pytest.raises(error, match=message) as raised, head_mask(model, mask):  # type: ignore[arg-type]
        pass
    assert "\n" not in str(raised.value)
    assert all(not layer.module.proj._forward_pre_hooks for layer in find_attention_layers(model))


def test_attention_head_grid_and_mask_from_order() -> None:
    assert attention_head_grid(make_model("beit")) == (NUM_LAYERS, NUM_HEADS)
    order = random_order(NUM_LAYERS, NUM_HEADS, seed=4)
    mask = mask_from_order(order, 5, NUM_LAYERS, NUM_HEADS)
    assert mask.sum() == NUM_LAYERS * NUM_HEADS - 5
    assert (mask[order[:5, 0], order[:5, 1]] == 0).all()
    with pytest.raises(ValueError, match=r"`count` must be an integer in \[0, 12\]"):
        mask_from_order(order, 13, NUM_LAYERS, NUM_HEADS)
    with pytest.raises(ValueError, match="`order` must list every"):
        mask_from_order(torch.zeros(12, 2, dtype=torch.long), 1, NUM_LAYERS, NUM_HEADS)


# ---------------------------------------------------------------------------------------------------------------
# michel_importance
# ---------------------------------------------------------------------------------------------------------------


def per_example_michel_reference(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """E_x |dL(x)/d xi| from one backward pass per example, with xi scaling the `proj` weight columns."""
    layers = find_attention_layers(model)
    parameters = dict(model.named_parameters())
    rows = []
    for image, label in zip(images, labels, strict=True):
        xi = torch.ones(len(layers), NUM_HEADS, requires_grad=True)
        gated = dict(parameters)
        for index, layer in enumerate(layers):
            weight = parameters[f"{layer.name}.proj.weight"]
            gated[f"{layer.name}.proj.weight"] = weight * xi[index].repeat_interleave(weight.shape[1] // NUM_HEADS)
        logits = torch.func.functional_call(model, gated, (image[None],))
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, label[None]), xi)
        rows.append(grad.abs())
    return torch.stack(rows).mean(dim=0)


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_michel_importance_equals_a_per_example_reference(family: str) -> None:
    model = make_model(family)
    images, labels = make_images(family, batch=3), torch.tensor([0, 3, 1])
    expected = per_example_michel_reference(model, images, labels)
    raw = michel_importance(model, [(images, labels)], normalize_per_layer=False, progress=False)
    assert raw.shape == (NUM_LAYERS, NUM_HEADS)
    assert torch.allclose(raw, expected, rtol=1e-4, atol=1e-7)
    normalized = michel_importance(model, [(images[:2], labels[:2]), (images[2:], labels[2:])], progress=False)
    assert torch.allclose(normalized, expected / expected.norm(dim=-1, keepdim=True), rtol=1e-4)


def test_michel_importance_leaves_grads_and_training_flags_alone() -> None:
    model = make_model("vit").train()
    model.patch_embed.eval()  # a partially frozen model must come back exactly as it was
    model.set_grad_checkpointing(True)  # switched off for the call (checkpointing would hide the gate), then restored
    existing_grad = torch.randn_like(model.head.weight)
    model.head.weight.grad = existing_grad.clone()
    importance = michel_importance(model, labelled_loader(), progress=True)
    assert (importance >= 0).all() and importance.sum() > 0
    assert torch.equal(model.head.weight.grad, existing_grad)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")
    assert model.training and model.blocks[0].training and not model.patch_embed.training
    assert model.grad_checkpointing is True


def test_michel_importance_works_under_inference_mode_and_no_grad() -> None:
    model = make_model("eva")
    expected = michel_importance(model, labelled_loader(), progress=False)
    with torch.inference_mode():
        batches = list(labelled_loader())  # inference tensors, which autograd cannot save
        assert torch.allclose(michel_importance(model, batches, progress=False), expected)
    with torch.no_grad():
        assert torch.allclose(michel_importance(model, labelled_loader(), progress=False), expected)


def test_michel_importance_reads_three_element_batches_and_stops_at_max_batches() -> None:
    model = make_model("vit")
    first_batch = next(iter(labelled_loader()))
    expected = michel_importance(model, [first_batch], progress=False)
    limited = michel_importance(model, labelled_loader(with_masks=True), max_batches=1, progress=False)
    assert torch.allclose(limited, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_fn": F.cross_entropy}, r"`loss_fn` must return per-example losses of shape \[4\]"),
        ({"max_batches": 0}, "`max_batches` must be a positive integer or None, got 0"),
    ],
)
def test_michel_importance_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    model = make_model("vit").train()
    with pytest.raises(ValueError, match=message):
        michel_importance(model, labelled_loader(), progress=False, **kwargs)  # type: ignore[arg-type]
    assert model.training
    assert all(not layer.module.proj._forward_pre_hooks for layer in find_attention_layers(model))


def test_michel_importance_rejects_batches_without_labels() -> None:
    with pytest.raises(TypeError, match=r"`dataloader` must yield \(images, labels\)"):
        michel_importance(make_model("vit"), [make_images("vit")], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# rank_heads and random_order
# ---------------------------------------------------------------------------------------------------------------


def test_rank_heads_orders_tensors_and_arrays_with_deterministic_ties() -> None:
    importance = torch.tensor([[0.3, 0.1, 0.3], [0.1, 0.9, 0.0]])
    expected = [[1, 2], [0, 1], [1, 0], [0, 0], [0, 2], [1, 1]]
    assert rank_heads(importance).tolist() == expected
    assert rank_heads(importance.numpy()).tolist() == expected
    assert rank_heads(importance, least_important_first=False).tolist() == [
        [1, 1],
        [0, 0],
        [0, 2],
        [0, 1],
        [1, 0],
        [1, 2],
    ]
    assert rank_heads(np.zeros((2, 2))).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_rank_heads_uses_the_batch_mean_of_an_explanation() -> None:
    head_weights = torch.tensor([[[0.1, 0.9], [0.6, 0.4]], [[0.5, 0.5], [0.0, 1.0]]])
    explanation = Explanation(
        "gmar_l1", torch.zeros(2, 2, 2), torch.zeros(2, 8, 8), torch.zeros(2), torch.zeros(2, 3), head_weights
    )
    assert torch.equal(rank_heads(explanation), rank_heads(head_weights.mean(dim=0)))
    assert rank_heads(explanation).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    rollout = Explanation("rollout", torch.zeros(1, 2, 2), torch.zeros(1, 8, 8), torch.zeros(1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="`importance` is a 'rollout' Explanation without head weights"):
        rank_heads(rollout)


def test_rank_heads_reads_a_head_trajectory_by_epoch() -> None:
    trajectory = HeadTrajectory()
    trajectory.append(0, 10, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.ones(2, 2))
    trajectory.append(1, 20, torch.tensor([[0.1, 0.9], [0.7, 0.3]]), torch.ones(2, 2))
    assert rank_heads(trajectory).tolist() == [[0, 0], [1, 1], [1, 0], [0, 1]]
    assert torch.equal(rank_heads(trajectory, epoch=0), rank_heads(trajectory.weights[0]))
    assert torch.equal(rank_heads(trajectory, epoch="mean"), rank_heads(trajectory.weights.mean(dim=0)))
    with pytest.raises(ValueError, match="`epoch` must be 'mean' or an integer index into 2 recorded epochs"):
        rank_heads(trajectory, epoch=2)
    with pytest.raises(ValueError, match=r"`importance.weights` must have shape \[E, L, H\] with E >= 1"):
        rank_heads(HeadTrajectory())


@pytest.mark.parametrize(
    ("importance", "error", "message"),
    [
        ([[0.1, 0.2]], TypeError, "`importance` must be an \\[L, H\\] tensor/array"),
        (torch.ones(2, 2, 2), ValueError, r"`importance` must have shape \[L, H\]"),
        (torch.full((1, 2), float("nan")), ValueError, "`importance` is all NaN; NaN marks a missing head"),
    ],
)
def test_rank_heads_rejects_bad_importance(importance: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        rank_heads(importance)


def test_random_order_is_a_seeded_permutation() -> None:
    order = random_order(3, 4, seed=7)
    assert sorted(map(tuple, order.tolist())) == [(layer, head) for layer in range(3) for head in range(4)]
    assert torch.equal(order, random_order(3, 4, seed=7))
    assert not torch.equal(order, random_order(3, 4, seed=8))
    with pytest.raises(ValueError, match="`num_heads` must be a positive integer, got 0"):
        random_order(3, 0)


# ---------------------------------------------------------------------------------------------------------------
# head_ablation_curve, AblationCurve, plots, atomic writes
# ---------------------------------------------------------------------------------------------------------------


def accuracy_and_loss(model: nn.Module, loader: DataLoader, mask: Tensor) -> tuple[float, float]:
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad(), head_mask(model, mask):
        for images, labels in loader:
            logits = model(images)
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return correct / count, loss / count


def test_head_ablation_curve_matches_direct_evaluation_and_restores_the_model() -> None:
    model, loader = make_model("vit").train(), labelled_loader()
    order = random_order(NUM_LAYERS, NUM_HEADS, seed=1)
    curve = head_ablation_curve(model, loader, order, (0.0, 0.25, 1.0), order_name="random", progress=False)
    assert model.training
    assert curve.fractions == [0.0, 0.25, 1.0] and curve.num_masked == [0, 3, 12] and curve.order_name == "random"
    model.eval()
    for index, count in enumerate(curve.num_masked):
        accuracy, loss = accuracy_and_loss(model, loader, mask_from_order(order, count, NUM_LAYERS, NUM_HEADS))
        assert curve.accuracy[index] == pytest.approx(accuracy)
        assert curve.loss[index] == pytest.approx(loss, rel=1e-5)
    assert curve.loss[0] != pytest.approx(curve.loss[-1])


def test_head_ablation_curve_defaults_and_max_batches() -> None:
    model = make_model("beit")
    curve = head_ablation_curve(
        model, labelled_loader(with_masks=True), rank_heads(torch.rand(NUM_LAYERS, NUM_HEADS)), max_batches=1
    )
    assert curve.fractions == [i / 10 for i in range(11)]
    assert curve.num_masked == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]
    first_batch = DataLoader(TensorDataset(*next(iter(labelled_loader()))), batch_size=4)
    assert curve.accuracy[0] == pytest.approx(accuracy_and_loss(model, first_batch, torch.ones(3, 4))[0])


@pytest.mark.parametrize(
    ("order", "fractions", "message"),
    [
        (torch.zeros(12, 2), (0.0, 1.0), r"`order` must be 12 integer \(layer, head\) pairs"),
        (random_order(3, 4), (0.5, 0.1), r"`fractions` must be distinct increasing numbers in \[0, 1\]"),
        (random_order(3, 4), (0.0, 1.5), r"`fractions` must be distinct increasing numbers in \[0, 1\]"),
    ],
)
def test_head_ablation_curve_rejects_bad_arguments(order: Tensor, fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        head_ablation_curve(make_model("vit"), labelled_loader(), order, fractions, progress=False)


def test_ablation_curve_round_trips_through_json_and_csv_and_plots(tmp_path: Path) -> None:
    curve = AblationCurve([0.0, 0.5, 1.0], [0, 6, 12], [0.75, 1 / 3, 0.1], [0.5, 1.25, 2 / 7], "gmar, l1")
    json_path, csv_path = tmp_path / "curves" / "gmar.json", tmp_path / "gmar.csv"
    curve.save_json(json_path)
    curve.save_csv(csv_path)
    assert AblationCurve.load_json(json_path) == curve
    assert AblationCurve.load_csv(csv_path) == curve
    assert csv_path.read_text().splitlines()[0] == "order_name,fraction,num_masked,accuracy,loss"
    baseline = AblationCurve([0.0, 1.0], [0, 12], [0.75, 0.2], [0.5, 2.0], "random")
    figure = plot_ablation_curves([curve, baseline], tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert figure.axes[0].get_legend_handles_labels()[1] == ["gmar, l1", "random"]
    assert sorted(os.listdir(tmp_path)) == ["ablation.png", "curves", "gmar.csv"]  # no temp files left behind
    with pytest.raises(TypeError, match="`curves` must be a non-empty list of AblationCurve"):
        plot_ablation_curves([])
