"""transformers 5 CLIP, SigLIP, DINOv3, Swin and Swin v2 with zero user code, against a full-matrix reference.

The reference reads each layer's attention the way transformers hands it out under eager attention (the
``output_attentions`` of the model; Swin, which records only a stage's last block, from every block's attention
module output), differentiates the target logit with ``torch.autograd.grad`` on those tensors, and states each model's
token layout and window geometry by hand. Nothing here uses ``gmar_lightning.families``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("CLIP, SigLIP, DINOv3 and Swin are supported on transformers 5", allow_module_level=True)

from gmar_lightning import METHODS, GMARCallback, HeadPruning, explain  # noqa: E402
from gmar_lightning.families import UnsupportedModelError  # noqa: E402
from gmar_lightning.heads import head_mask, michel_importance  # noqa: E402
from gmar_lightning.heads.pruning import head_counts, prune_heads  # noqa: E402
from gmar_lightning.tokens import TokenLayout  # noqa: E402
from tests.lightning_helpers import ClassifierModule, tiny_data, trainer_kwargs  # noqa: E402
from tests.reference import Layer, reference_from_attention, zeroed_output_columns  # noqa: E402
from tests.test_families import merge_matrix, windows_to_global  # noqa: E402
from tests.test_hf import sharpen  # noqa: E402

ATOL = 1e-5
DIM, HEADS, HEAD_DIM = 32, 4, 8
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "intermediate_size": 64,
}
TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
GRID = (4, 4)


class WithHead(nn.Module):
    """A user's own head on a transformers backbone; ``record`` asks the backbone for its ``output_attentions``."""

    def __init__(self, backbone: nn.Module, read: Callable[[object], Tensor], width: int = DIM) -> None:
        super().__init__()
        self.backbone, self.read, self.head = backbone, read, nn.Linear(width, 5)
        self.record, self.recorded = False, None

    def forward(self, images: Tensor) -> Tensor:
        output = self.backbone(pixel_values=images, **({"output_attentions": True} if self.record else {}))
        self.recorded = output.attentions if self.record else None
        return self.head(self.read(output))


def clip_classifier() -> nn.Module:
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=5)
    return transformers.CLIPForImageClassification(config)


def siglip_classifier() -> nn.Module:
    config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT, num_labels=5)
    return transformers.SiglipForImageClassification(config)


def dinov3() -> nn.Module:
    config = transformers.DINOv3ViTConfig(num_register_tokens=2, **VISION)
    return WithHead(transformers.DINOv3ViTModel(config), lambda output: output.pooler_output)


# name -> (model factory, prefix tokens, read-out: tokens averaged, or None for the mean of the tokens after the prefix)
CASES: dict[str, tuple[Callable[[], nn.Module], int, list[int] | None]] = {
    # CLIPForImageClassification averages the patch tokens, leaving the class token out.
    "clip_classifier": (clip_classifier, 1, None),
    # SiglipForImageClassification averages every token (SigLIP has no class token).
    "siglip_classifier": (siglip_classifier, 0, None),
    # CLIPVisionModel's pooler_output is the post-layernormed class token.
    "clip_vision_model": (
        lambda: WithHead(
            transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), lambda output: output.pooler_output
        ),
        1,
        [0],
    ),
    # CLIPVisionModelWithProjection projects that class token linearly.
    "clip_with_projection": (
        lambda: WithHead(
            transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=24, **VISION)),
            lambda output: output.image_embeds,
            width=24,
        ),
        1,
        [0],
    ),
    # Without its attention-pooling head, a user's head on SigLIP reads the mean of the tokens.
    "siglip_vision_model_mean": (
        lambda: WithHead(
            transformers.SiglipVisionModel(transformers.SiglipVisionConfig(vision_use_head=False, **VISION)),
            lambda output: output.last_hidden_state.mean(1),
        ),
        0,
        None,
    ),
    # DINOv3 with two registers: the pooler is the class token.
    "dinov3": (dinov3, 3, [0]),
    # MetaClip2ForImageClassification averages the patch tokens, as CLIP's classifier does.
    "metaclip_2_classifier": (
        lambda: transformers.MetaClip2ForImageClassification(
            transformers.MetaClip2Config(vision_config=VISION, text_config=TEXT, num_labels=5)
        ),
        1,
        None,
    ),
    # ViTMSNForImageClassification reads the class token.
    "vit_msn_classifier": (
        lambda: transformers.ViTMSNForImageClassification(transformers.ViTMSNConfig(num_labels=5, **VISION)),
        1,
        [0],
    ),
    # IJepaForImageClassification averages every token (I-JEPA has no class token).
    "ijepa_classifier": (
        lambda: transformers.IJepaForImageClassification(transformers.IJepaConfig(num_labels=5, **VISION)),
        0,
        None,
    ),
}


