"""NaFlexViT on NaFlex batches: images of different sizes as patch sequences padded to one length.

The reference works image by image with the padding removed: each block's attention is recomputed from its ``qkv``
over the image's own tokens (prefix tokens and valid patches) and must equal the model's masked attention there; the
gradients come from one ``torch.autograd.grad`` on the model's captured attention (and on the pool's attention,
recomputed from its ``q`` and ``kv`` with the key mask in place of the pool); the rollout is written here as full
products over the image's own tokens. Nothing here calls the package's plan, mixing or method helpers.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.data.naflex_transforms import patchify_image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from gmar_lightning import METHODS, explain
from gmar_lightning.engine import explain_many
from tests.models import TINY, sharpen
from tests.reference import fuse_heads, roll_out_row

ATOL = 1e-5
PATCH = 8
# Different sizes, the smaller first: its 2x3 grid is padded to the 3x4 grid's 12 patches.
SIZES = [(16, 24), (24, 32)]


def make(pool: str) -> nn.Module:
    torch.manual_seed(0)
    name = {"gap": "naflexvit_base_patch16_gap", "map": "naflexvit_base_patch16_map"}[pool]
    model = timm.create_model(name, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    return sharpen(model).eval()


def images_of(sizes: list[tuple[int, int]] = SIZES) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, *size, generator=generator) for size in sizes]


def naflex_batch(images: list[Tensor], length: int | None = None) -> dict[str, Tensor]:
    """timm's patchify per image, padded with zero patches at cell (0, 0) to ``length`` (the collator's padding)."""
    parts = [patchify_image(image, (PATCH, PATCH)) for image in images]
    length = length or max(len(patches) for patches, _, _ in parts)
    patches = torch.zeros(len(parts), length, parts[0][0].shape[1])
    coord = torch.zeros(len(parts), length, 2, dtype=torch.long)
    valid = torch.zeros(len(parts), length, dtype=torch.bool)
    for index, (image_patches, image_coord, image_valid) in enumerate(parts):
        count = len(image_patches)
        patches[index, :count], coord[index, :count], valid[index, :count] = image_patches, image_coord, image_valid
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def masked_pool(pool: nn.Module, x: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor]:
    """timm's AttentionPoolLatent written out, padding keys masked: (output, attention ``[B, H, latents, keys]``)."""
    batch, tokens, channels = x.shape
    heads, head_dim = pool.num_heads, channels // pool.num_heads
    q = pool.q(pool.latent.expand(batch, -1, -1)).view(batch, -1, heads, head_dim).transpose(1, 2)
    k, v = pool.kv(x).view(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = pool.q_norm(q), pool.k_norm(k)
    logits = (q @ k.transpose(-2, -1) / head_dim**0.5).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    attention = torch.softmax(logits, dim=-1)
    out = pool.proj((attention @ v).transpose(1, 2).reshape(batch, -1, channels))
    out = out + pool.mlp(pool.norm(out))
    return (out[:, 0] if pool.pool == "token" else out.mean(1)), attention


def capture(model: nn.Module, batch: dict[str, Tensor]):
    """The blocks' attention (``attn_drop`` input, unfused) and ``qkv``, the pool's masked attention, and the
    gradients of the attention."""
    model = copy.deepcopy(model)
    attentions: list[Tensor] = []
    qkvs: list[Tensor] = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: attentions.append(inputs[0]))
        block.attn.qkv.register_forward_hook(lambda _m, _inputs, out: qkvs.append(out.detach()))
    pooled: list[Tensor] = []

    def replace_pool(module: nn.Module, args: tuple, _kwargs: dict, output: Tensor) -> Tensor:
        recomputed, attention = masked_pool(module, args[0], batch["patch_valid"])
        torch.testing.assert_close(recomputed, output, rtol=1e-5, atol=1e-5)  # the formulas are the pool's
        pooled.append(attention)
        return recomputed

    if model.attn_pool is not None:
        model.attn_pool.register_forward_hook(replace_pool, with_kwargs=True)
    with torch.enable_grad():
        logits = model(batch)
        targets = logits.argmax(-1)
        grads = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), [*attentions, *pooled])
    every = [a.detach() for a in [*attentions, *pooled]]
    return every, list(grads), qkvs


