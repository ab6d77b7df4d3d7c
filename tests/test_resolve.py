"""One resolution step: a model resolved once (by ``explain``, or once per fit by the callback), and the read-out of a
user's own head checked against the gradient and inferred from it, never silently wrong.

The references are written here from the formulas: a timm ViT's attention recomputed as ``softmax(q k^T * scale)``
from its own ``qkv`` weights in a hand-written forward, transformers' attention read through its own
``output_attentions`` under eager attention, both rolled out by ``tests.reference`` with the read-out stated by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import gmar_lightning.resolve as resolve
from gmar_lightning import METHODS, GMARCallback, HeadPruning, TokenLayout, explain
from gmar_lightning.families import UnsupportedModelError
from gmar_lightning.heads.pruning import prune_heads
from gmar_lightning.resolve import ResolvedModel, resolve_model
from tests.lightning_helpers import ClassifierModule, tiny_data, trainer_kwargs
from tests.reference import reference_from_attention

GRID = (4, 4)
PATCHES = GRID[0] * GRID[1]
ATOL = 1e-5


def sharpened(model: nn.Module) -> nn.Module:
    """Large random weights, tokens and position tables: peaked attention, so that read-outs give different maps."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 or "token" in name or "position" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def images(batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------------
# timm: a ViT built with num_classes=0 under heads of the user's own
# ------------------------------------------------------------------------------------------------------------------

POOLINGS: dict[str, tuple[Callable[[Tensor], Tensor], int, list[int] | Tensor | None]] = {
    # name -> (pooling of the normed tokens [B, 17, D] into the head's input, head input width in D, read-out)
    "class_token": (lambda tokens: tokens[:, 0], 1, [0]),
    "patch_mean": (lambda tokens: tokens[:, 1:].mean(1), 1, None),
    "all_mean": (lambda tokens: tokens.mean(1), 1, list(range(1 + PATCHES))),
    "class_and_patch_mean": (
        lambda tokens: torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1),
        2,
        torch.cat([torch.tensor([0.5]), torch.full((PATCHES,), 0.5 / PATCHES)]),
    ),
}


class TimmHead(nn.Module):
    """A timm ViT without a classifier (``num_classes=0``) and a linear head on a pooling of its tokens."""

    def __init__(self, pooling: str, num_classes: int = 5, **vit_options: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0, **vit_options
        )
        self.pool, width, _ = POOLINGS[pooling]
        self.head = nn.Linear(32 * width, num_classes)
        sharpened(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.vit.forward_features(x)))