def make_model(case: str) -> nn.Module:
    torch.manual_seed(0)
    return sharpen(CASES[case][0]()).eval()


def make_images(batch: int = 3, size: int = 32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def reference_attention(model: nn.Module, images: Tensor, target: Tensor | None = None) -> tuple[list, list, Tensor]:
    """Every layer's attention from transformers' own ``output_attentions`` on an eager copy, its gradient of the
    summed target logits, and the logits."""
    reference = copy.deepcopy(model).eval()
    with torch.enable_grad():
        if isinstance(reference, WithHead):
            reference.backbone.config._attn_implementation = "eager"
            reference.record = True
            logits = reference(images.clone())
            attentions = reference.recorded
        else:
            reference.config._attn_implementation = "eager"
            output = reference(pixel_values=images.clone(), output_attentions=True)
            logits, attentions = output.logits, output.attentions
        targets = logits.argmax(-1) if target is None else target
        grads = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), attentions)
    return [a.detach() for a in attentions], list(grads), logits.detach()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_matrix_reference(case: str, method: str) -> None:
    model, images = make_model(case), make_images()
    result = explain(model, images, method=method)
    attentions, grads, logits = reference_attention(model, images)
    _, num_prefix, readout = CASES[case]
    expected_maps, expected_weights = reference_from_attention(
        attentions, grads, method, num_prefix=num_prefix, readout=readout, grid=GRID
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-5)
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
        assert result.head_weights.shape == (3, 2, HEADS)


@pytest.mark.parametrize(("case", "wrong"), [("clip_classifier", [0]), ("dinov3", None), ("clip_vision_model", None)])
def test_reference_tells_read_outs_apart(case: str, wrong: list[int] | None) -> None:
    """The comparison above can fail: the class token instead of the patch mean (or back) gives another map."""
    model, images = make_model(case), make_images()
    attentions, grads, _ = reference_attention(model, images)
    num_prefix = CASES[case][1]
    right, _ = reference_from_attention(
        attentions, grads, "gmar_l1", num_prefix=num_prefix, readout=CASES[case][2], grid=GRID
    )
    other, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=num_prefix, readout=wrong, grid=GRID)
    assert (right - other).abs().max() > 100 * ATOL


# --- Swin and Swin v2 -------------------------------------------------------------------------------------------------

SWIN_CASES = {
    # 32 px / 2 = 16x16, then 8x8 and 4x4: the last stage's grid equals the window, so Swin drops its shift there.
    "swin": (transformers.SwinForImageClassification, transformers.SwinConfig, 32, 2, (2, 2, 2), (2, 2, 4)),
    # 36 px / 4 = 9x9: windows of 4 pad to 12x12, and the merge of an odd grid gives 5x5, padded to 8x8.
    "swin_odd": (transformers.SwinForImageClassification, transformers.SwinConfig, 36, 4, (2, 2), (2, 4)),
    "swinv2": (transformers.Swinv2ForImageClassification, transformers.Swinv2Config, 32, 2, (2, 2, 2), (2, 2, 4)),
    "swinv2_odd": (transformers.Swinv2ForImageClassification, transformers.Swinv2Config, 36, 4, (2, 2), (2, 4)),
}


def make_swin(case: str) -> nn.Module:
    model_class, config_class, size, patch, depths, heads = SWIN_CASES[case]
    config = config_class(
        image_size=size, patch_size=patch, embed_dim=16, depths=list(depths), num_heads=list(heads), window_size=4
    )
    config.num_labels = 5
    torch.manual_seed(0)
    return sharpen(model_class(config)).eval()


