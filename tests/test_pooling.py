"""Attention pooling (timm ``global_pool='map'``: SigLIP, SigLIP 2, Perception Encoder) and NaFlexViT on image tensors.

The reference recomputes the pool's attention from its own ``q`` and ``kv`` projections, runs the rest of the pool
from timm's formulas in place of the pool (its output must match the model's), captures each block's attention at
the input of ``attn_drop`` and takes every gradient with one ``torch.autograd.grad``. The rollout is written here as
full ``N x N`` products: the pool's fused attention gives the read-out row over the tokens (no residual, latents
weighted as the pool pools them), which then crosses the blocks last to first. Nothing here calls the package's plan,
mixing or method helpers.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import AttentionPoolLatent
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from gmar_lightning import METHODS, explain
from gmar_lightning.families import UnsupportedModelError
from gmar_lightning.tokens import TokenLayout
from tests.models import TINY, sharpen

ATOL = 1e-5
DYNAMIC = {**TINY, "dynamic_img_size": True}


def latent_pool(embed_dim: int, heads: int, latents: int, pool_type: str) -> AttentionPoolLatent:
    return AttentionPoolLatent(
        embed_dim, num_heads=heads, latent_len=latents, pool_type=pool_type, norm_layer=nn.LayerNorm
    )


def vit_with_pool(latents: int, pool_type: str, **config) -> nn.Module:
    model = VisionTransformer(global_pool="map", **config)
    model.attn_pool = latent_pool(model.embed_dim, 2, latents, pool_type)
    return model


MODELS = {
    # SigLIP: no class token, the pool reads every token.
    "siglip": lambda: timm.create_model("vit_base_patch16_siglip_224", **DYNAMIC),
    # SigLIP 2 weights load into the same timm architecture; with a class token and registers, the pool skips them.
    "vit_map_prefix": lambda: VisionTransformer(global_pool="map", reg_tokens=2, **DYNAMIC),
    # Perception Encoder: EVA with rotary embeddings, a class token that the pool reads too, fewer pool heads.
    "pe": lambda: timm.create_model(
        "vit_pe_core_base_patch16_224", attn_pool_num_heads=2, ref_feat_shape=(4, 4), **DYNAMIC
    ),
    "eva_map": lambda: Eva(global_pool="map", use_rot_pos_emb=True, **DYNAMIC),
    # Three latent queries, averaged (pool_type='avg') or the first one read (pool_type='token').
    "latents_avg": lambda: vit_with_pool(3, "avg", class_token=False, **DYNAMIC),
    "latents_token": lambda: vit_with_pool(3, "token", **DYNAMIC),
    "naflex_map": lambda: timm.create_model(
        "naflexvit_base_patch16_map", patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5
    ),
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return sharpen(MODELS[name]()).eval()


def images_for(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 32, 48, generator=torch.Generator().manual_seed(1))  # a 4x6 patch grid


def pool_from_formulas(pool: AttentionPoolLatent, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm's AttentionPoolLatent written out: ``softmax(q k^T / sqrt(d))`` of the latents over the tokens, the
    projection, the MLP with its skip, then the first latent or the latents' mean. Returns (output, attention)."""
    batch, tokens, channels = x.shape
    heads, head_dim = pool.num_heads, channels // pool.num_heads
    if pool.pos_embed is not None:
        x = x + pool.pos_embed[None]
    q = pool.q(pool.latent.expand(batch, -1, -1)).view(batch, -1, heads, head_dim).transpose(1, 2)
    k, v = pool.kv(x).view(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = pool.q_norm(q), pool.k_norm(k)
    attention = torch.softmax(q @ k.transpose(-2, -1) / head_dim**0.5, dim=-1)  # [B, H, latents, tokens]
    out = pool.proj((attention @ v).transpose(1, 2).reshape(batch, -1, channels))
    out = out + pool.mlp(pool.norm(out))
    return (out[:, 0] if pool.pool == "token" else out.mean(1)), attention


def capture(model: nn.Module, images: Tensor, target: Tensor | None = None):
    """Every block's attention (``attn_drop`` input, unfused) and the pool's recomputed one, with their gradients."""
    model = copy.deepcopy(model)
    blocks = [block.attn for block in model.blocks]
    for attention in blocks:
        attention.fused_attn = False
    attentions: list[Tensor] = []
    pool_attention: list[Tensor] = []
    for attention in blocks:
        attention.attn_drop.register_forward_hook(lambda _m, inputs, _out: attentions.append(inputs[0]))

    def replace_pool(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        recomputed, attention = pool_from_formulas(module, inputs[0])
        torch.testing.assert_close(recomputed, output, rtol=1e-5, atol=1e-5)  # the formulas are the pool's
        pool_attention.append(attention)
        return recomputed

    model.attn_pool.register_forward_hook(replace_pool)
    with torch.enable_grad():
        logits = model(images)
        targets = logits.argmax(-1) if target is None else target
        objective = logits[torch.arange(len(targets)), targets].sum()
        every = [*attentions, *pool_attention]
        grads = torch.autograd.grad(objective, every)
    return [a.detach() for a in every], list(grads), logits.detach(), targets


def reference(
    model: nn.Module, images: Tensor, method: str, residual: float = 0.5, head_norm: str = "layer"
) -> tuple[Tensor, Tensor | None]:
    """Token maps and head weights ``[B, L + 1, H]`` (the pool last), from the formulas."""
    attentions, grads, _, _ = capture(model, images)
    pool = model.attn_pool
    batch = images.shape[0]
    num_prefix = model.num_prefix_tokens
    grid = (images.shape[-2] // 8, images.shape[-1] // 8)
    num_tokens = num_prefix + grid[0] * grid[1]
    # The pool's keys: VisionTransformer and NaFlexViT drop the prefix tokens before pooling, EVA pools them all.
    keys = (
        list(range(num_prefix, num_tokens))
        if isinstance(model, VisionTransformer) or "naflex" in type(model).__name__.lower()
        else list(range(num_tokens))
    )
    latent_weights = torch.zeros(pool.latent_len)
    if pool.pool == "token":
        latent_weights[0] = 1.0
    else:
        latent_weights[:] = 1.0 / pool.latent_len
    weights_out = None
    if method in ("gmar_l1", "gmar_l2"):
        if method == "gmar_l1":
            scores = [g.double().abs().sum(dim=(2, 3)) for g in grads]
        else:
            scores = [g.double().pow(2).sum(dim=(2, 3)).sqrt() for g in grads]
        if head_norm == "layer":
            weights = [(s / s.sum(1, keepdim=True)).float() for s in scores]
        else:  # over every layer's heads and the pool's
            total = sum(s.sum(1, keepdim=True) for s in scores)
            weights = [(s / total).float() for s in scores]
        width = max(w.shape[1] for w in weights)
        weights_out = torch.stack([nn.functional.pad(w, (0, width - w.shape[1]), value=torch.nan) for w in weights], 1)
        fused = [(w[:, :, None, None] * a).sum(1) for w, a in zip(weights, attentions, strict=True)]
    elif method == "grad_rollout":
        fused = [(g * a).clamp(min=0).mean(1) for g, a in zip(grads, attentions, strict=True)]
    else:
        fused = [a.mean(1) for a in attentions]
    pool_row = torch.einsum("q,bqk->bk", latent_weights, fused[-1])
    row = torch.zeros(batch, num_tokens)
    row[:, keys] = pool_row
    eye = torch.eye(num_tokens)
    if method != "attention":
        for matrix in reversed(fused[:-1]):
            if method == "grad_rollout":
                row = torch.einsum("bi,bij->bj", row, eye + matrix)
            else:
                mixed = residual * eye + (1 - residual) * matrix
                row = torch.einsum("bi,bij->bj", row, mixed / mixed.sum(-1, keepdim=True))
    return row[:, num_prefix:].reshape(batch, *grid), weights_out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_attention_pooled_models_match_the_reference(name: str, method: str) -> None:
    model = make(name)
    images = images_for()
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference(model, images, method)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    assert result.layer_names[-1] == "attn_pool"
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


def test_gmar_head_scores_of_the_pool_agree_with_float64_gradients() -> None:
    model = make("pe")
    images = images_for(3)
    _, grads, _, _ = capture(model, images)
    expected = torch.stack([g.double().abs().sum(dim=(2, 3)) for g in grads[:-1]], 1)
    result = explain(model, images, method="gmar_l1")
    torch.testing.assert_close(result.head_scores[:, :-1].double(), expected, rtol=1e-6, atol=0)
    pool_scores = grads[-1].double().abs().sum(dim=(2, 3))  # 2 pool heads beside 4 block heads: NaN-padded
    torch.testing.assert_close(result.head_scores[:, -1, :2].double(), pool_scores, rtol=1e-6, atol=0)
    assert result.head_scores[:, -1, 2:].isnan().all()


def test_options_act_on_the_blocks_and_the_pool_row_has_no_residual() -> None:
    model = make("siglip")
    images = images_for()
    # residual=1 keeps only the skip connections of the blocks: the map is the pool's own fused attention.
    rolled = explain(model, images, method="rollout", residual=1.0)
    last = explain(model, images, method="attention")
    torch.testing.assert_close(rolled.token_maps, last.token_maps, rtol=1e-5, atol=1e-7)
    # start_layer may skip every block, never the pool.
    only_pool = explain(model, images, method="rollout", start_layer=len(model.blocks))
    torch.testing.assert_close(only_pool.token_maps, last.token_maps, rtol=1e-5, atol=1e-7)
    expected, _ = reference(model, images, "rollout", residual=0.3)
    result = explain(model, images, "rollout", residual=0.3)
    torch.testing.assert_close(result.token_maps, expected, atol=ATOL, rtol=1e-4)
    expected, weights = reference(model, images, "gmar_l2", head_norm="global")
    result = explain(model, images, "gmar_l2", head_norm="global")
    torch.testing.assert_close(result.head_weights, weights, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result.token_maps, expected, atol=ATOL, rtol=1e-4)


def test_capture_leaves_the_pools_computation_unchanged_to_the_bit() -> None:
    model = make("pe")
    images = images_for()
    result = explain(model, images, method="gmar_l1")
    unfused = copy.deepcopy(model)
    for module in unfused.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad():
        assert torch.equal(result.logits, unfused(images))
    assert model.attn_pool.fused_attn == timm.layers.use_fused_attn()
    assert not model.attn_pool._forward_hooks and not model.attn_pool._forward_pre_hooks


def test_a_pool_that_raises_leaves_no_capture_mode_behind() -> None:
    model = make("siglip")

    def fail(*_args: object) -> None:
        raise RuntimeError("pool failure")

    handle = model.attn_pool.mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="pool failure"):
        explain(model, images_for(), method="gmar_l1")
    handle.remove()
    assert not torch.overrides._get_current_function_mode_stack()
    assert explain(model, images_for(), method="rollout").token_maps.isfinite().all()


def test_pool_refusals_name_the_argument_and_the_fix() -> None:
    # A map-pooled classifier's own logits come through its pool: a token layout would explain another read-out.
    with pytest.raises(ValueError, match=r"`token_layout` does not apply .*attention pool.*leave `token_layout` unset"):
        explain(make("siglip"), images_for(), token_layout=TokenLayout(0, None))
    unpooled = vit_with_pool(2, "", **DYNAMIC)
    message = r"returns its 2 latents unpooled \(pool_type=''\).*pool_type='token'"
    with pytest.raises(UnsupportedModelError, match=message):
        explain(unpooled, images_for())
    prr = VisionTransformer(global_pool="prr", **DYNAMIC)
    message = r"global_pool='prr'.*without a skip connection \(PRR\), which gmar-lightning does not map yet"
    with pytest.raises(ValueError, match=message):
        explain(prr, images_for())


def test_naflex_gap_on_image_tensors_matches_the_plain_vit_formulas() -> None:
    # NaFlex batches (padded patch sequences): tests/test_naflex.py.
    torch.manual_seed(0)
    model = sharpen(
        timm.create_model("naflexvit_base_patch16_gap", patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    ).eval()
    images = images_for()
    blocks = [block.attn for block in model.blocks]
    reference_model = copy.deepcopy(model)
    captured: list[Tensor] = []
    for attention in reference_model.blocks:
        attention.attn.fused_attn = False
        attention.attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    with torch.no_grad():
        reference_model(images)
    prefix = model.num_prefix_tokens
    num_tokens = captured[0].shape[-1]
    row = torch.zeros(2, num_tokens)
    row[:, prefix:] = 1.0 / (num_tokens - prefix)  # gap: the mean of the patch tokens
    eye = torch.eye(num_tokens)
    for attention in reversed(captured):
        mixed = 0.5 * eye + 0.5 * attention.mean(1)
        row = torch.einsum("bi,bij->bj", row, mixed / mixed.sum(-1, keepdim=True))
    result = explain(model, images, method="rollout")
    torch.testing.assert_close(result.token_maps, row[:, prefix:].reshape(2, 4, 6), rtol=1e-4, atol=ATOL)
    assert len(blocks) == len(result.layer_names)


# Head tools on a map-pooled ViT: the pool is the last row of the head grid. Ragged on purpose: the blocks keep 2, 4
# and 1 heads, the pool keeps 3 of its 4.
POOL_KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def pooled_vit(seed: int = 0) -> nn.Module:
    """SigLIP-shaped, with non-zero biases so that slicing mistakes show."""
    torch.manual_seed(seed)
    model = VisionTransformer(global_pool="map", class_token=False, **DYNAMIC)
    model.attn_pool = latent_pool(model.embed_dim, 4, 1, "token")
    model = sharpen(model, seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def zeroed_heads(model: nn.Module, keep: Tensor) -> nn.Module:
    """Reference masking: zero the input columns of `proj` that carry the dropped heads (blocks and pool)."""
    reference = copy.deepcopy(model)
    modules = [block.attn for block in reference.blocks] + [reference.attn_pool]
    with torch.no_grad():
        for module, row in zip(modules, keep, strict=True):
            module.proj.weight.mul_(row.repeat_interleave(module.proj.in_features // module.num_heads))
    return reference


def test_the_pools_heads_are_the_last_row_of_the_head_grid_and_mask_like_the_reference() -> None:
    from gmar_lightning.heads import attention_head_grid, head_mask

    model, images = pooled_vit(), images_for()
    assert attention_head_grid(model) == (4, 4)
    with torch.no_grad(), head_mask(model, POOL_KEEP):
        masked = model(images)
        expected = zeroed_heads(model, POOL_KEEP)(images)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)


def test_pruning_the_pools_heads_equals_masking_them() -> None:
    from gmar_lightning.heads.pruning import head_counts, prune_heads

    model, images = pooled_vit(), images_for()
    masked = zeroed_heads(model, POOL_KEEP)
    prune_heads(model, POOL_KEEP)
    assert head_counts(model) == [2, 4, 1, 3]
    with torch.no_grad():
        expected = masked(images)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        model.attn_pool.fused_attn = False
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pooled_vit()(images), expected, atol=1e-3)  # the heads did matter
    # GMAR on the pruned model: a removed head is NaN where the masked model weighs it 0; maps agree.
    pruned, reference = explain(model, images, "gmar_l1"), explain(masked, images, "gmar_l1")
    torch.testing.assert_close(pruned.token_maps, reference.token_maps, rtol=1e-4, atol=1e-5)
    missing = POOL_KEEP == 0
    assert pruned.head_weights[:, missing].isnan().all() and (reference.head_weights[:, missing] == 0).all()
    torch.testing.assert_close(pruned.head_weights[:, ~missing], reference.head_weights[:, ~missing], atol=1e-6, rtol=0)


def test_michel_importance_scores_the_pools_heads() -> None:
    from gmar_lightning.heads import michel_importance

    model = pooled_vit()
    images = images_for(4)
    labels = torch.tensor([0, 1, 2, 3])
    importance = michel_importance(model, [(images, labels)], normalize_per_layer=False, progress=False)
    # Reference: |d loss / d xi| for a gate xi on the pool's heads, from the formulas at `proj`'s input.
    gate = torch.ones(4, 4, requires_grad=True)  # [B, pool heads]
    reference = copy.deepcopy(model)

    def scale(_module: nn.Module, inputs: tuple) -> tuple:
        per_head = inputs[0].unflatten(-1, (4, -1)) * gate[:, None, :, None]
        return (per_head.flatten(-2),)

    reference.attn_pool.proj.register_forward_pre_hook(scale)
    losses = nn.functional.cross_entropy(reference(images), labels, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), gate)
    torch.testing.assert_close(importance[-1], grad.abs().mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_head_pruning_fit_prunes_the_pools_heads_by_gmar(tmp_path) -> None:
    """A real fit of a map-pooled ViT with GMARCallback and HeadPruning: the pool's heads are scored, recorded in the
    trajectory as the layer `attn_pool`, and pruned like the blocks' heads."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gmar_lightning import GMARCallback, HeadPruning
    from gmar_lightning.heads.pruning import head_counts
    from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

    torch.manual_seed(0)
    module = TinyViTModule()
    module.vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4, class_token=False,
        global_pool="map",
    )  # fmt: skip
    gmar = GMARCallback(num_probe=8)
    pruning = HeadPruning(amount=4, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=4)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[gmar, pruning]))
    trainer.fit(module, datamodule=tiny_data())

    assert gmar.trajectory.layer_names == ["blocks.0.attn", "blocks.1.attn", "attn_pool"]
    weights = gmar.trajectory.weights[0]  # epoch 0: every head, the pool's too
    assert weights.shape == (3, 4) and torch.allclose(weights.sum(-1), torch.ones(3))
    removed = pruning.history[0]["removed"]
    removed_pairs = [(name, head) for name, heads in removed.items() for head in heads]
    names = gmar.trajectory.layer_names
    kept = [(n, h) for n in names for h in range(4) if (n, h) not in removed_pairs]
    score = {(n, h): weights[names.index(n), h].item() for n in names for h in range(4)}
    assert max(score[pair] for pair in removed_pairs) <= min(score[pair] for pair in kept)
    assert sum(head_counts(module.vit)) == 12 - 4
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    # A point at the start of the fit, then one at the pruning: the pool's heads count like the blocks'.
    assert [event.value for event in events.Scalars("head_pruning/heads")] == [12.0, 8.0]


class UserHead(nn.Module):
    """A map-pooled backbone without classifier under a head of the user's own, on its pooled output or not."""

    def __init__(self, backbone: nn.Module, through_pool: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.through_pool = backbone, nn.Linear(32, 3), through_pool

    def forward(self, images: Tensor) -> Tensor:
        if self.through_pool:
            return self.head(self.backbone(images))
        return self.head(self.backbone.forward_features(images).mean(1))


@pytest.mark.parametrize("method", METHODS)
def test_a_user_head_on_the_pool_reads_the_pool_and_one_that_bypasses_it_reads_the_tokens(method: str) -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("vit_base_patch16_siglip_224", **{**DYNAMIC, "num_classes": 0}).eval()
    images = images_for()
    user = UserHead(backbone, through_pool=True)
    # Through the pool, the user's head explains as the same head inside the timm classifier.
    classifier = copy.deepcopy(backbone)
    classifier.reset_classifier(3)
    classifier.head = copy.deepcopy(user.head)
    result, expected = explain(user, images, method=method), explain(classifier, images, method=method)
    torch.testing.assert_close(result.token_maps, expected.token_maps, rtol=1e-5, atol=1e-7)
    assert result.layer_names[-1] == "attn_pool"
    # Around the pool (a mean of forward_features), the read-out check infers the patch mean: no pool layer.
    around = UserHead(backbone, through_pool=False)
    bypass = explain(around, images, method=method)
    stated = explain(around, images, method=method, token_layout=TokenLayout(0, None))
    assert "attn_pool" not in bypass.layer_names
    assert torch.equal(bypass.token_maps, stated.token_maps)
