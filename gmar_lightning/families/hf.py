"""Hugging Face transformers ViTs: their attention layers, eager attention for one call, token layout and patch grid.

A model family (see [`families`][gmar_lightning.families]): one global self-attention per layer over the prefix
tokens and the patch grid, like the timm ViT family, with the layout read from the transformers class and config.

``transformers`` is optional (``pip install transformers``) and nothing here imports it: a model can only be a
transformers model if the user already imported transformers, so the checks look the package up in ``sys.modules``.

Supported: ``ViTForImageClassification``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``,
``BeitForImageClassification``, ``Dinov2ForImageClassification`` and ``Dinov2WithRegistersForImageClassification``
(and their bare ``*Model`` backbones inside a module that adds its own head), on transformers 4.x and 5.x; on
transformers 5.x also ``CLIPForImageClassification``, ``SiglipForImageClassification`` and the backbones
``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel`` and ``DINOv3ViTModel`` (RoPE and
register tokens; RoPE changes the attention scores, not which tokens are mixed), and SigLIP 2's
``Siglip2ForImageClassification`` and ``Siglip2VisionModel`` on their NaFlex batches (see
[`naflex`][gmar_lightning.naflex]). Swin and Swin v2 are the family
[`families.hf_swin`][gmar_lightning.families.hf_swin]. ``TimmWrapperForImageClassification`` holds a timm model, which
the timm families explain.

How the attention probabilities are reached: each transformers attention module returns ``(output, weights)``, where
``weights`` is the tensor that multiplies the values (after dropout, an identity in eval mode), but only on the eager
path (SDPA and flash attention return ``None``). The capture therefore switches every config of the model to
``attn_implementation="eager"`` for the call and restores it afterwards, and reads element 1 of each attention
module's output with a forward hook. Modeling code that predates ``_can_record_outputs`` (transformers 4.x BEiT)
returns the weights only under ``output_attentions``, so for those models ``config.output_attentions`` is switched on
too. (Newer code would install permanent output-capturing hooks if asked, so it is not.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from gmar_lightning.capture import AttentionAdapter, AttentionLayer
from gmar_lightning.families import Probe
from gmar_lightning.families.grids import global_mixing
from gmar_lightning.families.mha import mha_layer, per_head_weights
from gmar_lightning.mixing import AttentionReadout, AttentionStep, TokenPlan
from gmar_lightning.naflex import TRANSFORMERS, NaFlexFormat
from gmar_lightning.tokens import TokenLayout

__all__ = [
    "SUPPORTED_CLASSES",
    "attention_layers",
    "attention_modules",
    "eager_attention",
    "headless",
    "is_headless",
    "is_transformers_model",
    "is_transformers_vit",
    "matches",
    "naflex",
    "num_channels_of",
    "patch_grid_of",
    "probe",
    "token_layout_of",
    "unsupported_reason",
]

SUPPORTED_CLASSES = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "BeitForImageClassification",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification",
    "CLIPForImageClassification",
    "MetaClip2ForImageClassification",
    "SiglipForImageClassification",
    "Siglip2ForImageClassification",
    "ViTMSNForImageClassification",
    "IJepaForImageClassification",
    "SwinForImageClassification",
    "Swinv2ForImageClassification",
    "TimmWrapperForImageClassification",
)
"""The transformers image classifiers ``explain`` and ``GMARCallback`` support."""

SUPPORTED_BACKBONES = (
    "ViTModel",
    "DeiTModel",
    "BeitModel",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "MetaClip2VisionModel",
    "SiglipVisionModel",
    "Siglip2VisionModel",
    "DINOv3ViTModel",
    "SwinModel",
    "Swinv2Model",
)
"""The transformers backbones (no classifier) supported inside a module that adds its own head."""

# The config model types of those classes and of their bare backbones (ViTModel, ...), which users nest under heads.
_MODEL_TYPES = frozenset(
    {
        "vit",
        "deit",
        "beit",
        "dinov2",
        "dinov2_with_registers",
        "clip_vision_model",
        "metaclip_2_vision_model",
        "siglip_vision_model",
        "siglip2_vision_model",
        "dinov3_vit",
        "vit_msn",
        "ijepa",
        "swin",
        "swinv2",
    }
)
# Image-text models whose config holds a ``vision_config``: only their image classifiers are vision models (CLIPModel
# needs text too, and its CLIPVisionModel inside is found on its own).
_COMPOSITE_TYPES = frozenset({"clip", "metaclip_2", "siglip", "siglip2"})
# The single-sequence ViTs of this family; Swin and Swin v2 (windows, merging) are `families.hf_swin`.
_SWIN_TYPES = frozenset({"swin", "swinv2"})


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (``False`` whenever transformers is not imported)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def is_transformers_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers vision transformer whose attention and token layout gmar-lightning knows
    (this family's single-sequence ViTs, or a Swin of [`families.hf_swin`][gmar_lightning.families.hf_swin])."""
    if not is_transformers_model(module):
        return False
    model_type = getattr(module.config, "model_type", None)
    if model_type in _COMPOSITE_TYPES:
        return type(module).__name__.endswith("ForImageClassification")
    return model_type in _MODEL_TYPES


