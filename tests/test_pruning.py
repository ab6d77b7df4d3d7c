"""Structural head pruning: exact against masking on every family, costs, state dicts and optimizer state."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from timm.layers.attention import Attention
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gmar_lightning import explain
from gmar_lightning.heads import (
    attention_head_grid,
    head_ablation_curve,
    head_mask,
    michel_importance,
    random_order,
    rank_heads,
)
from gmar_lightning.heads.pruning import (
    distillation_loss,
    head_counts,
    head_ids,
    prune_gradually,
    prune_heads,
    pruning_spec,
    restore_pruning,
    slice_optimizer_state,
    weight_magnitude_importance,
)
from tests.models import FAMILIES, TINY, make_images, sharpen
from tests.reference import capture_full, zeroed_output_columns

DIM, DEPTH, HEADS = TINY["embed_dim"], TINY["depth"], TINY["num_heads"]
HEAD_DIM = DIM // HEADS


def gated_vit() -> nn.Module:
    model = VisionTransformer(**TINY)
    for block in model.blocks:
        block.attn = Attention(DIM, HEADS, qkv_bias=True, gated=True)
    return model


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    **FAMILIES,
    "vit_qk_norm": lambda: VisionTransformer(qk_norm=True, **TINY),
    "vit_gated": gated_vit,
    "beit_qkv_bias": lambda: Beit(use_rel_pos_bias=True, qkv_bias=True, **TINY),
    "beit_shared_rel_pos": lambda: Beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **TINY),
    "eva_unfused_qkv": lambda: Eva(use_rot_pos_emb=True, qkv_fused=False, **TINY),
    "eva_qk_norm": lambda: Eva(use_rot_pos_emb=True, qk_norm=True, **TINY),
}

# Older timm has no such model to prune.
NEEDS_EVA_QK_NORM = pytest.mark.skipif(
    "qk_norm" not in inspect.signature(Eva).parameters, reason="Eva's qk_norm needs timm >= 1.0.30"
)

# Ragged on purpose: 2, 0 and 3 heads remain; layer 1 loses every head.
KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])


def make(variant: str, seed: int = 0) -> nn.Module:
    """A tiny random model whose biases are non-zero too, so bias slicing mistakes show."""
    torch.manual_seed(seed)
    model = sharpen(VARIANTS[variant](), seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name.endswith("bias_table"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "fused_attn") and hasattr(module, "proj")]


def zeroed_proj_columns(model: nn.Module, keep: Tensor) -> nn.Module:
    """Reference masking, written independently of the package: zero `proj`'s input columns of the dropped heads."""
    reference = copy.deepcopy(model)
    zeroed_output_columns(attention_modules(reference), keep, HEAD_DIM, "proj")
    return reference


def images_for(variant: str) -> Tensor:
    return make_images(variant if variant in FAMILIES else "vit")


@pytest.mark.parametrize(
    "variant",
    [pytest.param(name, marks=NEEDS_EVA_QK_NORM) if name == "eva_qk_norm" else name for name in sorted(VARIANTS)],
)
def test_pruned_model_equals_masked_model_with_fused_and_unfused_attention(variant: str) -> None:
    model, images = make(variant), images_for(variant)
    masked = zeroed_proj_columns(model, KEEP)
    prune_heads(model, KEEP)
    assert head_counts(model) == [2, 0, 3]
    assert all(module.fused_attn for module in attention_modules(model))
    with torch.no_grad():
        expected = masked(images)
        assert torch.allclose(model(images), expected, atol=1e-5)
        for module in attention_modules(model):
            module.fused_attn = False
        assert torch.allclose(model(images), expected, atol=1e-5)
        assert not torch.allclose(make(variant)(images), expected, atol=1e-3)  # the heads did matter


@pytest.mark.parametrize("variant", ["vit", "beit", "eva"])
def test_a_layer_without_heads_outputs_only_the_proj_bias(variant: str) -> None:
    model = make(variant)
    prune_heads(model, {1: range(HEADS)})
    attention = attention_modules(model)[1]
    tokens = torch.randn(2, 17, DIM)
    with torch.no_grad():
        output = attention(tokens)
    assert torch.equal(output, attention.proj.bias.expand(2, 17, DIM))
    assert attention.qkv.weight.shape == (0, DIM) and attention.proj.weight.shape == (DIM, 0)


