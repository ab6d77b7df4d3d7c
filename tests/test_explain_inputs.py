"""`explain` refuses inputs it would otherwise explain wrongly, with one line that names the argument."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning import explain
from gmar_lightning.tokens import TokenLayout


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3).eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        (
            {"target": torch.tensor([0, 1, 2])},
            ValueError,
            r"`target` must be an int or have shape \[2\] \(one class per image\), got \[3\]",
        ),
        (
            {"target": torch.tensor([0, 1, 2]), "chunk_size": 1},
            ValueError,
            r"shape \[2\] \(one class per image\), got \[3\]",
        ),
        (
            {"target": torch.tensor(1.7)},
            TypeError,
            r"`target` must hold integer class indices, got dtype torch.float32",
        ),
        ({"target": torch.tensor(True)}, TypeError, r"`target` must hold integer class indices, got dtype torch.bool"),
        ({"target": torch.tensor(float("nan"))}, TypeError, r"`target` must hold integer class indices"),
        ({"target": "1"}, TypeError, r"`target` must be None, an int or an integer tensor \[B\], got str '1'"),
        ({"target": [0.5, 1.0]}, TypeError, r"`target` must hold integer class indices"),
        ({"residual": "0.5"}, ValueError, r"`residual` must be a number in \[0.0, 1.0\], got str '0.5'"),
    ],
)
def test_bad_targets_and_options_are_refused(vit: torch.nn.Module, options: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        explain(vit, IMAGES, **options)


def test_a_whole_batch_target_of_the_right_length_still_works_in_chunks(vit: torch.nn.Module) -> None:
    whole = explain(vit, IMAGES, target=torch.tensor([2, 0]))
    chunked = explain(vit, IMAGES, target=torch.tensor([2, 0]), chunk_size=1)
    assert whole.targets.tolist() == chunked.targets.tolist() == [2, 0]
    assert explain(vit, IMAGES, target=torch.tensor(1)).targets.tolist() == [1, 1]


def test_meta_images_are_refused(vit: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"`images` are meta tensors, which hold no data"):
        explain(vit, IMAGES.to("meta"))


@pytest.mark.parametrize(
    ("layout", "pattern"),
    [
        ({"readout_tokens": (-1,)}, r"`readout_tokens` must be a non-negative integer, got -1"),
        ({"readout_tokens": ()}, r"`readout_tokens` must be a non-empty tuple of token indices or None"),
        ({"num_prefix_tokens": -1}, r"`num_prefix_tokens` must be a non-negative integer, got -1"),
        ({"num_prefix_tokens": 1.5}, r"`num_prefix_tokens` must be a non-negative integer, got 1.5"),
    ],
)
def test_invalid_token_layouts_are_refused_when_built(layout: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TokenLayout(**layout)


def test_a_model_on_the_meta_device_is_refused() -> None:
    with torch.device("meta"):
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    with pytest.raises(ValueError, match=r"^`model` \(VisionTransformer\) has parameters on the meta device") as error:
        explain(vit, IMAGES)
    assert "\n" not in str(error.value)