def swin_window_slots(grid: tuple[int, int], window: int, shift: int) -> Tensor:
    """``[W, n]`` token per window slot (-1: padding) in transformers' order: pad to whole windows, roll, partition."""
    height, width = grid
    index = torch.arange(height * width, dtype=torch.float32).view(1, height, width, 1)
    index = F.pad(index, (0, 0, 0, (-width) % window, 0, (-height) % window), value=-1.0)
    if shift:
        index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
    _, padded_h, padded_w, _ = index.shape
    windows = index.view(padded_h // window, window, padded_w // window, window)
    return windows.permute(0, 2, 1, 3).reshape(-1, window * window).long()


def swin_structure(case: str) -> tuple[list, tuple[int, int]]:
    """Every block's window layer and the merges, from the config: window 4, every second block shifted by 2, no
    shift on a stage whose grid is no larger than the window: the grid at call time for Swin, the grid of the
    configured image size (floor-halved per stage) for Swin v2, which fixes its windows when it is built."""
    _, _, size, patch, depths, _ = SWIN_CASES[case]
    grid = (math.ceil(size / patch),) * 2
    first, structure = grid, []
    for stage, depth in enumerate(depths):
        side = size // patch // 2**stage if case.startswith("swinv2") else min(grid)
        for block in range(depth):
            shift = 2 if block % 2 == 1 and side > 4 else 0
            structure.append(Layer(windows_to_global(swin_window_slots(grid, 4, shift), grid[0] * grid[1])))
        if stage < len(depths) - 1:
            structure.append(merge_matrix(grid))
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
    return structure, first


def swin_reference_attention(model: nn.Module, images: Tensor) -> tuple[list, list]:
    """Every block's attention: element 1 of each attention module's output on an eager copy (Swin v2's older code
    returns it under ``output_attentions``), and its gradient."""
    reference = copy.deepcopy(model).eval()
    reference.config._attn_implementation = "eager"
    attentions: list[Tensor] = []
    names = ("SwinAttention", "Swinv2SelfAttention")
    for module in reference.modules():
        if type(module).__name__ in names:
            module.register_forward_hook(lambda _m, _i, output: attentions.append(output[1]))
    with torch.enable_grad():
        logits = reference(pixel_values=images.clone(), output_attentions=True).logits
        targets = logits.argmax(-1)
        grads = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), attentions)
    return [a.detach() for a in attentions], list(grads)


