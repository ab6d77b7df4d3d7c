"""transformers SigLIP 2 (NaFlex) with zero user code: ``Siglip2ForImageClassification``, ``Siglip2VisionModel`` under
a user's head on its attention-pooled output or on a mean of its tokens, on batches that ``Siglip2ImageProcessor``
builds from images of two sizes, padded.

The reference works image by image with the padding removed, in float64: each block's attention is transformers' own
``output_attentions`` under eager attention (with the model's padding mask) restricted to the image's own tokens, the
pool's attention is recomputed from its own ``q``/``k`` projections with the padding keys masked, the gradients come
from one ``torch.autograd.grad`` on those tensors, and the rollout is written as full products (tests/reference.py).
Nothing here uses the package's plans, mixings or method helpers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("SigLIP 2 is supported on transformers 5", allow_module_level=True)
pytest.importorskip("torchvision")  # Siglip2ImageProcessor's backend

from gmar_lightning import METHODS, explain  # noqa: E402
from gmar_lightning.families import UnsupportedModelError  # noqa: E402
from gmar_lightning.heads import head_mask, michel_importance  # noqa: E402
from gmar_lightning.heads.pruning import head_counts, prune_heads  # noqa: E402
from tests.reference import fuse_heads, roll_out_row, zeroed_output_columns  # noqa: E402
from tests.test_hf import sharpen  # noqa: E402

DIM, HEADS, HEAD_DIM, PATCH = 32, 4, 8, 4
VISION = {
    "patch_size": PATCH,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "intermediate_size": 64,
    "num_patches": 16,
}
TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
# Two sizes: grids 2x3 and 3x4, both padded to 14 patches.
SIZES = [(8, 12), (12, 16)]
LENGTH = 14


def naflex_batch(sizes: list[tuple[int, int]] = SIZES, length: int = LENGTH) -> dict[str, Tensor]:
    """transformers' own Siglip2ImageProcessor on random images, at their own size (no resizing)."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8) for size in sizes]
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=length)
    return dict(processor(images=images, do_resize=False, return_tensors="pt"))


class WithHead(nn.Module):
    """A user's linear head on a Siglip2VisionModel, reading ``read(output, pixel_attention_mask)``."""

    def __init__(self, backbone: nn.Module, read: Callable[[object, Tensor], Tensor]) -> None:
        super().__init__()
        self.backbone, self.read, self.head = backbone, read, nn.Linear(DIM, 5)
        self.record, self.recorded = False, None

    def forward(self, pixel_values: Tensor, pixel_attention_mask: Tensor, spatial_shapes: Tensor) -> Tensor:
        output = self.backbone(
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            **({"output_attentions": True} if self.record else {}),
        )
        self.recorded = output.attentions if self.record else None
        return self.head(self.read(output, pixel_attention_mask))


def masked_mean(output: object, mask: Tensor) -> Tensor:
    weights = mask[..., None].to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * weights).sum(1) / weights.sum(1)


def classifier() -> nn.Module:
    config = transformers.Siglip2Config(vision_config=VISION, text_config=TEXT, num_labels=5)
    return transformers.Siglip2ForImageClassification(config)


def backbone() -> nn.Module:
    return transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION))


# name -> (factory, whether the read-out is the pool's attention; else the mean of the image's own tokens)
CASES: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    # Siglip2ForImageClassification averages its tokens over pixel_attention_mask (its pool runs, unread).
    "classifier": (classifier, False),
    # A head on Siglip2VisionModel's pooler_output: the attention-pooling head, one learned probe, padding masked.
    "pooled": (lambda: WithHead(backbone(), lambda output, _mask: output.pooler_output), True),
    # A head on the masked mean of the tokens, bypassing the pool.
    "masked_mean": (lambda: WithHead(backbone(), masked_mean), False),
}


def make(case: str) -> nn.Module:
    torch.manual_seed(0)
    return sharpen(CASES[case][0]()).eval()