def vision_config(model: nn.Module) -> object:
    """The config that describes a transformers ViT's images and patches: ``config.vision_config`` for an image-text
    model's classifier (CLIP, SigLIP), else ``config``."""
    return getattr(model.config, "vision_config", None) or model.config


def is_headless(model: nn.Module) -> bool:
    """Whether a transformers ViT outputs features rather than class logits (a bare backbone, or ``num_labels=0``)."""
    name = type(model).__name__
    return not name.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")) or (
        model.config.num_labels == 0
    )


def headless(model: nn.Module) -> str | None:
    """Why a transformers ViT outputs features rather than class logits, or ``None`` when it classifies."""
    return "a transformers backbone without a classifier (num_labels=0)" if is_headless(model) else None


def _recorded_attention_classes(model: nn.Module) -> tuple[tuple[type, int], ...]:
    """``(class, output index)`` of the modules whose output holds the attention weights, from ``_can_record_outputs``.

    Plain classes in that table record element 1 for attentions; an ``OutputRecorder`` names its own index.
    """
    specs = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if specs is None:
        return ()
    specs = specs if isinstance(specs, list | tuple) else [specs]
    return tuple(
        (spec, 1) if isinstance(spec, type) else (spec.target_class, spec.index)
        for spec in specs
        if isinstance(spec, type) or isinstance(getattr(spec, "target_class", None), type)
    )


def _records_outputs(vit: nn.Module) -> bool:
    return any(_recorded_attention_classes(module) for module in vit.modules() if is_transformers_model(module))


# Model types whose ``_can_record_outputs`` records attention from each stage's output, the last block's only (Swin):
# every block's weights are element 1 of the output of these attention modules.
_PER_BLOCK_ATTENTION = {"swin": "SwinAttention"}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, output index)`` of every attention module of a transformers ViT, in forward order.

    The index is where the attention weights sit in the module's output tuple. Modeling code with
    ``_can_record_outputs`` names the module class there; older code (4.x BEiT) uses ``*SelfAttention`` modules that
    return ``(context, weights)`` under ``output_attentions``.
    """
    models = [module for module in model.modules() if is_transformers_model(module)]
    per_block = {_PER_BLOCK_ATTENTION.get(getattr(module.config, "model_type", None)) for module in models} - {None}
    recorded = dict(
        pair
        for module in models
        if getattr(module.config, "model_type", None) not in _PER_BLOCK_ATTENTION
        for pair in _recorded_attention_classes(module)
    )
    modules = []
    for name, module in model.named_modules():
        if type(module).__name__ in per_block:
            modules.append((name, module, 1))
            continue
        if recorded:
            index = next((i for cls, i in recorded.items() if isinstance(module, cls)), None)
        else:
            index = 1 if type(module).__name__.endswith("SelfAttention") else None
        if index is not None:
            modules.append((name, module, index))
    return modules


def _vit_configs(model: nn.Module) -> list[tuple[object, bool]]:
    """Every distinct config of the transformers ViTs inside ``model``, outermost first, and whether that ViT's
    attention returns its weights only under ``output_attentions``."""
    configs: dict[int, tuple[object, bool]] = {}
    for vit in model.modules():
        if is_transformers_vit(vit):
            ask_for_weights = not _records_outputs(vit)
            for module in vit.modules():
                config = getattr(module, "config", None)
                if config is not None and hasattr(config, "output_attentions"):
                    configs.setdefault(id(config), (config, ask_for_weights))
    return list(configs.values())


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Compute the attention of every transformers ViT inside ``model`` eagerly (materialising the weights) for the
    duration of the block, then restore the configs. Does nothing to a model without one.

    Sets ``config._attn_implementation = "eager"`` on every config of those ViTs (the attention modules read it at
    call time) and, for modeling code that returns weights only when asked, ``config.output_attentions = True``.
    """
    configs = _vit_configs(model)
    saved = [(config, config._attn_implementation, config.output_attentions) for config, _ in configs]
    try:
        for config, ask_for_weights in configs:
            config._attn_implementation = "eager"
            if ask_for_weights:
                config.output_attentions = True
        yield
    finally:
        _restore(saved)