@pytest.mark.parametrize("case", list(SWIN_CASES))
@pytest.mark.parametrize("method", METHODS)
def test_swin_matches_full_matrix_reference(case: str, method: str) -> None:
    model, images = make_swin(case), make_images(batch=2, size=SWIN_CASES[case][2])
    result = explain(model, images, method=method)
    attentions, grads = swin_reference_attention(model, images)
    structure, grid = swin_structure(case)
    expected_maps, expected_weights = reference_from_attention(
        attentions, grads, method, num_prefix=0, readout=None, grid=grid, structure=structure
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


def test_swin_backbone_under_a_users_head() -> None:
    model = make_swin("swin")
    backbone = WithHead(model.swin, lambda output: output.pooler_output, width=model.swin.num_features)
    images = make_images(batch=2)
    nested = explain(backbone, images, method="rollout")
    attentions, grads = swin_reference_attention(model, images)
    structure, grid = swin_structure("swin")
    expected, _ = reference_from_attention(
        attentions, grads, "rollout", num_prefix=0, readout=None, grid=grid, structure=structure
    )
    torch.testing.assert_close(nested.token_maps, expected, rtol=1e-4, atol=ATOL)


# --- Uniform attention, refusals --------------------------------------------------------------------------------------


def uniform_attention(model: nn.Module) -> nn.Module:
    """Zero every query and key projection: every score is equal, so attention is uniform (within windows for Swin,
    whose shift mask still separates regions)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "relative_position_bias_table")):
                parameter.zero_()
    return model


@pytest.mark.parametrize(
    "case", ["clip_classifier", "siglip_classifier", "siglip_pooled", "dinov3", "clip_vision_model", "swin", "swin_odd"]
)
@pytest.mark.parametrize("method", ["rollout", "gmar_l1"])
def test_uniform_attention_gives_a_flat_map(case: str, method: str) -> None:
    if case == "siglip_pooled":
        model = siglip_pooled()
        with torch.no_grad():  # the pool's query and key rows of its packed projection: uniform pool attention too
            model.backbone.head.attention.in_proj_weight[: 2 * DIM].zero_()
            model.backbone.head.attention.in_proj_bias[: 2 * DIM].zero_()
    else:
        model = make_swin(case) if case in SWIN_CASES else make_model(case)
    maps = explain(uniform_attention(model), make_images(batch=2), method=method).token_maps
    assert float((maps.amax(dim=(1, 2)) / maps.amin(dim=(1, 2))).max()) <= 1.01


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**VISION)),
            r"cannot be explained: it drops a random share of the patches",
        ),
        (
            lambda: transformers.ConvNextForImageClassification(
                transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
            ),
            r"cannot be explained: it has no attention over tokens \(a convolutional network\), so there is nothing",
        ),
    ],
)
def test_unsupported_transformers_models_are_refused_with_their_reason(make: Callable, pattern: str) -> None:
    with pytest.raises(UnsupportedModelError, match=pattern) as error:
        explain(make().eval(), make_images(batch=1))
    message = str(error.value)
    assert "\n" not in message and "timm counterpart" not in message


def test_bare_backbones_are_refused_as_features() -> None:
    for backbone in (
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
        transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VISION)),
    ):
        with pytest.raises(ValueError, match=r"without a classifier \(num_labels=0\): it outputs pooled features"):
            explain(backbone.eval(), make_images(batch=1))


# --- Head tools -------------------------------------------------------------------------------------------------------

# Ragged on purpose: 2 and 1 heads remain.
KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
HEAD_CASES = {
    "clip_classifier": ("CLIPAttention", "out_proj"),
    "siglip_classifier": ("SiglipAttention", "out_proj"),
    "dinov3": ("DINOv3ViTAttention", "o_proj"),
}


def masked_copy(model: nn.Module, case: str, keep: Tensor) -> nn.Module:
    """Reference masking: zero the output projection's input columns of the dropped heads on a copy."""
    reference = copy.deepcopy(model)
    class_name, output = HEAD_CASES[case]
    attentions = [module for module in reference.modules() if type(module).__name__ == class_name]
    zeroed_output_columns(attentions, keep, HEAD_DIM, output)
    return reference


def logits_of(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        output = model(images)
    return output if isinstance(output, Tensor) else output.logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_pruned_equals_masked(case: str, implementation: str) -> None:
    model, images = make_model(case), make_images()
    vit = model.backbone if isinstance(model, WithHead) else model
    vit.config._attn_implementation = implementation
    masked = masked_copy(model, case, KEEP)
    expected = logits_of(masked, images)
    with head_mask(model, KEEP):
        torch.testing.assert_close(logits_of(model, images), expected, rtol=1e-5, atol=1e-5)
    prune_heads(model, KEEP)
    assert head_counts(model) == [2, 1]
    torch.testing.assert_close(logits_of(model, images), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(make_model(case), images), expected, atol=1e-3)  # the heads did matter
    # A zeroed head gets no gradient: explaining the pruned model equals explaining the masked one.
    pruned, reference = (explain(m, images, method="gmar_l1") for m in (model, masked))
    torch.testing.assert_close(pruned.token_maps, reference.token_maps, rtol=1e-4, atol=ATOL)
    assert pruned.head_weights[:, KEEP == 0].isnan().all()
    labels = torch.tensor([0, 3, 1])
    importance = michel_importance(model, [(images, labels)], normalize_per_layer=False, progress=False)
    expected_importance = michel_importance(masked, [(images, labels)], normalize_per_layer=False, progress=False)
    assert importance[KEEP == 0].isnan().all()
    torch.testing.assert_close(importance[KEEP == 1], expected_importance[KEEP == 1], rtol=1e-4, atol=1e-6)


class CLIPModule(ClassifierModule):
    """A tiny CLIPForImageClassification for 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=4)
        self.model = transformers.CLIPForImageClassification(config)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits


@pytest.mark.integration
def test_fit_with_head_pruning_and_gmar_callback_on_clip(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = CLIPModule()
    implementation = module.model.config._attn_implementation
    gmar = GMARCallback(num_probe=4, methods=("gmar_l1", "rollout"))
    pruning = HeadPruning(amount=3, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=2)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[gmar, pruning]))
    trainer.fit(module, datamodule=tiny_data())

    assert sum(head_counts(module.model)) == 2 * HEADS - 3
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0}).Reload()
    expected_steps = [trainer.num_training_batches * epoch - 1 for epoch in (1, 2)]
    for tag in ("gmar/overlay/gmar_l1", "gmar/overlay/rollout", "gmar/head_importance"):
        assert [event.step for event in events.Images(tag)] == expected_steps, tag
    # The start point, then the count after the pruning at epoch 1.
    assert [event.value for event in events.Scalars("head_pruning/heads")] == [2.0 * HEADS, 2.0 * HEADS - 3]
    # The epoch-1 evaluation explains the pruned model: the 3 removed heads are NaN, the others sum to one per layer.
    assert gmar.trajectory.weights.shape == (2, 2, HEADS)
    assert int(gmar.trajectory.weights[1].isnan().sum()) == 3
    torch.testing.assert_close(gmar.trajectory.weights[1].nansum(-1), torch.ones(2))
    assert module.model.config._attn_implementation == implementation


# --- SigLIP's attention-pooling head -------------------------------------------------------------------------------


def siglip_pooled() -> WithHead:
    """A user's head on ``SiglipVisionModel``'s ``pooler_output``: its attention-pooling head, one learned probe."""
    torch.manual_seed(0)
    backbone = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    return sharpen(WithHead(backbone, lambda output: output.pooler_output)).eval()


def pool_from_formula(head: nn.Module, recorded: list[Tensor]) -> None:
    """Replace the head's ``nn.MultiheadAttention`` by its formula, recording the probe's ``[B, H, 1, N]`` attention."""
    attention = head.attention

    class Formula(nn.Module):
        def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, None]:
            heads, width = attention.num_heads, attention.embed_dim
            w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
            b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

            def split(x: Tensor) -> Tensor:
                return x.view(x.shape[0], x.shape[1], heads, width // heads).transpose(1, 2)

            q, k, v = split(query @ w_q.T + b_q), split(key @ w_k.T + b_k), split(value @ w_v.T + b_v)
            probs = ((q @ k.transpose(-1, -2)) / (width // heads) ** 0.5).softmax(dim=-1)
            recorded.append(probs)
            out = (probs @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], width)
            return attention.out_proj(out), None

    head.attention = Formula()


def pooled_reference(model: WithHead, images: Tensor, method: str) -> tuple[Tensor, Tensor | None]:
    """Token maps and head weights ``[B, L + 1, H]``: the blocks from transformers' own ``output_attentions``, the pool
    from its formula; the pool's fused attention is the read-out row (no residual), rolled out through the blocks."""
    reference = copy.deepcopy(model)
    reference.backbone.config._attn_implementation = "eager"
    reference.record = True
    pool: list[Tensor] = []
    pool_from_formula(reference.backbone.head, pool)
    with torch.enable_grad():
        logits = reference(images.clone())
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-5)  # the formula is the pool's
        targets = logits.argmax(-1)
        tensors = [*reference.recorded, pool[0]]
        grads = list(torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), tensors))
    attentions = [t.detach() for t in tensors]
    pool_attention, pool_grad = attentions[-1][:, :, 0], grads[-1][:, :, 0]  # [B, H, N]
    pool_weights = None
    if method in ("gmar_l1", "gmar_l2"):
        scores = pool_grad.abs().sum(-1) if method == "gmar_l1" else pool_grad.pow(2).sum(-1).sqrt()
        pool_weights = scores / scores.sum(-1, keepdim=True)
        row = (pool_weights[:, :, None] * pool_attention).sum(1)
    elif method == "grad_rollout":
        row = (pool_grad * pool_attention).clamp(min=0).mean(1)
    else:
        row = pool_attention.mean(1)
    if method == "attention":  # the last layer is the pool
        return row.reshape(-1, *GRID), None
    maps, weights = [], []
    for b in range(images.shape[0]):
        image_maps, image_weights = reference_from_attention(
            [a[b : b + 1] for a in attentions[:-1]],
            [g[b : b + 1] for g in grads[:-1]],
            method,
            num_prefix=0,
            readout=row[b],
            grid=GRID,
        )
        maps.append(image_maps)
        weights.append(image_weights)
    if pool_weights is None:
        return torch.cat(maps), None
    return torch.cat(maps), torch.cat([torch.cat(weights), pool_weights[:, None]], dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_siglip_attention_pool_is_the_read_out_row(method: str) -> None:
    model, images = siglip_pooled(), make_images()
    result = explain(model, images, method=method)
    expected_maps, expected_weights = pooled_reference(model, images, method)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    assert result.layer_names[-1] == "head.attention"
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
    # The pool's call is restored: it averages its weights over heads again, as SigLIP asked.
    with torch.no_grad():
        probe = model.backbone.head.probe.expand(1, -1, -1)
        weights = model.backbone.head.attention(probe, probe, probe)[1]
    assert weights.shape == (1, 1, 1)


def test_siglip_pool_reference_differs_from_the_token_mean() -> None:
    model, images = siglip_pooled(), make_images()
    pooled, _ = pooled_reference(model, images, "rollout")
    attentions, grads, _ = reference_attention(model, images)
    mean, _ = reference_from_attention(attentions, grads, "rollout", num_prefix=0, readout=None, grid=GRID)
    assert (pooled - mean).abs().max() > 100 * ATOL


def test_a_head_that_skips_siglips_pool_is_read_out_as_it_pools() -> None:
    """The pool still runs but nothing reads it: the read-out comes from the gradient (the token mean), not the pool."""
    model, images = siglip_pooled(), make_images()
    model.read = lambda output: output.last_hidden_state.mean(1)
    result = explain(model, images, method="gmar_l1")
    assert "head.attention" not in result.layer_names
    attentions, grads, _ = reference_attention(model, images)
    expected, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=0, readout=None, grid=GRID)
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)
    stated = explain(model, images, method="gmar_l1", token_layout=TokenLayout(0, None))
    torch.testing.assert_close(stated.token_maps, expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT)),
            r"built around the image tower CLIPVisionModel, and its forward is not an image classifier's",
        ),
        (
            lambda: transformers.BlipVisionModel(transformers.BlipVisionConfig(**VISION)),
            r"it is the image encoder of a vision-language or other multimodal model; gmar-lightning does not map",
        ),
        (
            lambda: transformers.Data2VecVisionForImageClassification(transformers.Data2VecVisionConfig(**VISION)),
            r"it is a data2vec BEiT-style ViT, not among the mapped ViT classes",
        ),
    ],
)
def test_other_transformers_vision_classes_are_refused_with_what_they_are(make: Callable, pattern: str) -> None:
    with pytest.raises(UnsupportedModelError, match=pattern) as error:
        explain(make().eval(), make_images(batch=1))
    assert "\n" not in str(error.value)