def vision_model(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, WithHead) else model.vision_model


def pool_from_formula(head: nn.Module, recorded: list[Tensor]) -> None:
    """Replace the head's ``nn.MultiheadAttention`` by its formula with padding keys masked, recording the probe's
    ``[B, H, 1, N]`` attention."""
    attention = head.attention

    class Formula(nn.Module):
        def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, None]:
            w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
            b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

            def split(x: Tensor) -> Tensor:
                return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

            q, k, v = split(query @ w_q.T + b_q), split(key @ w_k.T + b_k), split(value @ w_v.T + b_v)
            scores = (q @ k.transpose(-1, -2)) / HEAD_DIM**0.5
            probs = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf")).softmax(dim=-1)
            recorded.append(probs)
            return attention.out_proj((probs @ v).transpose(1, 2).reshape(query.shape[0], 1, DIM)), None

    head.attention = Formula()


def captured(model: nn.Module, batch: dict[str, Tensor], pooled: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """In float64: every block's attention from transformers' ``output_attentions`` (eager), the pool's from its
    formula, their gradients of the predicted class's logits, and the logits."""
    reference = copy.deepcopy(model).double().eval()
    vision_model(reference).config._attn_implementation = "eager"
    pool: list[Tensor] = []
    if pooled:
        pool_from_formula(reference.backbone.head, pool)
    inputs = dict(batch, pixel_values=batch["pixel_values"].double())
    with torch.enable_grad():
        if isinstance(reference, WithHead):
            reference.record = True
            logits = reference(**inputs)
            attentions = list(reference.recorded)
        else:
            output = reference(**inputs, output_attentions=True)
            logits, attentions = output.logits, list(output.attentions)
        expected = model(**batch)
        expected = expected if isinstance(expected, Tensor) else expected.logits
        torch.testing.assert_close(logits.float(), expected, rtol=1e-4, atol=1e-4)  # the formula is the pool's
        targets = logits.argmax(-1)
        tensors = [*attentions, *pool[-1:]]
        grads = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), tensors)
    return [t.detach() for t in tensors], list(grads), logits.detach()


def reference(model: nn.Module, batch: dict[str, Tensor], method: str, pooled: bool) -> list:
    """Per image: the token map on its own grid and the head weights ``[L (+ pool), H]``, padding removed."""
    attentions, grads, _ = captured(model, batch, pooled)
    blocks = len(attentions) - int(pooled)
    out = []
    for image, (height, width) in enumerate(batch["spatial_shapes"].tolist()):
        own = height * width  # the processor puts an image's patches first, row-major; then padding
        matrices, weights = [], []
        for layer in range(blocks):
            attention = attentions[layer][image][:, :own, :own]
            # The model's mask: every query's attention lies on the image's own keys.
            torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention[..., 0]))
            matrix, weight = fuse_heads(method, attention, grads[layer][image][:, :own, :own])
            matrices.append(matrix)
            weights.append(weight)
        if pooled:  # the pool's fused attention over the valid patches is the read-out row; no residual
            pool_matrix, pool_weight = fuse_heads(method, attentions[-1][image][..., :own], grads[-1][image][..., :own])
            row = pool_matrix[0]
            weights.append(pool_weight)
        else:  # the mean of the image's own tokens
            row = torch.full((own,), 1.0 / own, dtype=torch.float64)
        row = roll_out_row(row, matrices, method, pooled)
        out.append((row.reshape(height, width), torch.stack(weights) if weights[0] is not None else None))
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_a_padded_batch_matches_the_reference_image_by_image(case: str, method: str) -> None:
    model, batch = make(case), naflex_batch()
    result = explain(model, batch, method=method)
    assert result.grid_sizes.tolist() == [[2, 3], [3, 4]]
    assert result.token_maps.shape == (2, 3, 4) and result.maps.shape == (2, 12, 16)
    pooled = CASES[case][1]
    assert (result.layer_names[-1] == "head.attention") == pooled
    for image, (grid, weights) in enumerate(reference(model, batch, method, pooled)):
        height, width = grid.shape
        torch.testing.assert_close(result.token_maps[image, :height, :width], grid.float(), rtol=0, atol=1e-5)
        assert result.token_maps[image].isfinite().sum() == height * width  # NaN off the image's own grid
        assert result.maps[image, : height * PATCH, : width * PATCH].isfinite().all()
        if weights is not None:  # against the float64 autograd reference
            torch.testing.assert_close(result.head_weights[image].double(), weights, rtol=0, atol=1e-6)


