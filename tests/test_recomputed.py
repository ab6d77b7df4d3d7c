"""The recomputed (chunked) attention maths against materialised N x N attention and autograd's dy/dA.

References are written from the formulas here: softmax(q k^T / sqrt(d)), O = A V, dy/dA by torch.autograd.grad, the
residual rollout matrix built in full.
"""

from __future__ import annotations

import pytest
import torch

from gmar_lightning import methods

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
