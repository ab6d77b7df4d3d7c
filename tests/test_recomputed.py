"""The recomputed (chunked) attention maths against materialised N x N attention and autograd's dy/dA.

References are written from the formulas here: softmax(q k^T / sqrt(d)), O = A V, dy/dA by torch.autograd.grad, the
residual rollout matrix built in full.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmar_lightning import explain, explain_many, methods
from tests.models import make_images, make_model

B, H, N, D = 2, 3, 11, 4


def materialised(seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v, G = dy/dO, and the full A and dy/dA of a random attention layer (float64 reference)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, N, D, generator=generator) for _ in range(4))
    attention = torch.softmax(q.double() @ k.double().transpose(-2, -1) / D**0.5, dim=-1).requires_grad_(True)
    output = attention @ v.double()
    (grad_attention,) = torch.autograd.grad((output * g.double()).sum(), attention)
    return q, k, v, g, attention.detach(), grad_attention


@pytest.mark.parametrize(("rows", "images"), [(1, None), (4, None), (N, None), (100, None), (4, 1), (N, 1)])
def test_head_scores_equal_the_norms_of_the_full_gradient(rows: int, images: int | None) -> None:
    _, _, v, g, _, grad_attention = materialised(0)
    l1 = grad_attention.abs().sum(dim=(-2, -1)).float()
    l2 = grad_attention.pow(2).sum(dim=(-2, -1)).sqrt().float()
    torch.testing.assert_close(methods.chunked_l1_scores(g, v, rows, images), l1, rtol=1e-6, atol=0)
    torch.testing.assert_close(methods.gram_l2_scores(g, v), l2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 3, N])
def test_attention_rows_are_the_softmax_rows(rows: int) -> None:
    q, k, _, _, attention, _ = materialised(1)
    for start in range(0, N, rows):
        torch.testing.assert_close(
            methods.attention_rows(q, k, start, start + rows), attention[:, :, start : start + rows].float()
        )


@pytest.mark.parametrize(("rows", "images", "residual"), [(1, None, 0.5), (4, None, 0.0), (N, None, 0.9), (4, 1, 0.5)])
def test_recomputed_rollout_step_equals_the_full_residual_matrix(
    rows: int, images: int | None, residual: float
) -> None:
    q, k, _, _, attention, _ = materialised(2)
    weights = torch.rand(B, H, dtype=torch.float64)
    weights /= weights.sum(dim=-1, keepdim=True)
    fused = (weights[:, :, None, None] * attention).sum(dim=1)
    full = residual * torch.eye(N, dtype=torch.float64) + (1 - residual) * fused
    full = full / full.sum(dim=-1, keepdim=True)
    row = torch.rand(B, N, dtype=torch.float64)
    expected = (row[:, None] @ full).squeeze(1).float()
    actual = methods.recomputed_rollout_step(row.float(), q, k, weights.float(), residual, rows, images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rows", "images"), [(1, None), (5, None), (N, None), (5, 1), (N, 1)])
def test_recomputed_gradient_rollout_step_equals_the_full_relevance(rows: int, images: int | None) -> None:
    q, k, v, g, attention, grad_attention = materialised(3)
    relevance = (grad_attention * attention).clamp_min(0).mean(dim=1)
    row = torch.rand(B, N, dtype=torch.float64)
    expected = (row[:, None] @ (torch.eye(N, dtype=torch.float64) + relevance)).squeeze(1).float()
    actual = methods.recomputed_gradient_rollout_step(row.float(), q, k, g, v, rows, images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


SPARSE_ROWS = {
    "class token": [0],  # the last layer's row under a class token read-out
    "last token": [N - 1],
    "two apart": [2, 7],
    "none": [],
}


@pytest.mark.parametrize("rows", [1, 4, N])
@pytest.mark.parametrize("nonzero", SPARSE_ROWS.values(), ids=SPARSE_ROWS.keys())
def test_rows_and_gradients_with_zeros_skip_nothing_they_need(rows: int, nonzero: list[int]) -> None:
    """Zero read-out weights and zero output-gradient rows (a class token read-out's last layer) give the same steps and
    scores as the full matrices: only the rows whose terms vanish may be left out."""
    q, k, v, g, attention, _ = materialised(4)
    keep = torch.zeros(N, dtype=torch.float64)
    keep[nonzero] = 1.0
    row = torch.rand(B, N, dtype=torch.float64) * keep
    g = g * keep[:, None].float()  # G rows outside `nonzero` are zero
    probabilities = attention.clone().requires_grad_(True)
    (grad_attention,) = torch.autograd.grad(((probabilities @ v.double()) * g.double()).sum(), probabilities)
    weights = torch.rand(B, H, dtype=torch.float64)
    fused = (weights[:, :, None, None] * attention).sum(dim=1)
    full = 0.5 * torch.eye(N, dtype=torch.float64) + 0.5 * fused
    full = full / full.sum(dim=-1, keepdim=True)
    expected = (row[:, None] @ full).squeeze(1).float()
    actual = methods.recomputed_rollout_step(row.float(), q, k, weights.float(), 0.5, rows)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    relevance = (grad_attention * attention).clamp_min(0).mean(dim=1)
    expected = (row[:, None] @ (torch.eye(N, dtype=torch.float64) + relevance)).squeeze(1).float()
    torch.testing.assert_close(
        methods.recomputed_gradient_rollout_step(row.float(), q, k, g, v, rows), expected, rtol=1e-5, atol=1e-6
    )
    l1 = grad_attention.abs().sum(dim=(-2, -1)).float()
    torch.testing.assert_close(methods.chunked_l1_scores(g, v, rows), l1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 3, N])
def test_attention_rows_from_the_log_sum_exp_are_the_softmax_rows(rows: int) -> None:
    q, k, _, _, attention, _ = materialised(5)
    log_sum_exp = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) / D**0.5, dim=-1).float()
    for start in range(0, N, rows):
        torch.testing.assert_close(
            methods.attention_rows(q, k, start, start + rows, log_sum_exp),
            attention[:, :, start : start + rows].float(),
        )


def softmax_calls(run) -> int:
    """How many ``aten::_softmax`` calls ``run()`` makes (the profiler records every aten operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_softmax")


@pytest.mark.parametrize("method", ["rollout", "gmar_l1", "grad_rollout"])
def test_timm_attention_rows_come_from_the_fused_kernels_log_sum_exp(method: str) -> None:
    """On the CPU the recomputed path reads each row's normaliser from the flash kernel's forward instead of a softmax
    per block, with the same result; a forward forced onto another kernel falls back to the softmax."""
    model, images = make_model("vit"), make_images("vit", batch=2)
    materialised = explain(model, images, method=method, recompute_attention=False)
    results = []
    assert softmax_calls(lambda: results.append(explain(model, images, method=method, recompute_attention=True))) == 0
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # the math kernel's forward runs a softmax per layer itself
        forward = softmax_calls(lambda: model(images))
    with sdpa_kernel(SDPBackend.MATH):
        run = lambda: results.append(explain(model, images, method=method, recompute_attention=True))  # noqa: E731
        assert softmax_calls(run) > forward
    for result in results:
        torch.testing.assert_close(result.token_maps, materialised.token_maps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.logits, materialised.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "images"), [(1, None), (4, None), (N, None), (4, 1)])
def test_one_pass_over_a_layer_gives_every_methods_sums(rows: int, images: int | None) -> None:
    """The L1 scores, the per-head row products of two rows and the relevance of two others, from one pass, each
    equal to its full-matrix reference; rows with zeros (a class-token read-out) and zero gradient rows included."""
    q, k, v, g, attention, _ = materialised(6)
    g = g.clone()
    g[:, :, 3] = 0.0  # a query row whose output gradient is zero
    probabilities = attention.clone().requires_grad_(True)
    (grad_attention,) = torch.autograd.grad(((probabilities @ v.double()) * g.double()).sum(), probabilities)
    first = torch.zeros(B, N, dtype=torch.float64)
    first[:, 0] = 1.0
    head_rows, relevance_rows = [first, torch.rand(B, N, dtype=torch.float64)], [torch.rand(B, N, dtype=torch.float64)]
    relevance_rows.append(first)
    sums = methods.recomputed_layer_sums(
        q, k, g, v, rows, images, l1=True,
        head_rows=[row.float() for row in head_rows], relevance_rows=[row.float() for row in relevance_rows],
    )  # fmt: skip
    torch.testing.assert_close(sums.l1, grad_attention.abs().sum(dim=(-2, -1)).float(), rtol=1e-6, atol=0)
    for row, got in zip(head_rows, sums.head_rows, strict=True):
        expected = torch.einsum("bi,bhij->bhj", row, attention).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    relevance = (grad_attention * attention).clamp_min(0).mean(dim=1)
    for row, got in zip(relevance_rows, sums.relevance, strict=True):
        torch.testing.assert_close(got, (row[:, None] @ relevance).squeeze(1).float(), rtol=1e-5, atol=1e-6)


def block_products(run, head_dim: int, tokens: int) -> tuple[int, int]:
    """``(attention, gradient)``: how many batched products ``run()`` makes of attention rows (``q`` with its
    log-sum-exp column times ``k``: ``[.., c, d + 1] x [.., d + 1, N]``) and of gradient rows (``G V^T``:
    ``[.., c, d] x [.., d, N]``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        run()
    counts = {head_dim + 1: 0, head_dim: 0}
    for event in profile.events():
        shapes = event.input_shapes
        if event.name == "aten::matmul" and len(shapes) >= 2 and len(shapes[0]) == len(shapes[1]) == 4:
            inner = shapes[0][-1]
            if inner in counts and shapes[1][-2:] == [inner, tokens]:
                counts[inner] += 1
    return counts[head_dim + 1], counts[head_dim]


def test_explain_many_reduces_each_block_once_for_the_callbacks_pair() -> None:
    """GMAR-L1's scores and rollout and the generic rule's relevance share one attention block and one gradient block
    per layer block: the pair makes as many block products as the generic rule alone (GMAR-L1 alone as many)."""
    model, images = make_model("vit"), make_images("vit", batch=2)
    sizes = model.blocks[0].attn.head_dim, model.patch_embed.num_patches + 1
    pair = explain_many(model, images, ("gmar_l1", "grad_rollout"), recompute_attention=True)
    alone = {method: explain(model, images, method=method, recompute_attention=True) for method in pair}
    for method, result in alone.items():
        torch.testing.assert_close(pair[method].token_maps, result.token_maps, rtol=1e-5, atol=1e-6)
    products = [
        block_products(lambda method=method: explain(model, images, method=method, recompute_attention=True), *sizes)
        for method in pair
    ]
    many = block_products(lambda: explain_many(model, images, tuple(pair), recompute_attention=True), *sizes)
    assert products[0] == products[1] and min(products[0]) > 0
    assert many == products[1]


@pytest.mark.parametrize(
    ("rows", "images", "asked"),
    [(1, None, "nothing"), (4, None, "l1"), (N, None, "relevance"), (4, 1, "everything"), (N, 1, "nothing")],
)
@pytest.mark.parametrize("with_log_sum_exp", [False, True])
def test_one_pass_gives_the_attentions_backward(
    rows: int, images: int | None, asked: str, with_log_sum_exp: bool
) -> None:
    """With the attention's output, the pass also returns dy/dq, dy/dk, dy/dv, equal to autograd through
    softmax(q k^T / sqrt(d)) V, and the sums it reduces beside them stay those of the references; a zero gradient row
    (whose blocks the pass may skip) included."""
    q, k, v, g, attention, _ = materialised(7)
    g = g.clone()
    g[:, :, 2] = 0.0
    inputs = [tensor.double().requires_grad_(True) for tensor in (q, k, v)]
    probabilities = torch.softmax(inputs[0] @ inputs[1].transpose(-2, -1) / D**0.5, dim=-1)
    output = probabilities @ inputs[2]
    expected = torch.autograd.grad(output, inputs, grad_outputs=g.double())
    probabilities = attention.clone().requires_grad_(True)
    (grad_attention,) = torch.autograd.grad(((probabilities @ v.double()) * g.double()).sum(), probabilities)
    row = torch.rand(B, N, dtype=torch.float64)
    log_sum_exp = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) / D**0.5, dim=-1).float()
    sums = methods.recomputed_layer_sums(
        q, k, g, v, rows, images, log_sum_exp if with_log_sum_exp else None,
        l1=asked in ("l1", "everything"),
        head_rows=[row.float()] if asked == "everything" else [],
        relevance_rows=[row.float()] if asked in ("relevance", "everything") else [],
        output=output.detach().float(),
    )  # fmt: skip
    for got, reference in zip(sums.input_grads, expected, strict=True):
        torch.testing.assert_close(got, reference.float(), rtol=1e-5, atol=1e-6)
    if sums.l1 is not None:
        torch.testing.assert_close(sums.l1, grad_attention.abs().sum(dim=(-2, -1)).float(), rtol=1e-6, atol=0)
    for got in sums.head_rows:
        torch.testing.assert_close(got, torch.einsum("bi,bhij->bhj", row, attention).float(), rtol=1e-5, atol=1e-6)
    relevance = (grad_attention * attention).clamp_min(0).mean(dim=1)
    for got in sums.relevance:
        torch.testing.assert_close(got, (row[:, None] @ relevance).squeeze(1).float(), rtol=1e-5, atol=1e-6)


def kernel_backwards(run) -> int:
    """How many times ``run()`` calls the CPU flash kernel's own backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return sum(event.name == "aten::_scaled_dot_product_flash_attention_for_cpu_backward" for event in profile.events())


@pytest.mark.parametrize(("method", "kernel_inside"), [("gmar_l1", False), ("grad_rollout", False), ("gmar_l2", True)])
def test_the_recomputed_pass_takes_over_the_attentions_backward(method: str, kernel_inside: bool) -> None:
    """Where a layer's pass forms G V^T anyway (GMAR-L1, the generic rule), or the gradient reaches one row (the
    last layer under a class-token read-out), it also computes the attention's backward, and the kernel's own backward
    does not run; GMAR-L2's row products alone leave the interior layers to the kernel. The first layer's backward
    never runs (the pass stops at its output). Maps equal the materialised path's."""
    model, images = make_model("vit"), make_images("vit", batch=2)
    depth = len(model.blocks)
    expected = depth - 2 if kernel_inside else 0
    results = []
    count = kernel_backwards(lambda: results.append(explain(model, images, method=method, recompute_attention=True)))
    assert count == expected
    materialised_result = explain(model, images, method=method, recompute_attention=False)
    torch.testing.assert_close(results[0].token_maps, materialised_result.token_maps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_gradients", [False, True])
def test_layer_tensors_keep_an_attention_output_only_until_its_backward(with_gradients: bool) -> None:
    """The flash output that a fused backward reads is kept only where a backward will run (every layer but the first,
    when gradients are asked for) and only until that backward: a forward alone (``rollout``) keeps none, and after
    the backward pass none is left (each would hold a ``[B, H, N, d]`` tensor per layer for the whole explanation)."""
    from gmar_lightning.recompute import LayerTensors
    from gmar_lightning.resolve import resolve_model

    model, images = make_model("vit"), make_images("vit", batch=2)
    probe = resolve_model(model).probe(images)
    seen: list[int] = []
    tensors = LayerTensors(probe, (lambda layer, grad: seen.append(layer)) if with_gradients else None)
    with tensors.hooked():
        logits = model(images.clone().requires_grad_(with_gradients))
    kept = [layer for layer, saved in sorted(tensors.saved.items()) if "o" in saved]
    assert kept == (list(range(1, len(model.blocks))) if with_gradients else [])
    if with_gradients:
        tensors.backward(logits[:, 0].sum())
        assert seen == list(range(len(model.blocks)))[::-1]
        assert not any("o" in saved for saved in tensors.saved.values())