class SiglipModule(ClassifierModule):
    """A user's linear head on a tiny SiglipVisionModel's attention-pooled output, for 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.model = WithHead(
            transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), lambda o: o.pooler_output
        )
        self.model.head = nn.Linear(DIM, 4)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


@pytest.mark.integration
def test_head_pruning_by_gmar_on_a_siglip_backbone_ranks_the_blocks_heads_only(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = SiglipModule()
    gmar = GMARCallback(num_probe=4, methods=("gmar_l1",))
    pruning = HeadPruning(amount=2, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, callbacks=[gmar, pruning]))
    trainer.fit(module, datamodule=tiny_data())
    # The explanations carry the pool's heads as a third row; the two blocks lose the 2 lowest-ranked heads.
    assert gmar.trajectory.layer_names[-1] == "head.attention"
    assert sum(head_counts(module.model.backbone)) == 2 * HEADS - 2
    weights = gmar.trajectory.weights[0, :2]
    removed = [
        (int(name.split(".")[2]), head) for name, heads in pruning.history[0]["removed"].items() for head in heads
    ]
    kept = [(layer, head) for layer in range(2) for head in range(HEADS) if (layer, head) not in removed]
    assert max(weights[layer, head] for layer, head in removed) <= min(weights[layer, head] for layer, head in kept)