def test_pruning_in_steps_equals_pruning_at_once_and_heads_keep_their_original_index() -> None:
    at_once, in_steps, images = make("beit"), make("beit"), images_for("beit")
    prune_heads(at_once, {0: [1, 3], 2: [2]})
    prune_heads(in_steps, {0: [3]})
    prune_heads(in_steps, {"blocks.0.attn": [1], 2: [2]})
    assert [ids.tolist() for ids in head_ids(in_steps)] == [[0, 2], [0, 1, 2, 3], [0, 1, 3]]
    assert pruning_spec(in_steps) == {"blocks.0.attn": [1, 3], "blocks.2.attn": [2]}
    with torch.no_grad():
        assert torch.equal(at_once(images), in_steps(images))


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "beit_qkv_bias", "eva"])
def test_parameters_and_flops_drop_by_the_per_head_cost(variant: str) -> None:
    model, images = make(variant), images_for(variant)
    num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens

    def parameters() -> int:
        return sum(parameter.numel() for parameter in model.parameters())

    def flops() -> int:
        for module in attention_modules(model):
            module.fused_attn = False  # the counter sees matmuls, not the fused CPU kernel
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images)
        return counter.get_total_flops()

    attention = attention_modules(model)[0]
    has_qkv_bias = any("bias" in name and "proj" not in name for name, _ in attention.named_parameters())
    rel_pos = getattr(attention, "relative_position_bias_table", None)
    per_head_parameters = (
        4 * DIM * HEAD_DIM + 2 * HEAD_DIM * has_qkv_bias + (rel_pos.shape[0] if rel_pos is not None else 0)
    )
    if isinstance(model, VisionTransformer) and has_qkv_bias:
        per_head_parameters += HEAD_DIM  # timm's ViT learns a k bias; BEiT and EVA fix it at zero
    batch = images.shape[0]
    per_head_flops = batch * (2 * num_tokens * 4 * DIM * HEAD_DIM + 4 * num_tokens * num_tokens * HEAD_DIM)
    before_parameters, before_flops = parameters(), flops()
    prune_heads(model, KEEP)
    removed = int((KEEP == 0).sum())
    assert before_parameters - parameters() == removed * per_head_parameters
    assert before_flops - flops() == removed * per_head_flops


def test_bad_requests_fail_in_one_line_and_leave_the_model_untouched() -> None:
    model = make("vit")
    state = copy.deepcopy(model.state_dict())
    cases = [
        ({5: [0]}, ValueError, r"`heads` key 5 is not an attention layer: use an index in \[0, 2\]"),
        ({"blocks.9.attn": [0]}, ValueError, "`heads` key 'blocks.9.attn' is not an attention layer"),
        ({0: [1], 2: [7]}, ValueError, r"`heads` names head\(s\) \[7\] of layer 2"),
        (torch.ones(DEPTH, HEADS + 1), ValueError, r"keep-mask must have shape \[L, H\] = \[3, 4\]"),
        (torch.full((DEPTH, HEADS), 0.5), ValueError, "keep-mask entries must be 1 \\(keep\\) or 0 \\(remove\\)"),
        ([0, 1], TypeError, "`heads` must be a mapping"),
    ]
    for heads, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            prune_heads(model, heads)
        assert "\n" not in str(raised.value)
    prune_heads(model, {0: [1]})
    with pytest.raises(ValueError, match=r"names head\(s\) \[1\] of layer 0 .* its heads are \[0, 2, 3\]"):
        prune_heads(model, {0: [1]})
    assert head_counts(model) == [3, 4, 4]
    reference = make("vit")
    prune_heads(reference, {0: [1]})
    assert all(torch.equal(value, reference.state_dict()[name]) for name, value in model.state_dict().items())
    assert state.keys() <= model.state_dict().keys()


