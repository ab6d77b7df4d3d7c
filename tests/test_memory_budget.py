"""Memory-bounded explanations: the recomputed (fused-attention) path and every budget give the materialised results.

The materialised path (``recompute_attention=False``) is itself checked against the full-matrix reference in
test_engine.py and test_families.py; here every other path is compared with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning import METHODS, explain, explain_many, recompute
from gmar_lightning.engine import _memory_budget, _micro_batch
from gmar_lightning.families import probe
from gmar_lightning.heads import prune_heads
from gmar_lightning.methods import METHOD_TABLE
from gmar_lightning.options import ExplainOptions
from tests.models import FAMILIES, TINY, make_images, make_model, sharpen
from tests.test_families import make_swin

OPTIONS = [{}, {"head_norm": "global"}, {"start_layer": 1, "residual": 0.3}]


def assert_same(actual, expected, tolerance: float) -> None:
    """Maps, logits, head weights and scores equal to ``tolerance`` (relative and absolute)."""
    for name in ("token_maps", "logits", "head_weights", "head_scores"):
        if getattr(expected, name) is None:
            assert getattr(actual, name) is None
            continue
        torch.testing.assert_close(
            getattr(actual, name), getattr(expected, name), rtol=tolerance, atol=tolerance, equal_nan=True
        )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "global", "start_layer"])
def test_recomputed_and_chunked_paths_equal_the_materialised_path(family: str, method: str, options: dict) -> None:
    model, images = make_model(family), make_images(family, batch=3)
    materialised = explain(model, images, method=method, recompute_attention=False, **options)
    default = explain(model, images, method=method, recompute_attention=True, **options)
    assert_same(default, materialised, 1e-5)  # fused attention rounds differently from the materialised softmax
    assert not default.token_maps.requires_grad  # no autograd graph outlives the call
    # One byte: micro-batches of one image on the materialised path, query rows one at a time on the recomputed one.
    assert_same(explain(model, images, method=method, memory_budget=1, **options), default, 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_blocks_of_whole_images_equal_the_materialised_path(method: str) -> None:
    model, images = make_model("vit"), make_images("vit", batch=3)
    estimate = recompute.per_image_bytes(probe(model, tuple(images.shape[-2:])))
    tokens, heads = (32 // 8) ** 2 + 1, TINY["num_heads"]
    # The forward of all three images, plus three blocks of two and a half images' [H, N, N] floats each: blocks of
    # two whole images, the third image in a block of its own.
    budget = 3 * estimate.recomputed + 3 * 4 * (5 * heads * tokens * tokens // 2)
    assert recompute.block_shape(budget - 3 * estimate.recomputed, 3, heads, tokens) == recompute.Block(2, tokens)
    expected = explain(model, images, method=method, recompute_attention=False)
    assert_same(explain(model, images, method=method, memory_budget=budget, recompute_attention=True), expected, 1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "global", "start_layer"])
def test_explain_many_on_the_recomputed_path_equals_the_materialised_path(options: dict) -> None:
    model, images = make_model("vit"), make_images("vit", batch=3)
    names = ("gmar_l1", "grad_rollout", "gmar_l2", "rollout")
    fused = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda module, _: fused.append(module.fused_attn))
    try:
        many = explain_many(model, images, names, recompute_attention=True, **options)
    finally:
        handle.remove()
    assert fused == [True]  # one forward, with fused attention kept
    for name in names:
        assert_same(many[name], explain(model, images, method=name, recompute_attention=False, **options), 1e-5)
    # The callback's default pair with a one-byte budget: one query row at a time.
    pair = explain_many(model, images, names[:2], memory_budget=1, recompute_attention=True, **options)
    for name in names[:2]:
        assert_same(pair[name], many[name], 1e-6)


def test_timm_vit_takes_the_recomputed_path_and_others_do_not() -> None:
    def takes(model, method: str = "gmar_l1", **options) -> bool:
        images = make_images("vit")
        model_probe = probe(model, tuple(images.shape[-2:]))
        return recompute.applies(model_probe, METHOD_TABLE[method], ExplainOptions(**options))

    assert takes(make_model("vit")) and takes(make_model("deit_distilled")) and takes(make_model("vit_registers"))
    assert not takes(make_model("vit"), discard_ratio=0.3)  # a top-k over whole layers
    assert not takes(make_model("vit"), "attention")
    assert not takes(make_model("vit"), recompute_attention=False)
    assert not takes(make_model("beit")) and not takes(make_model("eva"))  # their own attention forwards


@pytest.mark.parametrize("method", METHODS)
def test_qk_norm_and_pruned_heads_on_the_recomputed_path(method: str) -> None:
    torch.manual_seed(0)
    model = sharpen(VisionTransformer(qk_norm=True, **TINY)).eval()
    prune_heads(model, {"blocks.1.attn": [0, 2]})
    images = make_images("vit")
    expected = explain(model, images, method=method, recompute_attention=False)
    assert_same(explain(model, images, method=method, recompute_attention=True), expected, 1e-5)


@pytest.mark.parametrize("method", ["gmar_l1", "grad_rollout"])
def test_a_budget_splits_a_swin_batch_into_micro_batches_with_identical_results(method: str) -> None:
    model = make_swin("swin_tiny_patch4_window7_224", 40)
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    swin_probe = probe(model, (40, 40))
    per_image = recompute.per_image_bytes(swin_probe)
    assert per_image is not None and _micro_batch(swin_probe, 3, 2 * per_image.materialised, recomputed=False) == 2
    expected = explain(model, images, method=method)
    assert_same(explain(model, images, method=method, memory_budget=2 * per_image.materialised), expected, 1e-6)


def test_the_default_budget_is_a_training_steps_activations() -> None:
    model, images = make_model("vit"), make_images("vit")
    training, materialised, recomputed = recompute.per_image_bytes(probe(model, tuple(images.shape[-2:])))
    tokens, width, layers, heads = 17, TINY["embed_dim"], TINY["depth"], TINY["num_heads"]
    assert training == 4 * 17 * layers * tokens * width
    assert materialised == 4 * layers * (10 * tokens * width + heads * tokens * tokens)
    assert recomputed == 4 * 10 * layers * tokens * width


def test_the_budget_on_a_cpu_is_capped_by_the_memory_the_kernel_says_is_available() -> None:
    # A probe may be larger than the training batch, and a budget larger than the machine would swap or be killed.
    model, images = make_model("vit"), make_images("vit")
    vit_probe = probe(model, tuple(images.shape[-2:]))
    budget = _memory_budget(vit_probe, 2, ExplainOptions(memory_budget=2**62), torch.device("cpu"))
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    assert budget < 2**62
    assert abs(budget - available) < 0.2 * available  # MemAvailable moves between the two reads


def test_a_budget_splits_the_recomputed_path_into_micro_batches() -> None:
    model, images = make_model("vit"), make_images("vit", batch=5)
    vit_probe = probe(model, tuple(images.shape[-2:]))
    per_image = recompute.per_image_bytes(vit_probe)
    assert _micro_batch(vit_probe, 5, 2 * per_image.recomputed, recomputed=True) == 2
    expected = explain(model, images, method="gmar_l2", recompute_attention=True)
    budget = 2 * per_image.recomputed
    assert_same(
        explain(model, images, method="gmar_l2", memory_budget=budget, recompute_attention=True), expected, 1e-6
    )


@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_a_bad_budget_is_refused_in_one_line(budget: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r"`memory_budget` must be a positive integer or None"):
        explain(make_model("vit"), make_images("vit"), memory_budget=budget)


def test_the_recomputed_path_is_taken_by_default_only_where_materialising_would_not_fit() -> None:
    model, images = make_model("vit"), make_images("vit", batch=4)
    materialised = recompute.per_image_bytes(probe(model, tuple(images.shape[-2:]))).materialised
    attention = model.blocks[0].attn
    attention.fused_attn = True
    seen = []  # the materialised path switches fused attention off for the call, the recomputed path keeps it
    handle = attention.register_forward_hook(lambda module, _inputs, _output: seen.append(module.fused_attn))
    try:
        explain(model, images, memory_budget=4 * materialised)  # fits in one pass: materialised
        explain(model, images, memory_budget=4 * materialised - 1)  # would need two passes: recomputed
        explain(model, images, memory_budget=4 * materialised, recompute_attention=True)
    finally:
        handle.remove()
    assert seen == [False, True, True]
