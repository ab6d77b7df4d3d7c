"""Model loading: building a timm ViT and loading weights into it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmar_lightning.model_loading import create_vit, load_weights

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    path = tmp_path / "tiny_vit.pth"
    torch.save(create_vit(MODEL, 3, img_size=32, model_kwargs=MODEL_KWARGS).state_dict(), path)
    return path


def test_load_weights_keeps_a_fresh_head_only_when_not_strict(weights: Path) -> None:
    saved = torch.load(weights, weights_only=True)
    model = create_vit(MODEL, 5, img_size=32, model_kwargs=MODEL_KWARGS)
    assert load_weights(model, weights, strict=False) == ["head.bias", "head.weight"]
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])
    assert model.head.weight.shape == (5, 32)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(create_vit(MODEL, 5, img_size=32, model_kwargs=MODEL_KWARGS), weights, strict=True)