def _restore(saved: list) -> None:
    # output_attentions first: transformers refuses output_attentions=True with a non-eager implementation. Outermost
    # configs first: setting a config's implementation also sets its sub-configs', which then get their own back.
    for config, _, output_attentions in saved:
        config.output_attentions = output_attentions
    for config, implementation, _ in saved:
        config._attn_implementation = implementation


# ViTs without a class token: their classifiers average the tokens (SigLIP 2's over the valid ones only).
_NO_CLASS_TOKEN = ("siglip_vision_model", "siglip2_vision_model", "ijepa")
# The SigLIP vision towers, whose pooler is an attention-pooling head (one learned probe over the tokens).
_SIGLIP_TYPES = ("siglip_vision_model", "siglip2_vision_model")


def _num_prefix_tokens(config: object) -> int:
    if config.model_type == "deit":
        return 2  # class and distillation token
    if config.model_type in _NO_CLASS_TOKEN:
        return 0  # no class token: every token is a patch
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def token_layout_of(model: nn.Module) -> TokenLayout:
    """The prefix tokens and read-out of a transformers ViT, from its class and config.

    - ViT, DeiT: the class token (``DeiTForImageClassificationWithTeacher``: the mean of the class and distillation
      tokens, as the model averages both heads).
    - BEiT: the mean of the patch tokens with ``use_mean_pooling`` (the default), otherwise the class token.
    - Dinov2 (with or without registers): the head reads ``[class token, mean of the patch tokens]``; the read-out
      averages the class token's row and the mean patch row, each half of the classifier input weighing the same.
    - ``CLIPForImageClassification`` and ``MetaClip2ForImageClassification``: the mean of the patch tokens (the class
      token is left out); ``SiglipForImageClassification`` and ``IJepaForImageClassification``: the mean of all
      tokens (neither has a class token); ``Siglip2ForImageClassification``: the mean of its valid tokens (its
      ``pixel_attention_mask``); ``ViTMSNForImageClassification``: the class token.
    - A bare backbone nested under a custom head is assumed to be read out as its ``pooler_output``: the class token
      (ViT, DeiT, Dinov2, DINOv3, ``CLIPVisionModel``; ``CLIPVisionModelWithProjection`` projects it linearly), the
      patch mean (BEiT with ``use_mean_pooling``, ``SiglipVisionModel`` and ``Siglip2VisionModel`` built without their
      pooling head); the read-out
      check ([`gmar_lightning.readout`][gmar_lightning.readout]) replaces that with the pooling the head really
      applies.
    """
    config = vision_config(model)
    prefix = _num_prefix_tokens(config)
    name = type(model).__name__
    classifier = name.endswith("ForImageClassification")
    if name.endswith("WithTeacher"):
        return TokenLayout(num_prefix_tokens=prefix, readout_tokens=(0, 1))
    if config.model_type == "beit" and getattr(config, "use_mean_pooling", True):
        return TokenLayout(num_prefix_tokens=prefix, readout_tokens=None)
    if config.model_type.startswith("dinov2") and classifier:
        return TokenLayout(num_prefix_tokens=prefix, readout_tokens=(0,), with_patch_mean=True)
    clip = config.model_type in ("clip_vision_model", "metaclip_2_vision_model")
    if (clip and classifier) or config.model_type in _NO_CLASS_TOKEN:
        return TokenLayout(num_prefix_tokens=prefix, readout_tokens=None)
    return TokenLayout(num_prefix_tokens=prefix, readout_tokens=(0,))