def test_scale_norm_attention_is_refused_before_anything_changes() -> None:
    model = Eva(scale_attn_inner=True, **TINY).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`heads`: layer `blocks\.1\.attn` normalises the concatenated heads"):
        prune_heads(model, {0: [], 1: [0]})
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_unsupported_attention_is_refused_with_the_supported_classes() -> None:
    model = VisionTransformer(**TINY)

    class OtherAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused_attn, self.attn_drop, self.proj, self.num_heads = True, nn.Dropout(), nn.Linear(DIM, DIM), 4

    model.blocks[0].attn = OtherAttention()
    with pytest.raises(TypeError, match=r"`model` layer `blocks\.0\.attn` is a OtherAttention; prune_heads supports"):
        prune_heads(model, {0: [0]})


@pytest.mark.parametrize("variant", ["vit", "beit_shared_rel_pos", "eva"])
def test_state_dict_carries_the_spec_and_restores_into_a_fresh_model(variant: str, tmp_path: Path) -> None:
    model, images = make(variant), images_for(variant)
    prune_heads(model, KEEP)
    path = tmp_path / "pruned.pth"
    torch.save(model.state_dict(), path)
    fresh = VARIANTS[variant]().eval()
    state = torch.load(path, weights_only=True)
    restore_pruning(fresh, state)
    restore_pruning(fresh, state)  # idempotent
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    # A Lightning-style prefix is found as well.
    prefixed = VARIANTS[variant]().eval()
    restore_pruning(prefixed, {f"model.{key}": value for key, value in state.items()})
    assert head_counts(prefixed) == [2, 0, 3]


def test_restoring_into_a_model_pruned_differently_fails_clearly() -> None:
    source, target = make("vit"), make("vit")
    prune_heads(source, {0: [0]})
    prune_heads(target, {0: [1]})
    with pytest.raises(ValueError, match=r"`state_dict` keeps heads \[1, 2, 3\] of 4 in layer `blocks.0.attn`"):
        restore_pruning(target, source.state_dict())


def test_adam_moments_are_sliced_not_reset_and_training_goes_on() -> None:
    model, images = make("eva"), images_for("eva")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    for _ in range(2):
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    qkv, proj = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.proj.weight
    old_qkv_state = {key: value.clone() for key, value in optimizer.state[qkv].items()}
    old_proj_avg = optimizer.state[proj]["exp_avg"].clone()
    changes = prune_heads(model, {0: [1, 2]})
    slice_optimizer_state(optimizer, changes)
    new_qkv, new_proj = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.proj.weight
    kept_rows = [
        row
        for part in range(3)
        for head in (0, 3)
        for row in range(part * DIM + head * HEAD_DIM, part * DIM + (head + 1) * HEAD_DIM)
    ]
    kept_columns = [c for head in (0, 3) for c in range(head * HEAD_DIM, (head + 1) * HEAD_DIM)]
    state = optimizer.state[new_qkv]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(state[key], old_qkv_state[key][kept_rows])
    assert torch.equal(state["step"], old_qkv_state["step"])
    assert torch.equal(optimizer.state[new_proj]["exp_avg"], old_proj_avg[:, kept_columns])
    assert qkv not in optimizer.state and all(
        any(p is new_qkv for p in group["params"]) for group in optimizer.param_groups
    )
    model_parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in model_parameters for group in optimizer.param_groups for p in group["params"])
    optimizer.zero_grad()
    model(images).square().mean().backward()
    optimizer.step()
    assert int(optimizer.state[new_qkv]["step"]) == 3


def test_optimizer_state_of_another_layout_is_refused() -> None:
    model = make("vit")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    qkv = model.blocks[0].attn.qkv.weight
    optimizer.state[qkv] = {"factored": torch.zeros(3, 3)}
    changes = prune_heads(model, {0: [0]})
    with pytest.raises(ValueError, match="state 'factored' has shape \\[3, 3\\], not the parameter's \\[96, 32\\]"):
        slice_optimizer_state(optimizer, changes)


