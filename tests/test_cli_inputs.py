"""`gmar-lightning explain` feeds a checkpoint's images as training did, names its classes, and gives every image it
cannot explain faithfully one line and exit status 2.

The reference inputs are written here from the formulas (pixels / 255, then ``(x - mean) / std``), not with the
command's preprocessing code.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from gmar_lightning import GMARCallback
from gmar_lightning.cli import MAX_SHOWN_SIDE, MIN_IMAGE_SIDE, load_image, main, model_preprocessing
from gmar_lightning.demos.data import SHAPES, ShapesDataModule, ShapesDataset, denormalize
from gmar_lightning.demos.model import ViTClassifier
from gmar_lightning.input_recipe import INPUT_RECIPE_KEY, InputRecipe
from gmar_lightning.model_loading import create_vit
from tests.lightning_helpers import TinyViTModule, trainer_kwargs

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
TINY_OPTIONS = ["--model", MODEL, "--model-kwargs", json.dumps(MODEL_KWARGS), "--img-size", "32", "--num-classes", "3"]


def as_input(path: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An 8-bit image file as training feeds it: ``[0, 1]`` pixels normalised per channel."""
    with Image.open(path) as image:
        pixels = torch.tensor(np.array(image.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pth"
    torch.save(create_vit(MODEL, 3, img_size=32, model_kwargs=MODEL_KWARGS).state_dict(), path)
    return path


@pytest.mark.integration
def test_a_demo_checkpoint_is_explained_with_its_training_recipe_and_class_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    demo = ["demo", "--epochs", "1", "--max-train-images", "64", "--max-val-images", "16", "--num-probe", "4"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*demo, "--no-progress-bar", "--log-dir", str(tmp_path / "runs")]) == 0
    # Lightning's OnExceptionCheckpoint made every fresh demo look for a checkpoint to resume, with two warnings; a
    # logging interval longer than the epoch made a third.
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "ckpt_path" in message or "logging interval" in message]
    checkpoint = tmp_path / "runs" / "gmar_demo" / "version_0" / "checkpoints" / "last.ckpt"

    # Validation shapes saved as 8-bit PNGs, the way a user would hand them to the command.
    folder = tmp_path / "shapes"
    folder.mkdir()
    dataset = ShapesDataset(6, image_size=64, start_index=64)
    for index in range(len(dataset)):
        pixels = (denormalize(dataset[index][0]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"shape_{index}.png")
    capsys.readouterr()
    output = tmp_path / "out"
    assert (
        main(["explain", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu", "--output", str(output)]) == 0
    )
    printed = capsys.readouterr().out
    assert "normalised with mean (0.3, 0.3, 0.3) and std (0.2, 0.2, 0.2) (from the checkpoint" in printed
    assert "Class names from the checkpoint: circle, square, triangle, cross" in printed

    module = ViTClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with np.load(output / "maps.npz") as arrays:
        files = [Path(name) for name in arrays["files"].tolist()]
        inputs = torch.stack([as_input(path, ShapesDataset.mean, ShapesDataset.std) for path in files])
        with torch.no_grad():
            expected = module(inputs).softmax(dim=-1)
        np.testing.assert_allclose(arrays["probabilities"], expected.max(dim=-1).values.numpy(), atol=1e-4)
        np.testing.assert_array_equal(arrays["predictions"], expected.argmax(dim=-1).numpy())
        assert arrays["class_names"].tolist() == list(SHAPES[:4])
    for path, prediction, probability in zip(files, expected.argmax(-1), expected.max(-1).values, strict=True):
        assert f"{path.name}: {SHAPES[prediction]} ({probability:.1%})" in printed

    # Flags still override the stored recipe.
    overridden = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]
    argv = ["explain", str(files[0]), "--checkpoint", str(checkpoint), "--device", "cpu", *overridden]
    assert main([*argv, "--output", str(tmp_path / "overridden")]) == 0
    with np.load(tmp_path / "overridden" / "maps.npz") as arrays, torch.no_grad():
        other = module(as_input(files[0], (0.5,) * 3, (0.5,) * 3)[None]).softmax(dim=-1)
        np.testing.assert_allclose(arrays["probabilities"], other.max(dim=-1).values.numpy(), atol=1e-4)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG of ``[H, W, 3]`` uint16 pixels (Pillow cannot write 16-bit colour)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_pngs_are_explained_as_the_8_bit_images_they_show(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generator = np.random.default_rng(0)
    gray = generator.integers(0, 256, (40, 48), dtype=np.uint16)
    colour = generator.integers(0, 256, (40, 48, 3), dtype=np.uint16)
    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    eight.mkdir(), sixteen.mkdir()
    Image.fromarray(gray.astype(np.uint8)).save(eight / "gray.png")
    Image.fromarray(colour.astype(np.uint8)).save(eight / "colour.png")
    # v * 257 maps 0..255 onto 0..65535: the same picture at 16 bits (a viewer shows 65535 as white).
    Image.fromarray(gray * 257).save(sixteen / "gray.png")
    with Image.open(sixteen / "gray.png") as image:
        assert image.mode == "I;16"
    (sixteen / "colour.png").write_bytes(png16(colour * 257))
    outputs = {}
    for name, folder in (("eight", eight), ("sixteen", sixteen)):
        outputs[name] = tmp_path / f"out_{name}"
        argv = ["explain", str(folder), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
        assert main([*argv, "--method", "gmar_l1,rollout", "--output", str(outputs[name])]) == 0
    with np.load(outputs["eight"] / "maps.npz") as eight_bit, np.load(outputs["sixteen"] / "maps.npz") as sixteen_bit:
        for key in ("maps_gmar_l1", "maps_rollout", "probabilities", "predictions"):
            np.testing.assert_array_equal(eight_bit[key], sixteen_bit[key])
    assert capsys.readouterr().err.count("error") == 0


def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each image the command must refuse, with what its one line says."""
    folder.mkdir()
    cases = {
        "float TIFF": ("float.tif", "holds 32-bit floating-point pixels, whose display range is unknown"),
        "32-bit integer TIFF": ("int.tif", "holds 32-bit integer pixels"),
        "one pixel": ("dot.png", f"is 1x1 px, smaller than {MIN_IMAGE_SIDE} px on a side"),
        "thin strip": ("strip.png", f"is 200x{MIN_IMAGE_SIDE - 1} px, smaller than {MIN_IMAGE_SIDE} px on a side"),
        "not an image": ("notes.png", "cannot read image"),
        "truncated PNG": ("cut.png", "cannot read image"),
    }
    Image.fromarray(np.random.default_rng(0).random((40, 40), dtype=np.float32)).save(folder / "float.tif")
    Image.fromarray(np.full((40, 40), 70000, dtype=np.int32)).save(folder / "int.tif")
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    Image.new("RGB", (200, MIN_IMAGE_SIDE - 1), "red").save(folder / "strip.png")
    (folder / "notes.png").write_text("not an image")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:400])  # the header reads, the pixels do not
    return {case: (folder / name, message) for case, (name, message) in cases.items()}


BAD_CASES = ["float TIFF", "32-bit integer TIFF", "one pixel", "thin strip", "not an image", "truncated PNG"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_image_gets_one_line_and_status_2(
    case: str, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, message = _bad_images(tmp_path / "images")[case]
    argv = ["explain", str(path), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmar-lightning explain: error: ") and message in lines[0], lines
    assert str(path) in lines[0]
    assert not (tmp_path / "out" / "maps.npz").exists()


def test_a_folder_with_bad_images_explains_the_others_and_exits_2(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_images(tmp_path / "images")
    good = tmp_path / "images" / "good.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good)
    output = tmp_path / "out"
    argv = ["explain", str(tmp_path / "images"), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    assert main([*argv, "--output", str(output)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("gmar-lightning explain: error: ") for line in lines)
    assert f"Skipped {len(bad)} images that could not be explained" in captured.out
    with np.load(output / "maps.npz") as arrays:
        assert arrays["files"].tolist() == [str(good)]
    assert sorted(path.name for path in output.glob("*.png")) == ["good_gmar_l1.png"]


def test_large_images_are_drawn_reduced_with_a_note_and_maps_stay_at_model_resolution(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    large = tmp_path / "large.png"
    ramp = np.linspace(0, 255, 3000, dtype=np.float32)
    Image.fromarray(np.repeat(np.add.outer(ramp[:2000] / 2, ramp / 2)[..., None], 3, axis=2).astype(np.uint8)).save(
        large
    )
    output = tmp_path / "out"
    argv = ["explain", str(large), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    assert main([*argv, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "is 3000x2000 px; its overlays are drawn at 2048x1365, and maps.npz keeps the maps at the model's 32x32" in (
        printed
    )
    with Image.open(output / "large_gmar_l1.png") as overlay:
        # The image area plus a colour bar beside it: far below the original's 3000 px.
        assert MAX_SHOWN_SIDE < overlay.width < MAX_SHOWN_SIDE * 1.5
    with np.load(output / "maps.npz") as arrays:
        assert arrays["maps_gmar_l1"].shape == (1, 32, 32) and arrays["image_sizes"].tolist() == [[3000, 2000]]


def test_random_weights_are_marked_and_small_probabilities_keep_a_digit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    argv = ["explain", str(image), *TINY_OPTIONS[:-1], "1000", "--random-weights", "--device", "cpu"]
    assert main([*argv, "--side-by-side", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("[random weights] noise.png: class "))
    # 1000 near-uniform classes: about 0.1% each, which used to print as "(0%)".
    assert line.endswith(("(0.1%)", "(0.2%)")), line


def test_an_output_folder_holds_one_runs_files(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            images / f"{name}.png"
        )
    output = tmp_path / "out"
    base = ["explain", *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu", "--output", str(output)]
    assert main([*base, str(images), "--side-by-side"]) == 0
    assert main([*base, str(images / "b.png")]) == 0
    assert "Removed the 5 files of the earlier run" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == ["b_gmar_l1.png", "maps.npz"]
    (output / "notes.txt").write_text("mine")
    assert main([*base, str(images / "a.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds files that no earlier explain run wrote there (notes.txt)" in lines[0]
    assert (output / "notes.txt").read_text() == "mine" and (output / "b_gmar_l1.png").is_file()


def test_a_squashing_recipe_resizes_both_sides_and_the_map_covers_the_whole_image(tmp_path: Path) -> None:
    # ImageFolderDataModule's validation transform: both sides to the input side, whatever the aspect ratio.
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 90, 3), dtype=np.uint8)).save(path)
    recipe = InputRecipe(img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, resize="squash", interpolation="bilinear")
    preprocessing = model_preprocessing(create_vit(MODEL, 3, img_size=32, model_kwargs=MODEL_KWARGS), recipe=recipe)
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    expected = as_input_pixels(np.asarray(resized), (0.5,) * 3, (0.25,) * 3)
    torch.testing.assert_close(load_image(path, preprocessing), expected, atol=1 / 255 / 0.25, rtol=0)
    assert preprocessing.crop_box(90, 30) == (0.0, 0.0, 90.0, 30.0)
    assert preprocessing.describe().startswith("resized to 32x32 (bilinear, aspect ratio not kept)")


def as_input_pixels(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    values = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (values - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.integration
def test_the_callback_stores_the_recipe_it_knows_in_every_checkpoint(tmp_path: Path) -> None:
    # A fit from plain dataloaders: no data module states a recipe, so the callback's own settings and the probe's
    # side are what the checkpoint can carry.
    data = ShapesDataModule(num_train=32, num_val=16, image_size=32, batch_size=16)
    names = ["round", "box", "wedge", "plus"]
    callback = GMARCallback(num_probe=4, mean=(0.3,) * 3, std=(0.2,) * 3, class_names=names)
    trainer = pl.Trainer(callbacks=[callback], logger=False, **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(TinyViTModule(), train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    stored = torch.load(tmp_path / "plain.ckpt", weights_only=True)[INPUT_RECIPE_KEY]
    assert stored == {"img_size": 32, "mean": [0.3] * 3, "std": [0.2] * 3, "class_names": names}

    # With the data module, its recipe (the transform training really used) comes first; the callback fills gaps.
    callback = GMARCallback(num_probe=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    trainer = pl.Trainer(callbacks=[callback], logger=False, **trainer_kwargs(tmp_path / "dm", max_epochs=1))
    trainer.fit(TinyViTModule(), datamodule=data)
    trainer.save_checkpoint(tmp_path / "datamodule.ckpt")
    stored = torch.load(tmp_path / "datamodule.ckpt", weights_only=True)[INPUT_RECIPE_KEY]
    assert InputRecipe.from_dict(stored) == InputRecipe(
        img_size=32,
        mean=ShapesDataset.mean,
        std=ShapesDataset.std,
        resize="shorter_side",
        crop_pct=1.0,
        interpolation="bilinear",
        class_names=tuple(SHAPES[:4]),
    )
