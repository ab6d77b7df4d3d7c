"""`gmar-lightning explain --model hf:<folder>` on SigLIP 2 (NaFlex): a saved Siglip2ForImageClassification with its
saved Siglip2ImageProcessor, on two images of different aspect ratios, each explained on its own grid.

The reference is `explain` on transformers' own processor output for the same images, built in the test from the
processor object that was saved, so nothing here reuses the command's loading or preprocessing code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("SigLIP 2 is supported on transformers 5", allow_module_level=True)
pytest.importorskip("torchvision")  # Siglip2ImageProcessor's backend

from gmar_lightning import explain  # noqa: E402
from gmar_lightning.cli import main  # noqa: E402

PATCH, NUM_PATCHES = 4, 16
TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
METHODS = ["gmar_l1", "rollout"]
# (width, height): a wide and a tall image, so their grids differ in both directions.
SIZES = [(40, 20), (18, 36)]


def tiny_siglip2(folder: Path, architecture: str = "Siglip2ForImageClassification") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Siglip2Config(
        vision_config={**TINY, "patch_size": PATCH, "num_patches": NUM_PATCHES},
        text_config=TINY,
        num_labels=3,
        architectures=[architecture],
    )
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    generator = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate(SIZES):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(tmp_path / f"image{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def run(images: list[Path], folder: Path, output: Path, *options: str) -> int:
    methods = [option for method in METHODS for option in ("--method", method)]
    return main(["explain", *map(str, images), "--model", f"hf:{folder}", *methods, "--output", str(output), *options])


def assert_saved_maps(output: Path, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Each saved map is `explain`'s map of that image on its own grid, NaN beyond it; grids are the processor's."""
    with np.load(output / "maps.npz") as arrays:
        grids = batch["spatial_shapes"].numpy()
        np.testing.assert_array_equal(arrays["grid_sizes"], grids)
        np.testing.assert_array_equal(arrays["map_sizes"], grids * PATCH)
        assert arrays["image_sizes"].tolist() == [list(size) for size in SIZES]
        assert arrays["crop_boxes"].tolist() == [[0, 0, width, height] for width, height in SIZES]
        for method in METHODS:
            expected = explain(model, batch, method=method)
            saved = arrays[f"maps_{method}"]
            assert saved.shape == (2, *(grids.max(axis=0) * PATCH))
            for index, (rows, columns) in enumerate(grids * PATCH):
                own = saved[index, :rows, :columns]
                assert not np.isnan(own).any()
                np.testing.assert_allclose(own, expected.maps[index, :rows, :columns].numpy(), atol=1e-6)
                assert np.isnan(saved[index, rows:]).all() and np.isnan(saved[index, :, columns:]).all()
            np.testing.assert_array_equal(arrays["predictions"], expected.predictions.numpy())


def test_siglip2_folder_is_explained_on_each_image_s_own_grid(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "siglip2"
    model = tiny_siglip2(folder)
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=NUM_PATCHES)
    processor.save_pretrained(folder)
    assert run(images, folder, tmp_path / "out") == 0
    assert "Model input: Siglip2ImageProcessor: up to 16 patches of 4x4 px, each image resized keeping its aspect" in (
        capsys.readouterr().out
    )
    originals = [Image.open(path).convert("RGB") for path in images]
    batch = dict(processor(images=originals, return_tensors="pt"))
    assert batch["spatial_shapes"][0].tolist() != batch["spatial_shapes"][1].tolist()  # two grids, neither square
    assert_saved_maps(tmp_path / "out", model, batch)
    for path in images:
        for method in METHODS:
            assert (tmp_path / "out" / f"{path.stem}_{method}.png").is_file()


def test_siglip2_folder_without_processor_uses_its_defaults_at_the_model_s_patch_size(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "siglip2"
    model = tiny_siglip2(folder)
    assert run(images, folder, tmp_path / "out", "--batch-size", "1") == 0
    assert "(no image processor saved: Siglip2ImageProcessor's defaults at the model's patch size)" in (
        capsys.readouterr().out
    )
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=NUM_PATCHES)
    batch = dict(processor(images=[Image.open(path).convert("RGB") for path in images], return_tensors="pt"))
    assert_saved_maps(tmp_path / "out", model, batch)  # batches of one, padded to one array without resampling


@pytest.mark.parametrize(
    ("options", "architecture", "expected"),
    [
        (["--img-size", "32"], "Siglip2ForImageClassification", "--img-size does not apply to --model hf:"),
        (["--crop-pct", "0.9"], "Siglip2ForImageClassification", "--crop-pct does not apply to --model hf:"),
        (
            ["--labels", "cat,dog"],
            "Siglip2Model",
            "holds Siglip2Model: the command line explains SigLIP 2 as Siglip2ForImageClassification only",
        ),
    ],
)
def test_what_does_not_apply_to_siglip2_is_one_line(
    options: list[str],
    architecture: str,
    expected: str,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "siglip2"
    tiny_siglip2(folder, architecture)
    capsys.readouterr()  # save_pretrained's progress bar
    assert run(images, folder, tmp_path / "out", *options) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmar-lightning explain: error: ") and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_saved_processor_of_another_patch_size_is_one_line(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "siglip2"
    tiny_siglip2(folder)
    transformers.Siglip2ImageProcessor(patch_size=2 * PATCH, max_num_patches=NUM_PATCHES).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    assert run(images, folder, tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = "saved a Siglip2ImageProcessor with patch_size 8 but the model's patches are 4 px"
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()
