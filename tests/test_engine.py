"""The core engine against a plain full-matrix reference, on every supported timm ViT family."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from gmar_lightning import (
    METHODS,
    AttentionAdapter,
    explain,
    explain_many,
    register_attention_adapter,
    unregister_attention_adapter,
)
from gmar_lightning.capture import AttentionNotFoundError, attention_adapter
from tests.models import FAMILIES, LAYOUTS, TINY, make_images, make_model, patch_grid_of, sharpen
from tests.reference import reference_explain

ATOL = 1e-5


def reference_for(model: nn.Module, images: torch.Tensor, method: str, family: str = "vit", **options):
    num_prefix, readout = LAYOUTS[family]
    grid = patch_grid_of(images)
    return reference_explain(model, images, method, num_prefix=num_prefix, readout=readout, grid=grid, **options)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_matrix_reference(family: str, method: str, device: torch.device) -> None:
    model, images = make_model(family).to(device), make_images(family).to(device)
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_for(model, images, method, family)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    assert result.maps.shape == (images.shape[0], *images.shape[-2:])
    assert float(result.maps.min()) == 0.0 and float(result.maps.max()) == 1.0
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
        assert result.head_scores.shape == result.head_weights.shape
    else:
        assert result.head_weights is None and result.head_scores is None


@pytest.mark.parametrize(
    "options",
    [
        {"head_norm": "global"},
        {"discard_ratio": 0.3},
        {"start_layer": 1},
        {"residual": 0.2, "discard_ratio": 0.5, "head_norm": "global", "start_layer": 1},
    ],
    ids=["global", "discard", "start_layer", "all"],
)
@pytest.mark.parametrize("family", ["vit", "deit_distilled", "vit_avg_no_cls"])
@pytest.mark.parametrize("method", ["gmar_l1", "gmar_l2", "rollout"])
def test_options_match_reference(family: str, method: str, options: dict, device: torch.device) -> None:
    model, images = make_model(family).to(device), make_images(family).to(device)
    result = explain(model, images, method=method, **options)
    expected_maps, expected_weights = reference_for(model, images, method, family, **options)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)


def test_grad_rollout_start_layer_matches_reference(device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    result = explain(model, images, method="grad_rollout", start_layer=2)
    expected, _ = reference_for(model, images, "grad_rollout", start_layer=2)
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_image(family: str, method: str, device: torch.device) -> None:
    model, images = make_model(family).to(device), make_images(family, batch=4).to(device)
    batched = explain(model, images, method=method)
    singles = [explain(model, images[i : i + 1], method=method) for i in range(4)]
    torch.testing.assert_close(batched.token_maps, torch.cat([s.token_maps for s in singles]), rtol=0, atol=ATOL)
    torch.testing.assert_close(batched.maps, torch.cat([s.maps for s in singles]), rtol=0, atol=ATOL)
    if batched.head_weights is not None:
        per_image = torch.cat([s.head_weights for s in singles])
        torch.testing.assert_close(batched.head_weights, per_image, rtol=0, atol=ATOL)


def test_chunk_size_gives_identical_results(device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit", batch=5).to(device)
    whole = explain(model, images, target=torch.tensor([0, 1, 2, 3, 4]))
    chunked = explain(model, images, target=torch.tensor([0, 1, 2, 3, 4]), chunk_size=2)
    torch.testing.assert_close(chunked.token_maps, whole.token_maps, rtol=0, atol=ATOL)
    torch.testing.assert_close(chunked.head_weights, whole.head_weights, rtol=0, atol=ATOL)
    assert chunked.targets.tolist() == [0, 1, 2, 3, 4]


def identical_heads_model() -> VisionTransformer:
    """Every head of every layer has the same weights, so GMAR's gradient weights are exactly uniform."""
    model = sharpen(VisionTransformer(**TINY)).eval()
    heads, head_dim = TINY["num_heads"], TINY["embed_dim"] // TINY["num_heads"]
    with torch.no_grad():
        for block in model.blocks:
            qkv = block.attn.qkv.weight.view(3, heads, head_dim, -1)
            qkv.copy_(qkv[:, :1].expand_as(qkv).clone())
            bias = block.attn.qkv.bias.view(3, heads, head_dim)
            bias.copy_(bias[:, :1].expand_as(bias).clone())
            proj = block.attn.proj.weight.view(-1, heads, head_dim)
            proj.copy_(proj[:, :1].expand_as(proj).clone())
    return model


