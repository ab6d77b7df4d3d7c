"""Tiny random-init timm ViTs of every supported family, shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4, "num_classes": 5}

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: VisionTransformer(**TINY),
    "vit_registers": lambda: VisionTransformer(reg_tokens=2, **TINY),
    "vit_avg_no_cls": lambda: VisionTransformer(class_token=False, global_pool="avg", **TINY),
    "vit_dynamic": lambda: VisionTransformer(dynamic_img_size=True, **TINY),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
    "beit": lambda: Beit(use_rel_pos_bias=True, **TINY),
    "eva": lambda: Eva(use_rot_pos_emb=True, **TINY),
}

# Non-square input for the dynamic-size model: a 4x6 patch grid.
IMAGE_SIZES = {"vit_dynamic": (32, 48)}

# What each family's classifier reads, stated here from timm's definitions rather than read off the model by the
# package: (prefix tokens, read-out token indices, or None for the mean of the patch tokens).
LAYOUTS: dict[str, tuple[int, list[int] | None]] = {
    "vit": (1, [0]),
    "vit_registers": (3, [0]),  # class token, then 2 registers
    "vit_avg_no_cls": (0, None),
    "vit_dynamic": (1, [0]),
    "deit_distilled": (2, [0, 1]),  # the mean of the class and distillation heads
    "beit": (1, None),  # BEiT and EVA default to average pooling over the patch tokens
    "eva": (1, None),
}


def patch_grid_of(images: torch.Tensor) -> tuple[int, int]:
    """The patch grid of the tiny models: 8-pixel patches."""
    return images.shape[-2] // TINY["patch_size"], images.shape[-1] // TINY["patch_size"]


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise weights with a larger scale so attention is peaked and maps differ clearly across tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 or "token" in name or "pos_embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def make_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sharpen(FAMILIES[family](), seed).eval()


def make_images(family: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    height, width = IMAGE_SIZES.get(family, (32, 32))
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