def reference(model: nn.Module, batch: dict[str, Tensor], method: str) -> list[tuple[Tensor, Tensor | None]]:
    """Per image: the token map on its own grid and the head weights ``[L (+ pool), H]``, padding removed."""
    attentions, grads, qkvs = capture(model, batch)
    prefix, heads = model.num_prefix_tokens, model.blocks[0].attn.num_heads
    pooled = model.attn_pool is not None
    out = []
    for image, valid in enumerate(batch["patch_valid"]):
        patches = valid.nonzero().flatten()
        own = torch.cat([torch.arange(prefix), prefix + patches])  # the image's tokens: no padding slot
        count = len(own)
        matrices, weights = [], []
        for layer in range(len(model.blocks)):
            qkv = qkvs[layer][image, own].view(count, 3, heads, -1)
            q, k = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1)
            recomputed = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
            attention = attentions[layer][image][:, own][:, :, own]
            torch.testing.assert_close(attention, recomputed, rtol=1e-5, atol=1e-6)  # the mask: the image alone
            matrix, weight = fuse_heads(method, recomputed, grads[layer][image][:, own][:, :, own])
            matrices.append(matrix)
            weights.append(weight)
        row = torch.zeros(count)
        if pooled:  # the pool's fused attention over the valid patches is the read-out row; no residual
            pool_matrix, pool_weight = fuse_heads(
                method, attentions[-1][image][..., patches], grads[-1][image][..., patches]
            )
            latents = model.attn_pool.latent_len
            latent_weights = torch.full((latents,), 1.0 / latents)
            if model.attn_pool.pool == "token":
                latent_weights = nn.functional.one_hot(torch.tensor(0), latents).float()
            row[prefix:] = latent_weights @ pool_matrix
            weights.append(pool_weight)
        else:  # global average pooling over the image's valid patches
            row[prefix:] = 1.0 / len(patches)
        row = roll_out_row(row, matrices, method, pooled)
        cells = batch["patch_coord"][image, patches]
        grid = torch.full((int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1), float("nan"))
        grid[cells[:, 0], cells[:, 1]] = row[prefix:]
        out.append((grid, torch.stack(weights) if weights[0] is not None else None))
    return out