@pytest.mark.parametrize("method", ["gmar_l1", "gmar_l2"])
def test_gmar_with_uniform_weights_is_rollout(method: str) -> None:
    model, images = identical_heads_model(), make_images("vit")
    gmar = explain(model, images, method=method)
    torch.testing.assert_close(gmar.head_weights, torch.full_like(gmar.head_weights, 0.25), rtol=0, atol=1e-6)
    rollout = explain(model, images, method="rollout")
    torch.testing.assert_close(gmar.token_maps, rollout.token_maps, rtol=1e-5, atol=1e-6)


def test_permuting_heads_permutes_weights() -> None:
    model, images = make_model("vit"), make_images("vit")
    before = explain(model, images)
    heads, head_dim = TINY["num_heads"], TINY["embed_dim"] // TINY["num_heads"]
    permutation = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        for block in model.blocks:
            qkv_w = block.attn.qkv.weight.view(3, heads, head_dim, -1)
            qkv_w.copy_(qkv_w[:, permutation].clone())
            qkv_b = block.attn.qkv.bias.view(3, heads, head_dim)
            qkv_b.copy_(qkv_b[:, permutation].clone())
            proj = block.attn.proj.weight.view(-1, heads, head_dim)
            proj.copy_(proj[:, permutation].clone())
    after = explain(model, images)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.head_weights, before.head_weights[:, :, permutation], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.token_maps, before.token_maps, rtol=1e-5, atol=1e-6)


def model_state(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
        "checkpointing": [getattr(m, "grad_checkpointing", None) for m in model.modules()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
            for m in model.modules()
        ),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "fused", "checkpointing", "hooks"):
        assert before[key] == after[key], key
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert (old is None and new is None) or torch.equal(old, new)
    for old, new in zip(before["params"], after["params"], strict=True):
        assert torch.equal(old, new)


