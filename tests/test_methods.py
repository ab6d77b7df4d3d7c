"""Row propagation through token plans, on a device other than the plans' own."""

from __future__ import annotations

import pytest
import torch

from gmar_lightning import methods
from gmar_lightning.mixing import AttentionMixing, AttentionStep, TokenMap, TokenPlan


def windowed_plan() -> TokenPlan:
    """A class token and 4 patches: windowed attention over 2x2 slots, a merge of patch pairs, then global attention."""
    windows = torch.tensor([[0, 1], [2, 3]])
    merge = TokenMap(torch.tensor([[0, -1], [1, 2], [3, 4]]), torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]), 5)
    steps = (AttentionStep(0, AttentionMixing(5, queries=windows + 1, keys=windows + 1)), merge)
    steps += (AttentionStep(1, AttentionMixing(3)),)
    return TokenPlan(steps, torch.tensor([1.0, 0.0, 0.0]), num_prefix_tokens=1, grid=(2, 2))


@pytest.mark.parametrize("propagation", ["rollout", "gradient_rollout", "last_layer"])
def test_rows_live_where_the_layers_live(propagation: str) -> None:
    # Plans hold CPU tensors; on a GPU the layers are CUDA tensors. The meta device stands in for CUDA here: a CPU
    # read-out row divided by or added to meta tensors raises as it does on CUDA (the first GPU run found this).
    layers = [torch.rand(2, 2, 2, 2, device="meta"), torch.rand(2, 1, 3, 3, device="meta")]
    plan = windowed_plan()
    if propagation == "rollout":
        row = methods.propagate_rollout(plan, layers, residual=0.5)
    elif propagation == "gradient_rollout":
        row = methods.propagate_gradient_rollout(plan, layers)
    else:
        row = methods.propagate_last_attention(plan, layers[-1])
    assert row.device.type == "meta" and row.shape == (2, 5)


def test_row_stream_waits_for_layers_fed_out_of_order() -> None:
    plan = windowed_plan()
    layers = [torch.rand(2, 2, 2, 2), torch.rand(2, 1, 3, 3)]
    expected = methods.propagate_rollout(plan, layers, residual=0.5)

    stream = methods.RowStream(plan, lambda _i, mixing, row, fused: methods.rollout_step(mixing, row, fused, 0.5), 2)
    stream.feed(0, layers[0])  # the row needs layer 1 first: layer 0 waits
    with pytest.raises(RuntimeError, match=r"waits for attention layer\(s\) \[0, 1\]"):
        stream.result()
    stream.feed(1, layers[1])
    torch.testing.assert_close(stream.result(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_head_scores_agree_with_a_float64_sum_on_a_large_window_grid(norm: str) -> None:
    # Swin-B/384's last stage: 9 windows of 144 tokens per image, 186,624 gradient entries per head. Heavy-tailed
    # magnitudes make a float32 running sum drift (5.6e-4 relative before scores were accumulated in float64).
    generator = torch.Generator().manual_seed(0)
    grad = (
        torch.randn(2 * 9, 4, 144, 144, generator=generator) * torch.rand(2 * 9, 4, 144, 144, generator=generator) ** 4
    )
    per_image = grad.double().unflatten(0, (2, 9))
    expected = per_image.abs().sum(dim=(1, 3, 4)) if norm == "l1" else per_image.pow(2).sum(dim=(1, 3, 4)).sqrt()
    scores = methods.head_scores(grad, norm, batch=2)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=0)