def test_weight_magnitude_importance_matches_a_direct_computation() -> None:
    model = make("vit")
    attention = model.blocks[2].attn
    head = 3
    q_k_v_rows = [
        attention.qkv.weight[part * DIM + head * HEAD_DIM : part * DIM + (head + 1) * HEAD_DIM] for part in range(3)
    ]
    columns = attention.proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM]
    expected = torch.cat([*(rows.flatten() for rows in q_k_v_rows), columns.flatten()]).norm()
    importance = weight_magnitude_importance(model)
    assert torch.allclose(importance[2, 3], expected.detach())
    prune_heads(model, {2: [0]})
    after = weight_magnitude_importance(model)
    assert after[2, 0].isnan() and torch.allclose(after[2, 3], expected.detach())


# ---------------------------------------------------------------------------------------------------------------
# Models whose layers have different head counts: explain, head tools
# ---------------------------------------------------------------------------------------------------------------

# 2, 4 and 3 heads remain; no layer is empty, so the masked reference has the same GMAR weights.
KEEP_SOME = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])


@pytest.mark.parametrize("variant", ["vit", "beit", "eva"])
@pytest.mark.parametrize(("method", "head_norm"), [("gmar_l1", "layer"), ("gmar_l2", "global")])
def test_gmar_of_a_pruned_model_equals_gmar_of_the_masked_model(variant: str, method: str, head_norm: str) -> None:
    # A zeroed head gets no gradient, so its GMAR weight is 0 and the other heads' weights and the maps are those of
    # the pruned model, where the head is NaN (missing) instead.
    model, images = make(variant), images_for(variant)
    masked = zeroed_proj_columns(model, KEEP_SOME)
    prune_heads(model, KEEP_SOME)
    pruned, reference = (explain(m, images, method=method, head_norm=head_norm) for m in (model, masked))
    assert torch.allclose(pruned.token_maps, reference.token_maps, atol=1e-5)
    missing = KEEP_SOME == 0
    assert pruned.head_weights[:, missing].isnan().all() and pruned.head_scores[:, missing].isnan().all()
    assert torch.allclose(pruned.head_weights[:, ~missing], reference.head_weights[:, ~missing], atol=1e-6)
    assert (reference.head_weights[:, missing] == 0).all()


@pytest.mark.parametrize("method", ["gmar_l1", "rollout", "grad_rollout", "attention"])
def test_a_layer_without_heads_passes_tokens_through_the_rollout(method: str) -> None:
    model, images = make("vit"), images_for("vit")
    prune_heads(model, KEEP)  # layer 1 keeps no head
    result = explain(model, images, method=method)
    attentions, grads, _, _ = capture_full(model, images)
    assert attentions[1].shape[1] == 0
    # Reference: a headless layer's attention branch is zero, so its rollout step is the identity.
    eye = torch.eye(attentions[0].shape[-1]).expand_as(attentions[0][:, 0])
    rollout = eye
    for attention, grad in zip(attentions, grads, strict=True):
        if method == "gmar_l1" and attention.shape[1]:
            scores = grad.abs().sum(dim=(2, 3))
            fused = ((scores / scores.sum(1, keepdim=True))[:, :, None, None] * attention).sum(1)
        elif attention.shape[1]:
            product = (grad * attention).clamp(min=0) if method == "grad_rollout" else attention
            fused = product.mean(1)
        else:
            fused = torch.zeros_like(eye)
        if method == "grad_rollout":
            rollout = rollout + fused @ rollout
        else:
            mixed = 0.5 * eye + 0.5 * fused
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    expected = (attentions[-1].mean(1) if method == "attention" else rollout)[:, 0, 1:].reshape(-1, 4, 4)
    assert torch.allclose(result.token_maps, expected, atol=1e-5)
    if method == "gmar_l1":
        assert result.head_weights[:, 1].isnan().all()
        assert torch.allclose(result.head_weights.nansum(-1)[:, [0, 2]], torch.ones(3, 2))