class DrawsRandomNumbers(nn.Module):
    """Draws from the global RNG in every forward pass, in eval mode too (unlike dropout), adding nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.0 * torch.rand_like(x)


@pytest.mark.parametrize("method", METHODS)
def test_leaves_model_and_rng_untouched(method: str, device: torch.device) -> None:
    model = make_model("vit").to(device)
    model.norm_pre = DrawsRandomNumbers()  # so a forward pass that the engine did not isolate moves the RNG
    device_rng = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    drawn_from = device_rng()
    with torch.no_grad():
        model(make_images("vit").to(device))
    assert not torch.equal(drawn_from, device_rng())  # the model does draw random numbers
    model.train()
    model.blocks[0].eval()  # a partially frozen model must come back exactly so
    model.set_grad_checkpointing(True)
    for p in list(model.parameters())[:3]:
        p.grad = torch.ones_like(p)
    before = model_state(model)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    explain(model, make_images("vit").to(device), method=method)
    assert_same_state(before, model_state(model))
    assert torch.equal(rng, torch.get_rng_state())
    if cuda_rng is not None:
        assert torch.equal(cuda_rng, torch.cuda.get_rng_state(device))
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_gradient_checkpointing_does_not_change_results() -> None:
    model, images = make_model("vit"), make_images("vit")
    plain = explain(model, images)
    model.set_grad_checkpointing(True)
    model.train()
    checkpointed = explain(model, images)
    torch.testing.assert_close(checkpointed.token_maps, plain.token_maps, rtol=0, atol=ATOL)
    assert model.grad_checkpointing and model.training


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(mode: str, device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    expected = explain(model, images)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        inputs = images.clone()  # created in the mode, as Lightning's validation batches are
        result = explain(model, inputs)
    torch.testing.assert_close(result.token_maps, expected.token_maps, rtol=0, atol=0)
    torch.testing.assert_close(result.head_weights, expected.head_weights, rtol=0, atol=0)


def test_computes_in_float32_under_autocast(device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    expected = explain(model, images)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        result = explain(model, images)
    assert result.token_maps.dtype == torch.float32
    torch.testing.assert_close(result.token_maps, expected.token_maps, rtol=0, atol=0)


def test_frozen_model_still_gets_gradients(device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    expected = explain(model, images)
    model.requires_grad_(False)
    torch.testing.assert_close(explain(model, images).head_weights, expected.head_weights, rtol=0, atol=0)


def test_compiled_model_is_explained_through_eager_module() -> None:
    model, images = make_model("vit"), make_images("vit")
    compiled = torch.compile(model)
    torch.testing.assert_close(explain(compiled, images).token_maps, explain(model, images).token_maps)


@pytest.mark.parametrize("target", [2, torch.tensor(2), [2, 2, 2], torch.tensor([2, 2, 2])])
def test_target_forms(target: object, device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    result = explain(model, images, target=target)
    assert result.targets.tolist() == [2, 2, 2]
    expected, _ = reference_for(model, images, "gmar_l1", target=torch.tensor([2, 2, 2], device=device))
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)


def test_default_target_is_prediction(device: torch.device) -> None:
    model, images = make_model("vit").to(device), make_images("vit").to(device)
    result = explain(model, images)
    assert torch.equal(result.targets, result.logits.argmax(-1))
    assert torch.equal(result.predictions, result.targets)


class CustomAttention(nn.Module):
    """Not timm: a `fast` path with SDPA and a slow path that calls `self.probs_dropout` on the probabilities."""

    def __init__(self, timm_attention: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.num_heads = timm_attention.qkv, timm_attention.proj, timm_attention.num_heads
        self.fast = True
        self.probs_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fast:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            out = self.probs_dropout(probs) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def test_adapter_plugs_in_other_attention_modules() -> None:
    model, images = make_model("vit"), make_images("vit")
    expected = explain(model, images)
    for block in model.blocks:
        block.attn = CustomAttention(block.attn)
    with pytest.raises(AttentionNotFoundError, match=r"VisionTransformer.*AttentionAdapter"):
        explain(model, images)
    adapter = AttentionAdapter(
        "custom", lambda m: isinstance(m, CustomAttention), lambda m: m.probs_dropout, disable_flags=("fast",)
    )
    register_attention_adapter(adapter)
    try:
        result = explain(model, images)
    finally:
        unregister_attention_adapter(adapter)
    torch.testing.assert_close(result.token_maps, expected.token_maps, rtol=1e-5, atol=1e-6)
    assert all(block.attn.fast for block in model.blocks)
    with pytest.raises(AttentionNotFoundError):  # unregistered again
        explain(model, images)
    with attention_adapter(adapter):
        torch.testing.assert_close(explain(model, images).token_maps, expected.token_maps, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`adapter` 'custom' is not registered"):
        unregister_attention_adapter(adapter)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"images": torch.randn(3, 32, 32)}, ValueError, r"`images`.*\[B, C, H, W\].*unsqueeze"),
        ({"images": torch.randn(2, 1, 32, 32)}, ValueError, r"`images` have 1 channels.*takes 3"),
        ({"images": torch.randn(2, 3, 40, 40)}, ValueError, r"`images` are 40x40.*dynamic_img_size"),
        ({"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, TypeError, r"`images` must be a float"),
        ({"target": 5}, ValueError, r"`target` .* out of range .* 5 classes"),
        ({"target": torch.tensor([0, 1])}, ValueError, r"`target` must be an int or have shape \[3\]"),
        ({"target": 1.5}, TypeError, r"`target`"),
        ({"method": "gradcam"}, ValueError, r"`method` must be one of"),
        ({"head_norm": "max"}, ValueError, r"`head_norm`"),
        ({"residual": 1.5}, ValueError, r"`residual`"),
        ({"discard_ratio": 1.0}, ValueError, r"`discard_ratio`"),
        ({"start_layer": 3}, ValueError, r"`start_layer` must be an integer in \[0, 2\]"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size`"),
        ({"images": torch.full((3, 3, 32, 32), float("nan"))}, FloatingPointError, r"NaN/inf logits"),
    ],
)
def test_bad_input_errors_and_model_restored(kwargs: dict, error: type, pattern: str) -> None:
    model = make_model("vit").train()
    before = model_state(model)
    arguments = {"model": model, "images": make_images("vit"), **kwargs}
    with pytest.raises(error, match=pattern):
        explain(**arguments)
    assert_same_state(before, model_state(model))


def test_nan_gradients_raise_and_model_restored() -> None:
    model = make_model("vit").train()
    handle = model.head.register_full_backward_pre_hook(lambda _m, grad: (grad[0] * float("nan"),))
    before = model_state(model)
    with pytest.raises(FloatingPointError, match="NaN/inf attention gradients"):
        explain(model, make_images("vit"))
    handle.remove()
    after = model_state(model)
    assert before["hooks"] - 1 == after["hooks"]
    assert before["fused"] == after["fused"] and before["training"] == after["training"]


def test_model_without_attention_names_its_class() -> None:
    with pytest.raises(AttentionNotFoundError, match=r"`model` \(Sequential\).*AttentionAdapter"):
        explain(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_unsupported_pooling_is_rejected() -> None:
    model = VisionTransformer(global_pool="max", **TINY)
    with pytest.raises(ValueError, match=r"global_pool='max'.*create it with global_pool='token', 'avg' or 'map'"):
        explain(model, make_images("vit"))


def test_swin_is_explained_on_its_first_stage_grid() -> None:
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=16,
        depths=(2, 1),
        num_heads=(2, 4),
        img_size=32,
        window_size=4,
        num_classes=3,
    )
    result = explain(model, torch.randn(2, 3, 32, 32))
    assert result.token_maps.shape == (2, 8, 8)
    # Stage 2 has 4 heads, stage 1 only 2: its absent heads are NaN.
    assert result.head_weights.shape == (2, 3, 4)
    torch.testing.assert_close(result.head_weights.nansum(-1), torch.ones(2, 3))
    assert result.head_weights[:, :2, 2:].isnan().all() and not result.head_weights[:, :2, :2].isnan().any()


def test_differential_attention_is_refused() -> None:
    model = VisionTransformer(attn_layer="diff", **TINY)
    with pytest.raises(ValueError, match=r"VisionTransformer.*differential attention.*not a distribution"):
        explain(model, make_images("vit"))


def test_attention_that_does_not_fit_the_token_plan_is_refused_not_mapped() -> None:
    """A stated layout without the class token leaves 16 tokens in the plan, but the model attends over 17."""
    from gmar_lightning import TokenLayout
    from gmar_lightning.families import UnsupportedModelError

    model = make_model("vit")
    with pytest.raises(UnsupportedModelError, match=r"blocks.0.attn produced \[3, 4, 17, 17\].*\[3, heads, 16, 16\]"):
        explain(model, make_images("vit"), token_layout=TokenLayout(num_prefix_tokens=0, readout_tokens=None))


# ---------------------------------------------------------------------------------------------------------------
# explain_many: several methods from one forward and one backward pass
# ---------------------------------------------------------------------------------------------------------------


def _count_passes(model: nn.Module) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    """``[forward calls of model, backward passes through its last block]``, counted by the model's own hooks."""
    counts = [0, 0]

    def forward(*_: object) -> None:
        counts[0] += 1

    def backward(*_: object) -> None:
        counts[1] += 1

    handles = [model.register_forward_hook(forward), model.blocks[-1].register_full_backward_hook(backward)]
    return counts, handles


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "beit"])
@pytest.mark.parametrize("options", [{}, {"chunk_size": 2, "head_norm": "global"}, {"discard_ratio": 0.5}])
def test_explain_many_equals_explain_per_method_from_one_forward_and_one_backward(
    family: str, options: dict[str, object]
) -> None:
    model, images = make_model(family), make_images(family, batch=3)
    counts, handles = _count_passes(model)
    try:
        results = explain_many(model, images, METHODS, target=1, **options)
        passes = list(counts)
        # explain without the recomputed path materialises attention as explain_many does with several methods: the
        # same computation, so equal to float32 rounding; the default explain (fused attention, recomputed in
        # query-row chunks on timm ViTs) rounds differently, checked below at a looser tolerance.
        singles = {
            method: explain(model, images, method=method, target=1, recompute_attention=False, **options)
            for method in METHODS
        }
    finally:
        for handle in handles:
            handle.remove()
    chunks = 2 if "chunk_size" in options else 1  # one forward and one backward pass per chunk
    assert passes == [chunks, chunks]
    assert counts == [chunks * (1 + len(METHODS)), chunks * (1 + 3)]  # explain: a pass per method, backward for 3
    assert list(results) == list(METHODS)
    for method, single in singles.items():
        many = results[method]
        assert many.method == method
        for name in ("token_maps", "maps", "targets", "logits", "head_weights", "head_scores"):
            expected, got = getattr(single, name), getattr(many, name)
            if expected is None:
                assert got is None, (method, name)
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"{method} {name}")
    for method in METHODS:
        default = explain(model, images, method=method, target=1, **options)
        torch.testing.assert_close(results[method].maps, default.maps, rtol=0, atol=1e-4, msg=method)
        if default.head_weights is not None:
            torch.testing.assert_close(results[method].head_weights, default.head_weights, rtol=0, atol=1e-5)


def test_explain_many_of_a_head_mean_method_alone_runs_no_backward_pass() -> None:
    model, images = make_model("vit"), make_images("vit")
    counts, handles = _count_passes(model)
    try:
        explain_many(model, images, ("rollout", "attention"))
    finally:
        for handle in handles:
            handle.remove()
    assert counts == [1, 0]


@pytest.mark.parametrize("methods", [(), ("gmar_l1", "gmar_l1"), ("gmar_l1", "gradcam")])
def test_explain_many_refuses_bad_method_lists_in_one_line(methods: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"^`methods` must be distinct names of gmar_l1, .*, got"):
        explain_many(make_model("vit"), make_images("vit"), methods)