@pytest.mark.parametrize("pool", ["gap", "map"])
@pytest.mark.parametrize("method", METHODS)
def test_a_padded_batch_matches_the_formulas_image_by_image(pool: str, method: str) -> None:
    model = make(pool)
    batch = naflex_batch(images_of())
    result = explain(model, batch, method=method)
    assert result.grid_sizes.tolist() == [[2, 3], [3, 4]]
    assert result.token_maps.shape == (2, 3, 4) and result.maps.shape == (2, 24, 32)
    for image, (grid, weights) in enumerate(reference(model, batch, method)):
        height, width = grid.shape
        torch.testing.assert_close(result.token_maps[image, :height, :width], grid, rtol=1e-4, atol=ATOL)
        # Outside its own grid an image has no map: NaN, in the token maps and the upsampled maps.
        assert result.token_maps[image].isfinite().sum() == height * width
        assert result.maps[image].isfinite().sum() == height * width * PATCH * PATCH
        assert result.maps[image, : height * PATCH, : width * PATCH].isfinite().all()
        if weights is not None:
            torch.testing.assert_close(result.head_weights[image], weights, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("pool", ["gap", "map"])
@pytest.mark.parametrize("method", METHODS)
def test_each_image_of_a_padded_batch_is_explained_as_it_is_alone(pool: str, method: str) -> None:
    model = make(pool)
    images = images_of()
    padded = explain(model, naflex_batch(images), method=method)
    split = explain(model, naflex_batch(images), method=method, chunk_size=1)
    torch.testing.assert_close(split.token_maps, padded.token_maps, rtol=0, atol=1e-6, equal_nan=True)
    for index, image in enumerate(images):
        height, width = padded.grid_sizes[index].tolist()
        for alone in (explain(model, naflex_batch([image]), method=method), explain(model, image[None], method=method)):
            assert alone.token_maps.shape == (1, height, width)
            own = padded.token_maps[index, :height, :width]
            torch.testing.assert_close(own, alone.token_maps[0], atol=ATOL, rtol=0)
            own = padded.maps[index, : height * PATCH, : width * PATCH]
            torch.testing.assert_close(own, alone.maps[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(padded.logits[index], alone.logits[0], atol=ATOL, rtol=0)
            if alone.head_weights is not None:
                torch.testing.assert_close(padded.head_weights[index], alone.head_weights[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["gmar_l1", "grad_rollout", "rollout"])
def test_padding_takes_no_part_whatever_it_holds(method: str) -> None:
    model = make("map")
    images = images_of()
    batch = naflex_batch(images, length=16)  # four more padding slots than the larger image needs
    result = explain(model, batch, method=method)
    noisy = dict(batch, patches=batch["patches"].clone())
    padding = ~batch["patch_valid"]
    noisy["patches"][padding] = torch.randn(int(padding.sum()), batch["patches"].shape[-1]) * 100
    changed = explain(model, noisy, method=method)
    torch.testing.assert_close(changed.token_maps, result.token_maps, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(changed.head_weights, result.head_weights, rtol=0, atol=1e-6)
    # Padding slots sit at cell (0, 0), which the image's own first patch holds: the map there is that patch's.
    tight = explain(model, naflex_batch(images), method=method)
    torch.testing.assert_close(result.token_maps, tight.token_maps, rtol=0, atol=ATOL, equal_nan=True)


def test_a_naflexvit_inside_a_module_is_explained_as_it_classifies() -> None:
    # The read-out check runs on the first image with one padding slot: a wrapper that passes the batch on reads
    # what the NaFlexViT reads.
    model = make("map")
    batch = naflex_batch(images_of())
    wrapped = explain(nn.Sequential(model), batch, method="gmar_l1")
    alone = explain(model, batch, method="gmar_l1")
    torch.testing.assert_close(wrapped.token_maps, alone.token_maps, rtol=0, atol=0, equal_nan=True)
    assert wrapped.layer_names == alone.layer_names


def test_explain_many_on_a_padded_batch_equals_explain_per_method() -> None:
    model = make("map")
    batch = naflex_batch(images_of())
    for name, result in explain_many(model, batch, METHODS).items():
        alone = explain(model, batch, method=name)
        torch.testing.assert_close(result.token_maps, alone.token_maps, rtol=0, atol=1e-6, equal_nan=True)
        assert torch.equal(result.grid_sizes, alone.grid_sizes)


def test_masked_inputs_take_the_materialised_path_when_attention_is_recomputed() -> None:
    # recompute_attention (the default) recomputes softmax(q k^T) without the padding mask: NaFlex batches fall back.
    model = make("gap")
    batch = naflex_batch(images_of())
    for method in ("gmar_l2", "rollout", "grad_rollout"):
        recomputed = explain(model, batch, method=method, recompute_attention=True)
        materialised = explain(model, batch, method=method, recompute_attention=False)
        torch.testing.assert_close(recomputed.token_maps, materialised.token_maps, rtol=0, atol=0, equal_nan=True)
        grid, _ = reference(model, batch, method)[0]
        torch.testing.assert_close(recomputed.token_maps[0, :2, :3], grid, rtol=1e-4, atol=ATOL)


def test_naflex_batch_refusals_name_the_argument_and_the_fix() -> None:
    model = make("gap")
    batch = naflex_batch(images_of())
    with pytest.raises(TypeError, match=r"only timm's NaFlexViT and transformers' SigLIP 2 take, not VisionTransf"):
        explain(VisionTransformer(**TINY).eval(), batch)
    hf_keys = {"pixel_values": batch["patches"], "pixel_attention_mask": batch["patch_valid"]}
    with pytest.raises(TypeError, match=r"keys \['pixel_values', .*\]; NaFlexVit takes a dict of 'patches' \[B, N"):
        explain(model, hf_keys)
    with pytest.raises(ValueError, match=r"`discard_ratio` must be 0 for a NaFlex batch"):
        explain(model, batch, method="rollout", discard_ratio=0.5)
    with pytest.raises(TypeError, match=r"without tensor\(s\) 'patch_coord'"):
        explain(model, {"patches": batch["patches"], "patch_valid": batch["patch_valid"]})
    with pytest.raises(ValueError, match=r"`images\['patch_coord'\]` must be an integer tensor \[2, 12, 2\]"):
        explain(model, dict(batch, patch_coord=batch["patch_coord"].float()))
    with pytest.raises(ValueError, match=r"`images\['patch_valid'\]` must be a bool tensor \[2, 12\]"):
        explain(model, dict(batch, patch_valid=batch["patch_valid"].float()))
    empty = batch["patch_valid"].clone()
    empty[0] = False
    with pytest.raises(ValueError, match=r"an image without a valid patch; drop it"):
        explain(model, dict(batch, patch_valid=empty))
    doubled = batch["patch_coord"].clone()
    doubled[1, 1] = doubled[1, 0]
    negative = batch["patch_coord"].clone()
    negative[0, 0, 1] = -1
    with pytest.raises(ValueError, match=r"`images\['patch_coord'\]` has a negative cell among the valid patches"):
        explain(model, dict(batch, patch_coord=negative))
    with pytest.raises(ValueError, match=r"puts two valid patches of image 1 \(grid \[3, 4\]\) on one cell"):
        explain(model, dict(batch, patch_coord=doubled))
