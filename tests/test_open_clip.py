"""open_clip VisionTransformer towers under a zero-shot head, against a full-matrix reference.

The reference recomputes every block's attention from its ``nn.MultiheadAttention`` weights by the formula
(``softmax(q k^T / sqrt(d))`` per head, then the values and the output projection), checks that this copy gives the
tower's logits, and differentiates the target logit with ``torch.autograd.grad`` on those attention tensors. Nothing
here uses ``gmar_lightning.families``.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import Tensor, nn

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

from gmar_lightning import METHODS, explain  # noqa: E402
from gmar_lightning.families import UnsupportedModelError  # noqa: E402
from tests.reference import reference_from_attention  # noqa: E402

ATOL = 1e-5
GRID = (4, 4)


class ZeroShot(nn.Module):
    """Class logits from a tower's image embeddings and fixed class (text) embeddings, as in zero-shot CLIP."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.classes = nn.Parameter(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)))

    def forward(self, images: Tensor) -> Tensor:
        features = self.visual(images)
        return 10 * (features / features.norm(dim=-1, keepdim=True)) @ self.classes.T


def make(pool_type: str = "tok", **kwargs: object) -> ZeroShot:
    torch.manual_seed(0)
    tower = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16, pool_type=pool_type
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: peaked attention, so read-outs give different maps
        for parameter in tower.parameters():
            if parameter.dim() > 1 or parameter.shape == (32,):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return ZeroShot(tower).eval()


def images(batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def formula_attention(block: nn.Module, recorded: list[Tensor]) -> None:
    """Replace ``block.attention`` with the attention written out, recording ``[B, H, N, N]`` probabilities."""
    attention = block.attn

    def attend(_self: nn.Module, q_x: Tensor, k_x=None, v_x=None, attn_mask=None) -> Tensor:
        batch, tokens, width = q_x.shape
        heads = attention.num_heads
        q, k, v = nn.functional.linear(q_x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-1, -2)) / (width // heads) ** 0.5).softmax(dim=-1)
        recorded.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
        return attention.out_proj(out)

    block.attention = types.MethodType(attend, block)


def reference_attention(model: ZeroShot, batch: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    reference = copy.deepcopy(model)
    recorded: list[Tensor] = []
    for block in reference.visual.transformer.resblocks:
        formula_attention(block, recorded)
    with torch.enable_grad():
        logits = reference(batch.clone())
        torch.testing.assert_close(logits, model(batch), rtol=1e-5, atol=1e-5)  # the formula is the tower's
        targets = logits.argmax(-1)
        grads = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), recorded)
    return [a.detach() for a in recorded], list(grads)


@pytest.mark.parametrize(("pool_type", "readout"), [("tok", [0]), ("avg", None)])
@pytest.mark.parametrize("method", METHODS)
def test_tower_under_a_zero_shot_head_matches_full_matrix_reference(
    pool_type: str, readout: list[int] | None, method: str
) -> None:
    model, batch = make(pool_type), images()
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    result = explain(model, batch, method=method)
    attentions, grads = reference_attention(model, batch)
    expected_maps, expected_weights = reference_from_attention(
        attentions, grads, method, num_prefix=1, readout=readout, grid=GRID
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks


def test_the_reference_tells_the_read_outs_apart() -> None:
    model, batch = make("tok"), images()
    attentions, grads = reference_attention(model, batch)
    token, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=1, readout=[0], grid=GRID)
    mean, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=1, readout=None, grid=GRID)
    assert (token - mean).abs().max() > 100 * ATOL


def test_a_bare_tower_and_unpooled_or_attention_pooled_towers_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"is an open_clip image tower \(image embeddings, no classifier\)"):
        explain(make().visual, images(1))
    with pytest.raises(UnsupportedModelError, match=r"returns its tokens unpooled \(pool_type='none'\)"):
        explain(ZeroShot(make("none").visual), images(1))
    torch.manual_seed(0)
    coca = VisionTransformer(
        image_size=32,
        patch_size=8,
        width=32,
        layers=1,
        heads=4,
        mlp_ratio=2.0,
        output_dim=16,
        attentional_pool=True,
        attn_pooler_queries=4,
        attn_pooler_heads=4,
    )
    with pytest.raises(UnsupportedModelError, match=r"attentional pooler \(CoCa's attn_pool\)") as error:
        explain(ZeroShot(coca), images(1))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
@pytest.mark.parametrize("method", ["rollout", "gmar_l1"])
def test_uniform_attention_gives_a_flat_map(pool_type: str, method: str) -> None:
    model = make(pool_type)
    with torch.no_grad():  # zero query and key rows of every block's packed projection: every score is equal
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight[: 2 * 32].zero_()
            block.attn.in_proj_bias[: 2 * 32].zero_()
    maps = explain(model, images(2), method=method).token_maps
    assert float((maps.amax(dim=(1, 2)) / maps.amin(dim=(1, 2))).max()) <= 1.01