def test_the_reference_tells_the_pool_from_the_token_mean() -> None:
    """The comparison above can fail: the pool's row and the token mean give different maps."""
    model, batch = make("pooled"), naflex_batch()
    pooled = reference(model, batch, "rollout", pooled=True)
    mean = reference(model, batch, "rollout", pooled=False)
    assert max(float((p - m).abs().max()) for (p, _), (m, _) in zip(pooled, mean, strict=True)) > 1e-3


@pytest.mark.parametrize("case", ["classifier", "pooled"])
def test_each_image_is_explained_as_it_is_alone(case: str) -> None:
    model, batch = make(case), naflex_batch()
    padded = explain(model, batch, method="gmar_l1")
    for index, (height, width) in enumerate(batch["spatial_shapes"].tolist()):
        own = {key: value[index : index + 1] for key, value in batch.items()}
        own["pixel_values"], own["pixel_attention_mask"] = (
            own[key][:, : height * width] for key in ("pixel_values", "pixel_attention_mask")
        )
        alone = explain(model, own, method="gmar_l1")  # no padding at all
        height, width = alone.token_maps.shape[1:]
        torch.testing.assert_close(padded.token_maps[index, :height, :width], alone.token_maps[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(padded.head_weights[index], alone.head_weights[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["classifier", "pooled"])
@pytest.mark.parametrize("method", ["rollout", "gmar_l1"])
def test_uniform_attention_gives_a_flat_map_on_each_images_grid(case: str, method: str) -> None:
    model = make(case)
    with torch.no_grad():  # equal scores everywhere: blocks and pool attend uniformly over the image's own tokens
        for name, parameter in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                parameter.zero_()
        if CASES[case][1]:
            model.backbone.head.attention.in_proj_weight[: 2 * DIM].zero_()
            model.backbone.head.attention.in_proj_bias[: 2 * DIM].zero_()
    result = explain(model, naflex_batch(), method=method)
    for index, (height, width) in enumerate(result.grid_sizes.tolist()):
        own = result.token_maps[index, :height, :width]
        assert float(own.max() / own.min()) <= 1.01


def test_a_head_that_averages_padding_too_is_refused() -> None:
    model = make("masked_mean")
    model.read = lambda output, _mask: output.last_hidden_state.mean(1)
    with pytest.raises(
        UnsupportedModelError, match=r"^`model` \(WithHead\) reads the padding slots of its NaFlex"
    ) as e:
        explain(model, naflex_batch())
    assert "\n" not in str(e.value)


def test_a_head_on_the_forward_of_a_batch_dict_gets_the_dict() -> None:
    """A user's ``forward(batch)`` (no ``pixel_values`` parameter) is called with the dict, as a training step would."""
    model = make("pooled")

    class DictHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            return self.model(**batch)

    batch = naflex_batch()
    torch.testing.assert_close(
        explain(DictHead(), batch, method="gmar_l1").token_maps,
        explain(model, batch, method="gmar_l1").token_maps,
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def test_siglip2_model_is_refused_as_a_whole_and_its_vision_tower_works_under_a_head() -> None:
    torch.manual_seed(0)
    whole = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=VISION, text_config=TEXT)).eval()
    with pytest.raises(UnsupportedModelError, match=r"built around the image tower Siglip2VisionModel"):
        explain(whole, naflex_batch())
    tower = WithHead(whole.vision_model, lambda output, _mask: output.pooler_output).eval()
    assert explain(tower, naflex_batch(), method="rollout").layer_names[-1] == "head.attention"


def test_bad_inputs_are_refused_in_one_line_naming_the_argument_and_the_fix() -> None:
    model, batch = make("classifier"), naflex_batch()
    cases: list[tuple[object, type, str]] = [
        (torch.randn(2, 3, 12, 16), TypeError, r"^`images` must be the dict of 'pixel_values' .* not a tensor \[2, 3,"),
        (
            {
                "patches": batch["pixel_values"],
                "patch_coord": torch.zeros(2, LENGTH, 2, dtype=torch.long),
                "patch_valid": batch["pixel_attention_mask"].bool(),
            },
            TypeError,
            r"^`images` is a NaFlex batch with keys \['patches', .*Siglip2ForImageClassification takes the dict of",
        ),
        (
            dict(batch, spatial_shapes=None),
            TypeError,
            r"^`images` is a NaFlex batch without tensor\(s\) 'spatial_shapes'; pass the dict",
        ),
        (
            dict(batch, pixel_attention_mask=batch["pixel_attention_mask"].roll(1, dims=1)),
            ValueError,
            r"^`images\['pixel_attention_mask'\]` of image 0 must mark its first 6 patches \(spatial_shapes \[2, 3\]\)",
        ),
        (
            dict(batch, spatial_shapes=torch.tensor([[2, 3], [4, 4]])),
            ValueError,
            r"^`images\['spatial_shapes'\]` \[\[2, 3\], \[4, 4\]\] must hold grids of at least one and at most 14",
        ),
        (
            dict(batch, pixel_values=batch["pixel_values"][..., :27]),
            ValueError,
            r"^`images` patches have 27 values each, but Siglip2ForImageClassification takes 3x4x4 = 48",
        ),
        (
            dict(batch, spatial_shapes=batch["spatial_shapes"].float()),
            ValueError,
            r"^`images\['spatial_shapes'\]` must be an integer tensor \[2, 2\]",
        ),
    ]
    for images, error, pattern in cases:
        with pytest.raises(error, match=pattern) as caught:
            explain(model, images)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"^`discard_ratio` must be 0 for a NaFlex batch"):
        explain(model, batch, method="rollout", discard_ratio=0.5)


# --- Head tools -------------------------------------------------------------------------------------------------------

# Ragged on purpose: 2 and 1 heads remain.
KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_pruned_equals_masked(implementation: str) -> None:
    model, batch = make("classifier"), naflex_batch()
    model.config._attn_implementation = implementation
    masked = copy.deepcopy(model)
    attentions = [module for module in masked.modules() if type(module).__name__ == "Siglip2Attention"]
    zeroed_output_columns(attentions, KEEP, HEAD_DIM, "out_proj")
    expected = logits_of(masked, batch)
    with head_mask(model, KEEP):
        torch.testing.assert_close(logits_of(model, batch), expected, rtol=1e-5, atol=1e-5)
    prune_heads(model, KEEP)
    assert head_counts(model) == [2, 1]
    torch.testing.assert_close(logits_of(model, batch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(make("classifier"), batch), expected, atol=1e-3)  # the heads did matter
    pruned, reference_result = (explain(m, batch, method="gmar_l1") for m in (model, masked))
    torch.testing.assert_close(pruned.token_maps, reference_result.token_maps, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert pruned.head_weights[:, KEEP == 0].isnan().all()
    labels = torch.tensor([0, 3])
    importance = michel_importance(model, [(batch, labels)], normalize_per_layer=False, progress=False)
    expected_importance = michel_importance(masked, [(batch, labels)], normalize_per_layer=False, progress=False)
    assert importance[KEEP == 0].isnan().all()
    torch.testing.assert_close(importance[KEEP == 1], expected_importance[KEEP == 1], rtol=1e-4, atol=1e-6)