def test_head_tools_work_on_a_pruned_model_by_original_head_index() -> None:
    model, images = make("vit"), images_for("vit")
    labels = torch.tensor([0, 3, 1])
    masked = zeroed_proj_columns(model, KEEP_SOME)
    prune_heads(model, KEEP_SOME)
    assert attention_head_grid(model) == (DEPTH, HEADS)
    raw = michel_importance(model, [(images, labels)], normalize_per_layer=False, progress=False)
    reference = michel_importance(masked, [(images, labels)], normalize_per_layer=False, progress=False)
    missing = KEEP_SOME == 0
    assert raw[missing].isnan().all() and torch.allclose(raw[~missing], reference[~missing], rtol=1e-4, atol=1e-7)
    order = rank_heads(raw)
    assert len(order) == int((~missing).sum()) and not missing[order[:, 0], order[:, 1]].any()
    # Masking heads of the pruned model by their original index equals masking them in the masked model.
    drop = torch.ones(DEPTH, HEADS)
    drop[1, 3] = drop[2, 0] = 0
    drop[missing] = float("nan")  # cells of missing heads are ignored
    with head_mask(model, drop), torch.no_grad():
        expected = zeroed_proj_columns(masked, drop.nan_to_num(1.0))(images)
        assert torch.allclose(model(images), expected, atol=1e-5)
    curve = head_ablation_curve(model, [(images, labels)], order, (0.0, 0.5, 1.0), progress=False)
    assert curve.num_masked == [0, 4, 9]
    with pytest.raises(ValueError, match=r"`order` must be 9 integer \(layer, head\) pairs"):
        head_ablation_curve(model, [(images, labels)], random_order(DEPTH, HEADS), (0.0, 1.0), progress=False)


def test_distillation_loss_matches_a_reference_written_from_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 5, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    for alpha, temperature in ((0.0, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 3.0)):
        # Hinton et al.: (1 - a) CE + a T^2 mean_b sum_c p_t (log p_t - log p_s), p = softmax(z / T).
        log_p = torch.log(torch.exp(student) / torch.exp(student).sum(dim=1, keepdim=True))
        cross_entropy = -log_p[torch.arange(6), labels].mean()
        p_teacher = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum(dim=1, keepdim=True)
        p_student = torch.exp(student / temperature) / torch.exp(student / temperature).sum(dim=1, keepdim=True)
        kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1).mean()
        expected = (1 - alpha) * cross_entropy + alpha * temperature**2 * kl
        loss = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
        assert torch.allclose(loss, expected, atol=1e-6), (alpha, temperature)
    loss.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher is only a target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "`alpha` must lie in \\[0.0, 1.0\\]"),
        ({"temperature": 0.0}, "`temperature` must be a number > 0"),
    ],
)
def test_distillation_loss_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message):
        distillation_loss(logits, logits, torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="`teacher_logits` must have the student's shape"):
        distillation_loss(logits, torch.zeros(2, 4), torch.tensor([0, 1]))


def test_prune_gradually_scores_the_pruned_model_before_each_step_and_fine_tunes_after_it() -> None:
    model = VisionTransformer(**TINY)  # 3 layers x 4 heads
    seen: list[list[int]] = []
    fine_tuned: list[list[int]] = []

    def importance(current: nn.Module) -> Tensor:
        seen.append([block.attn.num_heads for block in current.blocks])
        # Layer 2 looks least important to the unpruned model, layer 0 once anything is gone.
        scores = torch.arange(12.0).reshape(3, 4)
        return scores.flip(0) if sum(seen[-1]) == 12 else scores

    removed = prune_gradually(model, 7, 3, importance, lambda tuned: fine_tuned.append(head_counts(tuned)))
    # 7 heads in 3 steps: 7 // 3 = 2, 14 // 3 = 4, then 7 in all.
    assert seen == [[4, 4, 4], [4, 4, 2], [2, 4, 2]]
    assert fine_tuned == [[4, 4, 2], [2, 4, 2], [0, 3, 2]]
    assert removed == [{2: [0, 1]}, {0: [0, 1]}, {0: [2, 3], 1: [0]}]
    assert [block.attn.num_heads for block in model.blocks] == [0, 3, 2]
    with pytest.raises(ValueError, match="`steps` must be"):
        prune_gradually(model, 1, 0, importance, lambda tuned: None)
    with pytest.raises(ValueError, match="`count` must be an integer in \\[0, 5\\]"):
        prune_gradually(model, 6, 1, importance, lambda tuned: None)
