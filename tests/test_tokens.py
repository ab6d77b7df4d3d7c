"""The token layout read off each model family, against layouts stated from timm's definitions."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning.tokens import TokenLayout, infer_token_layout, patch_grid
from tests.models import FAMILIES, LAYOUTS, TINY, make_images, make_model, patch_grid_of


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inferred_layout_is_the_stated_one(family: str) -> None:
    num_prefix, readout = LAYOUTS[family]
    layout = infer_token_layout(make_model(family))
    assert layout.num_prefix_tokens == num_prefix
    assert layout.readout_tokens == (tuple(readout) if readout is not None else None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_grid_is_the_stated_one(family: str) -> None:
    images = make_images(family)
    assert patch_grid(make_model(family), tuple(images.shape[-2:])) == patch_grid_of(images)


def test_readout_vector_averages_the_read_tokens() -> None:
    distilled = TokenLayout(num_prefix_tokens=2, readout_tokens=(0, 1)).readout_vector(6, 1)
    assert distilled.tolist() == [[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]]
    pooled = TokenLayout(num_prefix_tokens=1, readout_tokens=None, pool_includes_prefix=True).readout_vector(4, 2)
    assert torch.equal(pooled, torch.full((2, 4), 0.25))


def test_models_without_a_linear_readout_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"global_pool='map'.*explain reads the pool's attention itself"):
        infer_token_layout(VisionTransformer(global_pool="map", **TINY))