def timm_reference(model: TimmHead, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Every block's attention recomputed from its ``qkv`` weights, and its gradient of the predicted logits."""
    vit, attentions = model.vit, []
    with torch.enable_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks:
            normed = block.norm1(tokens)
            batch, count, width = normed.shape
            heads = block.attn.num_heads
            q, k, v = block.attn.qkv(normed).reshape(batch, count, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
            attentions.append(attention)
            mixed = block.attn.proj((attention @ v).transpose(1, 2).reshape(batch, count, width))
            tokens = tokens + block.ls1(mixed)
            tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
        logits = model.head(model.pool(vit.norm(tokens)))
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)  # the hand-written forward is the model's
        objective = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        grads = list(torch.autograd.grad(objective, attentions))
    return [a.detach() for a in attentions], grads


def assert_explained_as(model: nn.Module, x: Tensor, method: str, expected: Tensor, weights: Tensor | None) -> None:
    """``explain``'s token maps (and GMAR head weights) equal the reference's."""
    result = explain(model, x, method)
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)
    if weights is not None:
        torch.testing.assert_close(result.head_weights, weights, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("method", METHODS)
def test_timm_headless_vit_under_a_users_head_matches_reference(pooling: str, method: str) -> None:
    model, x = TimmHead(pooling), images()
    attentions, grads = timm_reference(model, x)
    expected, weights = reference_from_attention(
        attentions, grads, method, num_prefix=1, readout=POOLINGS[pooling][2], grid=GRID
    )
    assert_explained_as(model, x, method, expected, weights)


@pytest.mark.parametrize("method", METHODS)
def test_a_head_that_bypasses_the_attention_pool_is_read_out_linearly(method: str) -> None:
    """A map-pooled ViT (SigLIP-style: no class token) under a head on the mean of its tokens, not on its pool."""
    model, x = TimmHead("all_mean", global_pool="map", class_token=False), images()
    attentions, grads = timm_reference(model, x)
    expected, _ = reference_from_attention(attentions, grads, method, num_prefix=0, readout=None, grid=GRID)
    torch.testing.assert_close(explain(model, x, method).token_maps, expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
def test_a_head_on_the_attention_pool_is_read_out_through_the_pool(method: str) -> None:
    """The pool's output under a head of the user's own is explained as the same ViT with that head as its own."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, global_pool="map"
    )
    vit = sharpened(vit)
    separate = nn.Sequential(copy.deepcopy(vit), nn.Identity())
    separate[1] = separate[0].head
    separate[0].reset_classifier(0)
    x = images()
    torch.testing.assert_close(separate(x), vit(x))
    torch.testing.assert_close(explain(separate, x, method).token_maps, explain(vit, x, method).token_maps)


@pytest.mark.parametrize("method", METHODS)
def test_a_class_token_head_gives_the_maps_it_gave_before(method: str) -> None:
    """The check confirms the family's read-out: the maps are bit for bit those of the stated class-token layout."""
    model, x = TimmHead("class_token"), images()
    resolved = resolve_model(model)
    checked = explain(resolved, x, method)
    assert resolved.readout(x) is None  # the family's own read-out, confirmed
    stated = explain(model, x, method, token_layout=TokenLayout(num_prefix_tokens=1, readout_tokens=(0,)))
    assert torch.equal(checked.token_maps, stated.token_maps)


def test_the_patch_mean_read_out_differs_from_the_class_tokens() -> None:
    """Without the check the patch-mean head would get the class token's map: the two are far apart here."""
    model, x = TimmHead("patch_mean"), images()
    inferred = explain(model, x, "gmar_l1").token_maps
    class_token = explain(model, x, "gmar_l1", token_layout=TokenLayout(1, (0,))).token_maps
    assert (inferred - class_token).norm() > 0.3 * inferred.norm()


class Unpooled(nn.Module):
    """Heads that read the tokens in no linear pooling: the flattened patch tokens, or a few patches only."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
        self.reads = reads
        self.head = nn.Linear(32 * PATCHES if reads == "flattened" else 32, 5)
        sharpened(self)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit.forward_features(x)
        if self.reads == "flattened":
            return self.head(tokens[:, 1:].flatten(1))
        return self.head(tokens[:, 1:5].mean(1))


@pytest.mark.parametrize("reads", ["flattened", "some_patches"])
def test_a_read_out_in_no_linear_pooling_is_refused_in_one_line(reads: str) -> None:
    model = Unpooled(reads)
    with pytest.raises(UnsupportedModelError, match=r"token_layout=TokenLayout\(\.\.\.\)") as error:
        explain(model, images(), "rollout")
    assert "\n" not in str(error.value) and "Unpooled" in str(error.value)
    # Stating the read-out is the fix: the check is skipped.
    explain(model, images(), "rollout", token_layout=TokenLayout(1, None))


def test_the_check_runs_once_per_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = resolve.checked_readout
    monkeypatch.setattr(resolve, "checked_readout", lambda *args: calls.append(1) or real(*args))
    model, x = TimmHead("patch_mean"), images()
    resolved = resolve_model(model)
    for method in ("rollout", "attention", "gmar_l1"):
        explain(resolved, x, method)
    explain(resolved, x[:1], "rollout")
    assert len(calls) == 1
    explain(model, x, "rollout")  # a raw module is resolved, and checked, afresh
    assert len(calls) == 2


def test_an_undecided_check_is_not_kept() -> None:
    """NaN logits leave the read-out undecided: the engine reports them, and the next call checks again."""
    model, x = TimmHead("patch_mean"), images()
    resolved = resolve_model(model)
    weight = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf logits"):
        explain(resolved, x, "rollout")
    with torch.no_grad():
        model.head.weight.copy_(weight)
    stated = explain(model, x, "rollout", token_layout=TokenLayout(1, None))
    assert torch.equal(explain(resolved, x, "rollout").token_maps, stated.token_maps)


def test_models_that_classify_themselves_are_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(resolve, "checked_readout", lambda *args: calls.append(1))
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    explain(vit, images(), "rollout")
    assert calls == []


# ------------------------------------------------------------------------------------------------------------------
# transformers: Dinov2Model under heads of the user's own
# ------------------------------------------------------------------------------------------------------------------


class DinoHead(nn.Module):
    """A bare ``Dinov2Model`` and a linear head on the mean of its patch tokens (or on its class token)."""

    def __init__(self, pooling: str) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.Dinov2Config(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        self.backbone = transformers.Dinov2Model(config)
        self.pool, width, _ = POOLINGS[pooling]
        self.head = nn.Linear(32 * width, 5)
        sharpened(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.backbone(pixel_values=x).last_hidden_state))


def dino_reference(model: DinoHead, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Attention through transformers' own ``output_attentions`` on an eager copy, and its gradient."""
    reference = copy.deepcopy(model)
    reference.backbone.config._attn_implementation = "eager"
    with torch.enable_grad():
        output = reference.backbone(pixel_values=x.clone(), output_attentions=True)
        logits = reference.head(reference.pool(output.last_hidden_state))
        objective = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        grads = list(torch.autograd.grad(objective, output.attentions))
    return [a.detach() for a in output.attentions], grads


@pytest.mark.parametrize("pooling", ["patch_mean", "class_token"])
@pytest.mark.parametrize("method", METHODS)
def test_dinov2_backbone_under_a_users_head_matches_reference(pooling: str, method: str) -> None:
    model, x = DinoHead(pooling), images()
    attentions, grads = dino_reference(model, x)
    expected, weights = reference_from_attention(
        attentions, grads, method, num_prefix=1, readout=POOLINGS[pooling][2], grid=GRID
    )
    assert_explained_as(model, x, method, expected, weights)


BACKBONES = {
    # name -> (the transformers backbone, its prefix tokens)
    "clip": (lambda t, sizes: t.CLIPVisionModel(t.CLIPVisionConfig(**sizes)), 1),
    "siglip": (lambda t, sizes: t.SiglipVisionModel(t.SiglipVisionConfig(**sizes)), 0),  # with its pooling head
}


class BackboneHead(nn.Module):
    """A CLIP or SigLIP vision backbone and a linear head on the mean of its patch tokens, or on its pooled output."""

    def __init__(self, backbone: str, reads: str) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        make, self.num_prefix = BACKBONES[backbone]
        self.backbone = make(transformers, {"image_size": 32, "patch_size": 8, **sizes})
        self.reads = reads
        self.head = nn.Linear(32, 5)
        sharpened(self)

    def pool(self, output: object) -> Tensor:
        if self.reads == "pooler":
            return output.pooler_output
        return output.last_hidden_state[:, self.num_prefix :].mean(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.backbone(pixel_values=x)))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_clip_and_siglip_backbones_under_a_patch_mean_head_match_reference(backbone: str, method: str) -> None:
    """CLIP's assumed read-out is its class token, SigLIP's its attention pool: the head reads neither."""
    model, x = BackboneHead(backbone, "patch_mean"), images()
    reference = copy.deepcopy(model)
    reference.backbone.config._attn_implementation = "eager"
    with torch.enable_grad():
        output = reference.backbone(pixel_values=x.clone(), output_attentions=True)
        logits = reference.head(reference.pool(output))
        objective = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        grads = list(torch.autograd.grad(objective, output.attentions))
    attentions = [a.detach() for a in output.attentions]
    expected, weights = reference_from_attention(
        attentions, grads, method, num_prefix=model.num_prefix, readout=None, grid=GRID
    )
    assert_explained_as(model, x, method, expected, weights)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_a_head_on_the_pooled_output_keeps_the_familys_read_out(backbone: str) -> None:
    """CLIP's pooler reads the class token, SigLIP's its attention pool: the check confirms the family's read-out."""
    model, x = BackboneHead(backbone, "pooler"), images()
    resolved = resolve_model(model)
    result = explain(resolved, x, "gmar_l1")
    assert resolved.readout(x) is None and result.token_maps.isfinite().all()


# ------------------------------------------------------------------------------------------------------------------
# A ResolvedModel given to explain
# ------------------------------------------------------------------------------------------------------------------


def test_a_resolved_model_rejects_other_settings_and_a_changed_structure() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    resolved = resolve_model(vit)
    assert isinstance(resolved, ResolvedModel) and resolved.vit is vit and resolved.family.name == "vit"
    with pytest.raises(ValueError, match="`vit` differs"):
        explain(resolved, images(), vit=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`token_layout` differs"):
        explain(resolved, images(), token_layout=TokenLayout(1, None))
    assert resolved.is_current()
    prune_heads(vit, {0: [1]})
    assert not resolved.is_current()
    with pytest.raises(UnsupportedModelError, match=r"changed structure .* resolve_model"):
        explain(resolved, images())
    assert explain(resolve_model(vit), images()).head_weights[0, 0, 1].isnan()


# ------------------------------------------------------------------------------------------------------------------
# The callback: one resolution per fit
# ------------------------------------------------------------------------------------------------------------------


class HeadModule(ClassifierModule):
    """A LightningModule with a headless timm ViT and a patch-mean head of its own (read-out checked at setup)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.vit.forward_features(x)[:, 1:].mean(1))


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[object]:
    """Replace ``module.name`` by a wrapper that records each call's result and calls the real function."""
    results: list[object] = []
    real = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


@pytest.mark.integration
def test_callback_resolves_the_model_once_per_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gmar_lightning.callback import gmar as callback_module

    resolutions = counting(monkeypatch, callback_module, "resolve_model")
    checks = counting(monkeypatch, resolve, "checked_readout")
    gmar = GMARCallback(num_probe=4, methods=("gmar_l1", "rollout"), on_error="raise")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, callbacks=[gmar]))
    trainer.fit(HeadModule(), datamodule=tiny_data())
    assert len(gmar.trajectory) == 3  # three evaluations
    assert len(resolutions) == 1 and len(checks) == 1
    assert resolutions[0].readout(torch.zeros(1, 3, 32, 32)) == TokenLayout(1, None)  # the patch mean, inferred

    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "second", max_epochs=2, logger=False, callbacks=[gmar]))
    trainer.fit(HeadModule(), datamodule=tiny_data())  # a new fit resolves again, once
    assert len(resolutions) == 2 and len(checks) == 2


@pytest.mark.integration
def test_callback_resolves_again_after_heads_are_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gmar_lightning.callback import gmar as callback_module

    resolutions = counting(monkeypatch, callback_module, "resolve_model")
    gmar = GMARCallback(num_probe=4, on_error="raise")
    pruning = HeadPruning(amount=2, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, callbacks=[gmar, pruning]))
    module = HeadModule()
    trainer.fit(module, datamodule=tiny_data())
    assert [entry["epoch"] for entry in pruning.history] == [1]
    assert len(resolutions) == 2  # setup, and the first evaluation after the pruning
    assert resolutions[-1].is_current() and (~gmar.trajectory.weights[-1].isnan()).sum() == 6
