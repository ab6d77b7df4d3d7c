"""Which models gmar-lightning explains: one small representative per attention-based family, run for real.

Every timm model module is classified here, either as a :class:`Case` (a tiny random-init representative, explained
with ``gmar_l1``) or in :data:`NO_TOKEN_ATTENTION`; a module of the installed timm that is neither fails the run, so
the table cannot drift from timm. Each case ends as

* ``works``: the explanation ran, its maps are finite, its head weights sum to 1 per layer, and the model went
  through a family whose token plan the tests check against a full-matrix reference;
* ``refused``: a one-line :class:`~gmar_lightning.families.UnsupportedModelError` naming the model class and why;
* anything else (another exception, a refusal that does not name the class, a verdict other than the expected one,
  a model explained by a family the tests do not cover) is a failure: the script prints it and exits with status 1.

It writes the "Supported models" docs page (``docs/supported_models.md``); ``--check`` fails instead if the page on
disk differs (CI). Hugging Face classes are registered in :data:`CASES` by the same mechanism (family
``"transformers"``), and every other transformers ``*ForImageClassification`` and ``*VisionModel`` class the installed
transformers exports is added at its default config (refusals need no weights); :data:`UNBUILDABLE_HERE` lists the
classes that cannot be built here, shown as "not run".

Run: ``python benchmarks/supported_models.py`` (about 30 s on a 2-core CPU); ``--check`` in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm import tqdm

from gmar_lightning import explain
from gmar_lightning.families import UnsupportedModelError, find_family, find_vision_transformer
from gmar_lightning.naflex import is_naflex_vit

PAGE = Path(__file__).resolve().parents[1] / "docs" / "supported_models.md"

VERIFIED_FAMILIES = {"vit", "swin", "pvt", "cait", "pit", "sam", "transformers", "transformers_swin", "open_clip"}
"""Family probes whose token plans tests/test_families.py, tests/test_engine.py, tests/test_hf.py and
tests/test_hf_families.py check against the reference."""

SINGLE_SEQUENCE_CLASSES = {
    "VisionTransformer",
    "VisionTransformerDistilled",
    "Beit",
    "Eva",
    "VisionTransformerRelPos",
    "NaFlexVit",
}
"""timm classes the generic single-sequence ``vit`` probe is verified on; any other class it takes is a failure."""

FAMILY_NOTES = {
    "vit": "global self-attention over prefix tokens and the patch grid",
    "swin": "shifted windows (roll + padding) mapped to the grid; patch merging to 2x2 children",
    "pvt": "spatial-reduction keys mapped to their cells; windows (Twins); convolutional patch embeddings",
    "cait": "talking-head softmaxes as heads; class token joins; class-attention layers",
    "pit": "class token(s) + grid per stage; pooling convolutions map to their kernels",
    "sam": "windowed blocks (padded) interleaved with global blocks",
    "transformers": "eager attention for the call; token layout and grid from the class and config",
    "transformers_swin": "eager attention for the call; padded, then shifted windows mapped to the grid; 2x2 merging",
    "open_clip": "per-head nn.MultiheadAttention weights for the call; class token or patch mean",
}


@dataclass(frozen=True)
class Case:
    """One representative: its family (timm module, or ``transformers``), a label, a builder and the input size.

    ``expect`` is the verdict the code should reach; a refused case is built on the meta device (no weights are
    needed to refuse), which keeps the run short.
    """

    family: str
    label: str
    build: Callable[[], nn.Module]
    image_size: int = 32
    expect: str = "works"
    inputs: Callable[[int], object] | None = None
    """The model's inputs for two images of side ``image_size``, when it takes no image tensor (SigLIP 2's NaFlex
    dict); ``None``: a random ``[2, 3, size, size]`` batch."""


TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_SWIN = {"img_size": 32, "embed_dim": 16, "depths": (2, 1), "num_heads": (1, 2), "window_size": 4}
TINY_PYRAMID = {"embed_dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)}


def timm_case(family: str, name: str, size: int = 32, expect: str = "works", note: str = "", **kwargs: object) -> Case:
    """A timm model by name, with ``kwargs`` that make it tiny, or at its default size on meta (refused without
    ``kwargs``); ``note`` follows the name in the table."""
    label = f"`{name}`" + (" (tiny)" if kwargs else "") + (f" {note}" if note else "")

    def build() -> nn.Module:
        if expect == "refused" and not kwargs:
            with torch.device("meta"):
                return timm.create_model(name, **kwargs)
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=3, **kwargs)

    return Case(family, label, build, size, expect)


CASES: list[Case] = [
    timm_case("vision_transformer", "vit_tiny_patch16_224", **TINY_VIT),
    timm_case("vision_transformer", "vit_small_patch16_18x2_224", **TINY_VIT),  # parallel attention branches
    timm_case("vision_transformer", "vit_medium_patch16_reg1_gap_256", **TINY_VIT),  # registers, average pooling
    timm_case("vision_transformer", "vit_base_patch16_siglip_224", **TINY_VIT, note="(SigLIP, SigLIP 2)"),
    timm_case(
        "vision_transformer",
        "vit_tiny_patch16_224",
        expect="refused",
        note="(global_pool='prr')",
        **TINY_VIT,
        global_pool="prr",
    ),
    timm_case("vision_transformer", "vit_dlittle_patch16_reg1_gap_256", expect="refused"),  # differential attention
    timm_case("vision_transformer_hybrid", "vit_tiny_r_s16_p8_224", size=64, img_size=64, depth=2),
    timm_case("vision_transformer_relpos", "vit_relpos_small_patch16_224", **TINY_VIT),
    timm_case("vision_transformer_sam", "samvit_base_patch16", **TINY_VIT, global_pool="avg", neck_chans=16),
    timm_case("deit", "deit_tiny_distilled_patch16_224", **TINY_VIT),
    timm_case("beit", "beit_base_patch16_224", **TINY_VIT),
    timm_case("eva", "eva02_tiny_patch14_224", size=28, img_size=28, depth=2),
    timm_case("eva", "vit_pe_core_base_patch16_224", **TINY_VIT, ref_feat_shape=(4, 4), note="(Perception Encoder)"),
    timm_case("vitamin", "vitamin_small_224", size=64, img_size=64, depth=2),
    timm_case("swin_transformer", "swin_tiny_patch4_window7_224", **TINY_SWIN),
    timm_case("swin_transformer_v2", "swinv2_tiny_window8_256", **TINY_SWIN),
    timm_case("swin_transformer_v2_cr", "swinv2_cr_tiny_ns_224", **TINY_SWIN),
    timm_case("pvt_v2", "pvt_v2_b0", size=64, **TINY_PYRAMID),
    timm_case("twins", "twins_svt_small", size=64, **(TINY_PYRAMID | {"wss": (2, 2, 2, 2)})),
    timm_case("cait", "cait_xxs24_224", **TINY_VIT),
    timm_case("pit", "pit_ti_224", size=64, img_size=64, base_dims=[8, 8, 8], heads=[1, 2, 4], depth=[1, 1, 1]),
    timm_case("xcit", "xcit_nano_12_p8_224", expect="refused"),
    timm_case("volo", "volo_d1_224", expect="refused"),
    timm_case("crossvit", "crossvit_tiny_240", expect="refused"),
    timm_case("edgenext", "edgenext_xx_small", expect="refused"),
    timm_case("davit", "davit_tiny", expect="refused"),
    timm_case("tnt", "tnt_s_legacy_patch16_224", expect="refused"),
    timm_case("coat", "coat_lite_tiny", expect="refused"),
    timm_case("convit", "convit_tiny", expect="refused"),
    timm_case("levit", "levit_128s", expect="refused"),
    timm_case("mvitv2", "mvitv2_tiny", expect="refused"),
    timm_case("hiera", "hiera_tiny_224", expect="refused"),
    timm_case("hieradet_sam2", "sam2_hiera_tiny", expect="refused"),
    timm_case("nest", "nest_tiny", expect="refused"),
    timm_case("gcvit", "gcvit_xxtiny", expect="refused"),
    timm_case("maxxvit", "maxvit_nano_rw_256", expect="refused"),
    timm_case("metaformer", "caformer_s18", expect="refused"),
    timm_case("metaformer", "poolformer_s12", expect="refused"),  # no attention at all
    timm_case("efficientformer", "efficientformer_l1", expect="refused"),
    timm_case("efficientformer_v2", "efficientformerv2_s0", expect="refused"),
    timm_case("efficientvit_mit", "efficientvit_b0", expect="refused"),
    timm_case("efficientvit_mit", "efficientvit_l1", expect="refused"),
    timm_case("efficientvit_msra", "efficientvit_m0", expect="refused"),
    timm_case("efficientvim", "efficientvim_m1", expect="refused"),
    timm_case("efficientvim", "efficientvim_m1_dist", expect="refused"),
    timm_case("fastvit", "fastvit_t8", expect="refused"),  # no attention at all
    timm_case("fastvit", "fastvit_sa12", expect="refused"),
    timm_case("nextvit", "nextvit_small", expect="refused"),
    timm_case("tiny_vit", "tiny_vit_5m_224", expect="refused"),
    timm_case("visformer", "visformer_tiny", expect="refused"),
    timm_case("shvit", "shvit_s1", expect="refused"),
    timm_case("swiftformer", "swiftformer_xs", expect="refused"),
    timm_case("cpubone", "cpubone_nano", expect="refused"),
    timm_case("lowformer", "lowformer_b0", expect="refused"),
    timm_case("iformer", "iformer_t", expect="refused"),
    timm_case("csatv2", "csatv2", expect="refused"),
    timm_case("mobilevit", "mobilevit_xxs", expect="refused"),
    timm_case("byoanet", "botnet26t_256", expect="refused"),
    timm_case("mobilenetv3", "mobilenetv4_hybrid_medium", expect="refused"),
    timm_case("mobilenetv5", "mobilenetv5_300m", expect="refused"),
    timm_case("naflexvit", "naflexvit_base_patch16_gap", patch_size=8, embed_dim=32, depth=2, num_heads=2),
    timm_case("naflexvit", "naflexvit_base_patch16_siglip", patch_size=8, embed_dim=32, depth=2, num_heads=2),
    timm_case("qwen3_vit", "qwen3_vit_88m", expect="refused"),
    timm_case("gemma4_vit", "gemma4_vit_167m", expect="refused"),
    timm_case("deepseek_vit", "deepseek_vit_412m", expect="refused"),
]
"""Every representative, timm first, then the Hugging Face classes (family ``transformers``)."""

TINY_HF = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_labels": 3,
}


TINY_HF_BACKBONE = {key: value for key, value in TINY_HF.items() if key != "num_labels"}
TINY_TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
TINY_HF_SWIN = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [2, 2],
    "num_heads": [2, 2],
    "window_size": 4,
    "num_labels": 3,
}


TINY_SIGLIP2 = {key: value for key, value in TINY_HF_BACKBONE.items() if key != "image_size"} | {"num_patches": 16}


def siglip2_inputs(size: int) -> dict[str, torch.Tensor]:
    """Siglip2ImageProcessor's output for two images, ``size x size`` and ``size/2 x size``, as 8-pixel patches
    (``TINY_SIGLIP2``) padded to the larger one's count."""
    grids = torch.tensor([[size // 8, size // 8], [size // 16, size // 8]])
    length = int(grids[0].prod())
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(2, length, 3 * 8 * 8, generator=generator),
        "pixel_attention_mask": (torch.arange(length)[None] < grids.prod(dim=1)[:, None]).int(),
        "spatial_shapes": grids,
    }


def transformers_case(
    model_class: str,
    config_class: str,
    expect: str = "works",
    inputs: Callable[[int], object] | None = None,
    **config: object,
) -> Case:
    """A transformers class built from a tiny config (no download)."""

    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return Case("transformers", f"`{model_class}` (tiny)", build, 32, expect, inputs)


CASES += [
    transformers_case("ViTForImageClassification", "ViTConfig", **TINY_HF),
    transformers_case("DeiTForImageClassification", "DeiTConfig", **TINY_HF),
    transformers_case("DeiTForImageClassificationWithTeacher", "DeiTConfig", **TINY_HF),
    transformers_case("BeitForImageClassification", "BeitConfig", **TINY_HF, use_relative_position_bias=True),
    transformers_case("Dinov2ForImageClassification", "Dinov2Config", **TINY_HF),
    transformers_case(
        "Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", **TINY_HF, num_register_tokens=2
    ),
    transformers_case(
        "TimmWrapperForImageClassification",
        "TimmWrapperConfig",
        architecture="vit_tiny_patch16_224",
        num_labels=3,
        model_args=TINY_VIT,
    ),
    # Image-text configs: the tiny tower as the vision config, a tiny text config beside it.
    *(
        transformers_case(name, config, vision_config=TINY_HF_BACKBONE, text_config=TINY_TEXT, num_labels=3)
        for name, config in (
            ("CLIPForImageClassification", "CLIPConfig"),
            ("SiglipForImageClassification", "SiglipConfig"),
            ("MetaClip2ForImageClassification", "MetaClip2Config"),
        )
    ),
    transformers_case(
        "Siglip2ForImageClassification",
        "Siglip2Config",
        inputs=siglip2_inputs,
        vision_config=TINY_SIGLIP2,
        text_config=TINY_TEXT,
        num_labels=3,
    ),
    transformers_case("ViTMSNForImageClassification", "ViTMSNConfig", **TINY_HF),
    transformers_case("IJepaForImageClassification", "IJepaConfig", **TINY_HF),
    transformers_case("SwinForImageClassification", "SwinConfig", **TINY_HF_SWIN),
    transformers_case("Swinv2ForImageClassification", "Swinv2Config", **TINY_HF_SWIN),
]


class WithHead(nn.Module):
    """A user's linear head on a backbone's output (``pooler_output``, or ``image_embeds`` of a projection model)."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, 3)

    def forward(self, images: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.backbone(**images) if isinstance(images, dict) else self.backbone(images)
        if isinstance(output, torch.Tensor):
            return self.head(output)
        features = output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output
        return self.head(features)


def backbone_case(
    model_class: str,
    config_class: str,
    width: int = 32,
    inputs: Callable[[int], object] | None = None,
    **config: object,
) -> Case:
    """A transformers backbone (no classifier) built tiny, under a linear head of the user's own."""

    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        backbone = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        return WithHead(backbone, width)

    return Case("transformers", f"`{model_class}` (tiny) under a head", build, 32, inputs=inputs)


CASES += [
    backbone_case("CLIPVisionModel", "CLIPVisionConfig", **TINY_HF_BACKBONE),
    backbone_case("MetaClip2VisionModel", "MetaClip2VisionConfig", **TINY_HF_BACKBONE),
    backbone_case("CLIPVisionModelWithProjection", "CLIPVisionConfig", width=16, projection_dim=16, **TINY_HF_BACKBONE),
    backbone_case("SiglipVisionModel", "SiglipVisionConfig", **TINY_HF_BACKBONE),
    backbone_case("Siglip2VisionModel", "Siglip2VisionConfig", inputs=siglip2_inputs, **TINY_SIGLIP2),
    backbone_case("DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=2, **TINY_HF_BACKBONE),
    backbone_case("SwinModel", "SwinConfig", **TINY_HF_SWIN),
]


def open_clip_case() -> Case:
    """An open_clip image tower under a zero-shot-style linear head (the extra ``open_clip``)."""

    def build() -> nn.Module:
        from open_clip.transformer import VisionTransformer

        torch.manual_seed(0)
        tower = VisionTransformer(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16
        )
        return WithHead(tower, 16)

    return Case("open_clip", "`VisionTransformer` (tiny) under a head", build, 32)


def _transformers_vision_classes() -> list[str]:
    """Every image classifier and vision model class transformers exports (its ``*ForImageClassification`` and
    ``*VisionModel`` names)."""
    import transformers

    return sorted(
        name
        for name in dir(transformers)
        if name.endswith(("ForImageClassification", "VisionModel")) and not name.startswith(("TF", "Flax", "Auto"))
    )


UNBUILDABLE_HERE = {
    "DinatForImageClassification": "needs the natten library",
    "AyaVisionModel": "its default config does not build (embed_dim not divisible by num_heads)",
    "Granite4VisionModel": "its default config does not build",
}
"""transformers classes this table cannot instantiate (no weights, default config): listed, not run."""


def default_config_case(model_class: str) -> Case:
    """A transformers class that is refused, built at its default config on the meta device (no weights needed)."""

    def build() -> nn.Module:
        import transformers

        cls = getattr(transformers, model_class)
        if model_class in UNBUILDABLE_HERE:
            raise RuntimeError(UNBUILDABLE_HERE[model_class])
        with torch.device("meta"):
            return cls(cls.config_class())

    return Case("transformers", f"`{model_class}` (default config)", build, 32, "refused")


def _cases() -> list[Case]:
    """Every representative: timm, then transformers (a tiny one per supported class, then every other vision class
    at its default config), then open_clip when it is installed."""
    cases = list(CASES)
    covered = {case.label.split("`")[1] for case in cases if case.family == "transformers"}
    with contextlib.suppress(ImportError):  # transformers is optional: without it, its rows are left out
        cases += [default_config_case(name) for name in _transformers_vision_classes() if name not in covered]
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return cases
    return [*cases, open_clip_case()]


NO_TOKEN_ATTENTION: dict[str, str] = {
    "convolutional network": (
        "byobnet convmixer convnext cspnet cspnext densenet dla dpn efficientnet fasternet focalnet ghostnet "
        "hardcorenas hgnet hrnet inception_next inception_resnet_v2 inception_v3 inception_v4 lcnetv2 mambaout "
        "nasnet nfnet pnasnet rdnet regnet repghost repvit res2net resnest resnet resnetv2 rexnet selecsls senet "
        "sknet starnet tresnet vgg vovnet xception xception_aligned"
    ),
    "MLP or recurrent token mixing": "mlp_mixer sequencer",
}
"""timm modules without attention over tokens (channel or branch attention such as SE, split or selective kernel
attention is not token attention), grouped by why; they have nothing to roll out."""


@dataclass
class Outcome:
    case: Case
    model_class: str
    verdict: str  # works, refused or FAILED
    detail: str


def _check_explanation(model: nn.Module, result: object) -> str:
    """Why a successful explanation is not trustworthy, or '' when it is."""
    vit = find_vision_transformer(model)
    family = find_family(vit).name
    if family not in VERIFIED_FAMILIES:
        return f"explained by family {family!r}, whose token plan no test checks"
    if family == "vit" and type(vit).__name__ not in SINGLE_SEQUENCE_CLASSES:
        return f"{type(vit).__name__} went through the generic single-sequence probe, which no test checks for it"
    if result.grid_sizes is None and not bool(torch.isfinite(result.token_maps).all()):
        return "token maps are not finite"  # a NaFlex batch's are NaN off each image's grid: `_own_grid_problem`
    weights = result.head_weights
    sums = torch.nansum(weights, dim=-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "head weights do not sum to 1 per layer"
    return ""


def _own_grid_problem(result: object) -> str:
    """Why a NaFlex batch's maps are not on each image's own grid (``""`` if they are): each must be finite there and
    NaN outside it."""
    for index, (height, width) in enumerate(result.grid_sizes.tolist()):
        if int(result.token_maps[index].isfinite().sum()) != height * width:
            return "NaFlex batch: an image's map is not finite exactly on its own grid"
    return ""


def _naflex_problem(model: nn.Module, size: int) -> str:
    """Why a NaFlex batch of two images of different sizes is not explained right (``""`` if it is)."""
    from timm.data.naflex_transforms import patchify_image

    generator = torch.Generator().manual_seed(0)
    parts = [
        patchify_image(torch.randn(3, *shape, generator=generator), model.embeds.patch_size)
        for shape in ((size, size), (size // 2, size))
    ]
    length = len(parts[0][0])
    batch = {
        "patches": torch.zeros(2, length, parts[0][0].shape[1]),
        "patch_coord": torch.zeros(2, length, 2, dtype=torch.long),
        "patch_valid": torch.zeros(2, length, dtype=torch.bool),
    }
    for index, part in enumerate(parts):
        for key, value in zip(batch, part, strict=True):
            batch[key][index, : len(value)] = value
    try:
        result = explain(model, batch, method="gmar_l1")
    except Exception as error:
        return f"NaFlex batch: {type(error).__name__}: {error}"
    return _own_grid_problem(result)


def run_case(case: Case) -> Outcome:
    try:
        model = case.build()
    except Exception as error:  # a representative that timm cannot build is a bug in this table
        name = case.label.split("`")[1]
        if name in UNBUILDABLE_HERE:
            return Outcome(case, name, "not run", f"cannot be built here: {UNBUILDABLE_HERE[name]}")
        return Outcome(case, "?", "FAILED", f"cannot build: {type(error).__name__}: {error}")
    model_class = type(model.backbone if isinstance(model, WithHead) else model).__name__
    if case.inputs is not None:
        images = case.inputs(case.image_size)
    else:
        images = torch.randn(2, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(0))
    try:
        result = explain(model, images, method="gmar_l1")
    except UnsupportedModelError as error:
        message = str(error)
        if "\n" in message or model_class not in message:
            return Outcome(case, model_class, "FAILED", f"unclear refusal: {message}")
        verdict = "refused" if case.expect == "refused" else "FAILED"
        return Outcome(case, model_class, verdict, message.split(": ", 1)[-1].rstrip("."))
    except Exception as error:
        return Outcome(case, model_class, "FAILED", f"{type(error).__name__}: {error}")
    problem = _check_explanation(model, result) or (_own_grid_problem(result) if case.inputs is not None else "")
    if problem:
        return Outcome(case, model_class, "FAILED", problem)
    if case.expect != "works":
        return Outcome(case, model_class, "FAILED", "explained, but the table expects a refusal")
    family = find_family(find_vision_transformer(model)).name
    grid = "x".join(map(str, result.grid_size))
    note = FAMILY_NOTES[family]
    if result.layer_names[-1] in ("attn_pool", "head.attention"):
        note += "; read out through the attention pool's attention (no residual)"
    if is_naflex_vit(model):
        problem = _naflex_problem(model, case.image_size)
        if problem:
            return Outcome(case, model_class, "FAILED", problem)
        note += "; NaFlex batches (patch sequences padded to one length) too, each image on its own grid"
    if case.inputs is not None:
        note += (
            "; takes NaFlex batches only (Siglip2ImageProcessor's pixel_values, pixel_attention_mask, "
            "spatial_shapes), padding in no attention row or column, each image on its own grid"
        )
    return Outcome(case, model_class, "works", f"{note} ({len(result.layer_names)} layers, {grid} grid)")


def unclassified_timm_modules() -> list[str]:
    classified = {case.family for case in CASES} | {m for group in NO_TOKEN_ATTENTION.values() for m in group.split()}
    return sorted(set(timm.list_modules()) - classified)


def render_page(outcomes: list[Outcome]) -> str:
    lines = [
        "# Supported models",
        "",
        "Generated by `python benchmarks/supported_models.py` from one small random-init representative per timm "
        "model module, per supported Hugging Face transformers class (tiny, a backbone under a linear head of its "
        "own) and for every other transformers `*ForImageClassification` and `*VisionModel` class (its default config "
        "on the meta device), and an open_clip tower when the `open_clip` extra is installed; CI runs it with "
        "`--check` and fails when this page, "
        "the installed timm and the code disagree. "
        "**works** means `explain` ran and the family's token plan ([the method](method.md#hierarchical-windowed-"
        "and-multi-branch-models)) is checked against a full-matrix reference in the tests; **refused** is the "
        "one-line error the model gets. Models outside this table that reuse one of these classes behave as its row "
        "says; any other model with attention gets a one-line refusal naming its class.",
        "",
        "| family | representative | class | verdict | how, or why not |",
        "| --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        detail = outcome.detail.replace("|", "\\|")
        lines.append(
            f"| {outcome.case.family} | {outcome.case.label} | `{outcome.model_class}` | {outcome.verdict} | {detail} |"
        )
    lines += ["", "timm modules without attention over tokens, which have nothing to roll out:", ""]
    lines += [f"- {why}: {', '.join(modules.split())}." for why, modules in NO_TOKEN_ATTENTION.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/supported_models.md would change")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    missing = unclassified_timm_modules()
    if missing:
        print(
            f"timm modules not classified in {Path(__file__).name}: {', '.join(missing)}; add a Case or a "
            "NO_TOKEN_ATTENTION entry for each."
        )
        return 1
    start = time.perf_counter()
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in tqdm(_cases(), desc="families", unit="model"):
            outcomes.append(run_case(case))
    failed = [outcome for outcome in outcomes if outcome.verdict == "FAILED"]
    for outcome in outcomes:
        print(f"{outcome.verdict:8s} {outcome.case.family:26s} {outcome.model_class:28s} {outcome.detail}")
    works = sum(outcome.verdict == "works" for outcome in outcomes)
    refused = sum(outcome.verdict == "refused" for outcome in outcomes)
    not_run = len(outcomes) - works - refused - len(failed)
    print(
        f"{works} work, {refused} refused, {not_run} not run, {len(failed)} failed "
        f"in {time.perf_counter() - start:.0f} s"
    )
    page = render_page(outcomes)
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE} is out of date: run `python benchmarks/supported_models.py` and commit it.")
            return 1
    else:
        PAGE.write_text(page)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