def patch_grid_of(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` a transformers ViT produces for an image of ``image_size``."""
    patch = vision_config(model).patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    return image_size[0] // patch_h, image_size[1] // patch_w


def num_channels_of(model: nn.Module) -> int | None:
    """The number of image channels the model takes, from its config."""
    return getattr(vision_config(model), "num_channels", None)


def image_size_of(model: nn.Module) -> tuple[int, int]:
    """The ``(height, width)`` of the images the model was configured for."""
    side = vision_config(model).image_size
    return (side, side) if isinstance(side, int) else tuple(side)


# Why a transformers vision model outside the supported ones cannot be explained, by model type: each reason names
# what is missing, not a workaround that does not exist.
_NO_TOKEN_ATTENTION = "it has no attention over tokens ({}), so there is nothing to roll out"
_NOT_MAPPED = "gmar-lightning does not map it yet"
_TYPE_REASONS = {
    "vit_mae": (
        "it drops a random share of the patches (mask_ratio) on every call, so its attention covers a different token "
        "subset each time; explain a classifier fine-tuned from it (ViTForImageClassification) instead"
    ),
    **dict.fromkeys(
        (
            "resnet",
            "convnext",
            "convnextv2",
            "regnet",
            "mobilenet_v1",
            "mobilenet_v2",
            "efficientnet",
            "bit",
            "hgnet_v2",
            "pp_lcnet",
            "textnet",
        ),
        _NO_TOKEN_ATTENTION.format("a convolutional network"),
    ),
    "poolformer": _NO_TOKEN_ATTENTION.format("its token mixer is pooling"),
    "focalnet": _NO_TOKEN_ATTENTION.format("focal modulation aggregates context by convolution and gating"),
    "swiftformer": "its additive attention has no token-to-token attention matrix to roll out",
    "mobilevit": f"its transformer attends across unfolded patches of CNN feature maps; {_NOT_MAPPED}",
    "mobilevitv2": "its separable linear self-attention has no token-to-token attention matrix to roll out",
    "levit": f"its attention-downsampling blocks replace the grid by a subsampled query grid; {_NOT_MAPPED}",
    "cvt": f"its convolutional token embeddings and projections mix neighbouring tokens in every stage; {_NOT_MAPPED}",
    **dict.fromkeys(("pvt", "pvt_v2"), f"its spatial-reduction attention runs on a feature pyramid; {_NOT_MAPPED}"),
    "segformer": f"its reduced-key attention runs on a pyramid of overlapping patch merges; {_NOT_MAPPED}",
    "hiera": f"its mask-unit attention pools queries inside the attention between stages; {_NOT_MAPPED}",
    "dinat": f"its dilated neighbourhood attention gives every token its own key window; {_NOT_MAPPED}",
    "donut-swin": f"it is Donut's Swin encoder, whose classifier transformers builds apart from Swin's; {_NOT_MAPPED}",
    "imagegpt": "its causal attention runs over a sequence of colour-cluster pixels, not a patch grid",
    "data2vec-vision": f"it is a data2vec BEiT-style ViT, not among the mapped ViT classes; {_NOT_MAPPED}",
}


def _reason(module: nn.Module) -> str:
    """Why the transformers model ``module`` (not a supported ViT) cannot be explained, as a clause."""
    reason = _TYPE_REASONS.get(getattr(module.config, "model_type", None))
    if reason is not None:
        return reason
    if type(module).__name__.endswith("VisionModel"):
        return f"it is the image encoder of a vision-language or other multimodal model; {_NOT_MAPPED}"
    return (
        "it is a transformers model that gmar-lightning does not map yet; docs/supported_models.md lists the "
        "supported transformers classes"
    )


def unsupported_reason(model: nn.Module) -> str | None:
    """Why a model holding a transformers model that is not a supported ViT cannot be explained, or ``None``."""
    for module in model.modules():
        if is_transformers_model(module) and not is_transformers_vit(module):
            if type(module).__name__.startswith("TimmWrapper"):
                continue  # holds a timm model, explained by the timm families
            reason = _reason(module)
            return reason if module is model else f"it holds {type(module).__name__}: {reason}"
    return None


def outer_reason(model: nn.Module, vit: nn.Module) -> str | None:
    """Why ``model``, a transformers model that is not a supported ViT itself but holds the supported ``vit`` (a
    vision-language model around its image tower, ``CLIPModel``), cannot be explained as a whole, or ``None``."""
    if not is_transformers_model(model) or is_transformers_vit(model) or vit is model:
        return None
    if type(model).__name__.startswith("TimmWrapper"):
        return None
    if is_transformers_model(vit) and not is_transformers_vit(vit):  # a tower no family maps (SAM 2's Hiera)
        return f"it holds {type(vit).__name__}: {_reason(vit)}"
    return (
        f"it is a transformers model built around the image tower {type(vit).__name__}, and its forward is not an "
        "image classifier's; put the tower under your own head and explain that module"
    )


def matches(model: nn.Module) -> bool:
    """A transformers single-sequence ViT (not a Swin)."""
    return is_transformers_vit(model) and model.config.model_type not in _SWIN_TYPES


def _adapter(module_class: type, output_index: int) -> AttentionAdapter:
    return AttentionAdapter(
        name="transformers",
        matches=lambda module: isinstance(module, module_class),
        probs_module=None,
        output_index=output_index,
    )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention modules of the transformers ViTs inside ``model`` as capture layers, in forward order."""
    return [
        AttentionLayer(name, module, _adapter(type(module), index)) for name, module, index in attention_modules(model)
    ]


def attention_pool(model: nn.Module) -> nn.Module | None:
    """The ``nn.MultiheadAttention`` of a ``SiglipVisionModel``'s or ``Siglip2VisionModel``'s pooling head, when its
    ``pooler_output`` is what the model hands on (the bare vision model built with ``vision_use_head``, the default; a
    SigLIP classifier runs the head but pools the tokens itself), or ``None``. SigLIP 2's head masks the padding out of
    the probe's keys (``key_padding_mask``), as the engine does."""
    head = getattr(model, "head", None)
    if vision_config(model).model_type not in _SIGLIP_TYPES or type(model).__name__.endswith("Classification"):
        return None
    return head.attention if getattr(model, "use_head", False) and head is not None else None


def naflex(model: nn.Module) -> NaFlexFormat | None:
    """SigLIP 2 takes NaFlex batches in transformers' spelling (``Siglip2ImageProcessor``'s output), and no image
    tensors."""
    config = vision_config(model)
    if config.model_type != "siglip2_vision_model":
        return None
    return NaFlexFormat(TRANSFORMERS, (config.patch_size, config.patch_size), config.num_channels, False)


def linear_readout(model: nn.Module) -> bool:
    """A head of the user's own reads the backbone's tokens through a mean, unless the backbone pools them with
    attention (SigLIP's pooling head), whose read-out is that attention."""
    return attention_pool(model) is None


def probe(model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None) -> Probe:
    pool = attention_pool(model) if token_layout is None else None
    layout = token_layout if token_layout is not None else token_layout_of(model)
    grid = patch_grid_of(model, image_size)
    num_tokens = layout.num_prefix_tokens + grid[0] * grid[1]
    layers = [[layer] for layer in attention_layers(model)]
    steps: list[AttentionStep] = [AttentionStep(index, global_mixing(num_tokens)) for index in range(len(layers))]
    readout = layout.readout_vector(num_tokens, 1)[0]
    context = lambda: eager_attention(model)  # noqa: E731
    if pool is not None:
        # SigLIP's head: one learned probe attends to every token (no class token), then an MLP that mixes no tokens;
        # the read-out row is the probe's fused attention (docs/method.md, Attention pooling).
        steps.append(AttentionStep(len(layers), AttentionReadout(1, num_tokens)))
        layers.append([mha_layer("head.attention", pool)])
        readout = torch.ones(1)

        @contextlib.contextmanager
        def context() -> Iterator[None]:
            with eager_attention(model), per_head_weights([pool]):
                yield

    return Probe(
        layers,
        [layer[0].name for layer in layers],
        TokenPlan(tuple(steps), readout, layout.num_prefix_tokens, grid),
        context,
    )
