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
