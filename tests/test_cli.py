"""The `gmar-lightning` command line: explain images, build a report, and fail with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from gmar_lightning import explain
from gmar_lightning.cli import load_image, main, map_to_original, model_preprocessing
from gmar_lightning.demos.data import ShapesDataModule, ShapesDataset
from gmar_lightning.demos.model import ViTClassifier
from gmar_lightning.model_loading import create_vit
from gmar_lightning.trajectory import HeadTrajectory

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
TINY_OPTIONS = ["--model", MODEL, "--model-kwargs", json.dumps(MODEL_KWARGS), "--img-size", "32", "--num-classes", "3"]


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_vit(MODEL, 3, img_size=32, model_kwargs=MODEL_KWARGS).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pth"
    torch.save(tiny_vit(seed=7).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PNGs of other sizes than the model's input, one of them grayscale, and a JPEG in a subfolder."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    (folder / "nested").mkdir()
    paths = [folder / "colour.png", folder / "gray.png", folder / "nested" / "photo.jpg"]
    Image.fromarray(generator.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(generator.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(paths[1])
    Image.fromarray(generator.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(paths[2])
    return paths


def test_explain_writes_overlays_and_maps_of_the_loaded_weights(
    weights: Path, images: list[Path], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    # On the CPU like the reference below: on a GPU machine the CLI would default to CUDA and differ by rounding.
    argv = ["explain", str(images[0]), str(images[1]), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    assert main([*argv, "--method", "gmar_l1,rollout", "--method", "attention", "--output", str(output)]) == 0

    for stem, (width, height) in (("colour", (50, 40)), ("gray", (20, 20))):
        for method in ("gmar_l1", "rollout", "attention"):
            with Image.open(output / f"{stem}_{method}.png") as overlay_image:
                # The image at its own size, plus a caption band above and a colour bar on the right.
                assert overlay_image.width > width and overlay_image.height > height and overlay_image.mode == "RGBA"
    with np.load(output / "maps.npz") as arrays:
        assert sorted(arrays.files) == [
            "crop_boxes",
            "files",
            "head_weights_gmar_l1",
            "image_sizes",
            "maps_attention",
            "maps_gmar_l1",
            "maps_rollout",
            "outputs",
            "predictions",
            "probabilities",
        ]
        assert sorted(arrays["outputs"].tolist()) == sorted(path.name for path in output.glob("*.png"))
        assert arrays["image_sizes"].tolist() == [[50, 40], [20, 20]]
        assert arrays["probabilities"].min() > 0 and arrays["probabilities"].max() <= 1
        assert arrays["files"].tolist() == [str(images[0]), str(images[1])]
        maps = arrays["maps_gmar_l1"]
        assert maps.shape == (2, 32, 32) and maps.min() >= 0.0 and maps.max() <= 1.0
        assert arrays["head_weights_gmar_l1"].shape == (2, 2, 4)
        assert not np.allclose(maps, arrays["maps_rollout"])
        # The CLI must explain with the checkpoint's weights: the same maps as explaining the saved model directly.
        model = tiny_vit(seed=7)
        inputs = torch.stack([load_image(path, model_preprocessing(model)) for path in images[:2]])
        expected = explain(model, inputs, method="gmar_l1")
        np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-5)
        np.testing.assert_array_equal(arrays["predictions"], expected.predictions.numpy())


def test_model_input_is_timm_resize_and_centre_crop_and_maps_go_back_to_the_original_pixels(tmp_path: Path) -> None:
    # A 100 x 50 horizontal ramp: column x has brightness x. With crop_pct 1 and a 32 px input, the shorter side
    # becomes 32 px (the image 64 x 32), and the centre crop keeps resized columns 16..48, original columns 25..75.
    ramp = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    preprocessing = model_preprocessing(tiny_vit(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
    assert preprocessing.crop_box(100, 50) == (25.0, 0.0, 75.0, 50.0)
    model_input = load_image(tmp_path / "ramp.png", preprocessing)
    assert model_input.shape == (3, 32, 32)
    row = model_input[0, 16] * 255
    assert row[0].item() == pytest.approx(25.5, abs=1.5) and row[-1].item() == pytest.approx(73.5, abs=1.5)
    placed = map_to_original(torch.ones(32, 32), preprocessing.crop_box(100, 50), width=100, height=50)
    assert placed.shape == (50, 100)
    assert torch.isnan(placed[:, :25]).all() and torch.isnan(placed[:, 75:]).all()
    torch.testing.assert_close(placed[:, 25:75], torch.ones(50, 50))


def test_explain_captions_with_class_names_and_writes_side_by_sides(
    weights: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nbird\n")
    output = tmp_path / "out"
    argv = ["explain", str(images[2]), *TINY_OPTIONS, "--checkpoint", str(weights), "--class-names", str(names)]
    assert main([*argv, "--method", "gmar_l1,rollout", "--side-by-side", "--cmap", "viridis", "--alpha", "0.7",
                 "--output", str(output)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Model input: shorter side resized to 35 px (bicubic), centre 32x32 crop, normalised with mean" in printed
    assert sorted(path.name for path in output.glob("*.png")) == [
        "photo_gmar_l1.png", "photo_methods.png", "photo_rollout.png"
    ]  # fmt: skip
    with np.load(output / "maps.npz") as arrays:
        assert arrays["class_names"].tolist() == ["cat", "dog", "bird"]
        # The image is 48 x 64: resized to 35 x 46, the 32 px crop starts at column round(3 / 2) = 2 and row 7.
        box = arrays["crop_boxes"][0]
        np.testing.assert_allclose(box, [2 * 48 / 35, 7 * 64 / 46, 34 * 48 / 35, 39 * 64 / 46], rtol=1e-4)
    short_names = tmp_path / "short.txt"
    short_names.write_text("cat\n")
    assert main([*argv[:-1], str(short_names), "--output", str(tmp_path / "x")]) == 2
    assert "names 1 classes but the model has 3" in capsys.readouterr().err


def test_explain_takes_folders_and_batches_them(weights: Path, images: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    folder = images[0].parent
    assert (
        main(
            [
                "explain",
                str(folder),
                *TINY_OPTIONS,
                "--checkpoint",
                str(weights),
                "--batch-size",
                "2",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert sorted(path.name for path in output.glob("*.png")) == [
        "colour_gmar_l1.png",
        "gray_gmar_l1.png",
        "photo_gmar_l1.png",
    ]
    with np.load(output / "maps.npz") as arrays:
        assert arrays["maps_gmar_l1"].shape == (3, 32, 32)


@pytest.mark.integration
def test_explain_reads_model_settings_from_a_lightning_checkpoint(images: list[Path], tmp_path: Path) -> None:
    module = ViTClassifier(MODEL, num_classes=4, img_size=32, model_kwargs=MODEL_KWARGS)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=ShapesDataModule(num_train=8, num_val=4, image_size=32, batch_size=8))
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)

    output = tmp_path / "out"
    assert main(["explain", str(images[0]), "--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    with np.load(output / "maps.npz") as arrays:
        assert arrays["head_weights_gmar_l1"].shape == (1, 2, 4)
        # The checkpoint stores the data module's recipe: shorter side to 32 px and a centre crop, shapes' mean/std.
        recipe = model_preprocessing(module.model, ShapesDataset.mean, ShapesDataset.std, crop_pct=1.0)
        expected = module.model(load_image(images[0], recipe)[None]).argmax(-1)
        assert arrays["predictions"].tolist() == expected.tolist()


def test_checkpoints_load_strictly_unless_partial_loading_is_asked_for(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deeper = tmp_path / "deeper.pth"
    torch.manual_seed(0)
    torch.save(create_vit(MODEL, 3, img_size=32, model_kwargs={**MODEL_KWARGS, "depth": 3}).state_dict(), deeper)
    argv = ["explain", str(images[0]), *TINY_OPTIONS, "--checkpoint", str(deeper), "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "strict")]) == 2
    assert "--partial-checkpoint" in capsys.readouterr().err
    assert main([*argv, "--partial-checkpoint", "--output", str(tmp_path / "partial")]) == 0
    assert (tmp_path / "partial" / "maps.npz").is_file()


def _error_cases(tmp_path: Path, weights: Path, images: list[Path]) -> dict[str, tuple[list[str], str]]:
    unreadable = tmp_path / "broken.png"
    unreadable.write_text("not an image")
    corrupt_run = tmp_path / "corrupt"
    corrupt_run.mkdir()
    (corrupt_run / "head_importance.npz").write_bytes(b"garbage")
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    wrong_classes = [*TINY_OPTIONS[:-1], "7"]
    image = str(images[0])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 10_000))
    empty_npz = tmp_path / "empty.npz"
    empty_npz.write_bytes(b"")
    truncated_npz = tmp_path / "truncated.npz"
    HeadTrajectory().save_npz(truncated_npz)
    truncated_npz.write_bytes(truncated_npz.read_bytes()[:100])
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    array = tmp_path / "array.npy"
    np.save(array, np.arange(4))
    deeper = tmp_path / "deeper.pth"
    torch.manual_seed(0)
    torch.save(create_vit(MODEL, 3, img_size=32, model_kwargs={**MODEL_KWARGS, "depth": 3}).state_dict(), deeper)
    explain_base = ["explain", image, *TINY_OPTIONS, "--checkpoint", str(weights)]
    return {
        "missing image": (["explain", str(tmp_path / "nope.png"), *TINY_OPTIONS], "does not exist"),
        "unknown model": (["explain", image, "--model", "vit_does_not_exist"], "unknown timm model"),
        "unreadable image": (["explain", str(unreadable), *TINY_OPTIONS], "cannot read image"),
        "missing checkpoint": (
            ["explain", image, *TINY_OPTIONS, "--checkpoint", str(tmp_path / "x.pth")],
            "does not exist",
        ),
        "checkpoint of another model": (
            ["explain", image, *wrong_classes, "--checkpoint", str(weights)],
            "does not fit",
        ),
        "unknown method": ([*explain_base, "--method", "gmar_l3"], "--method"),
        "no model": (["explain", image], "--model is required"),
        "bad model kwargs": (
            ["explain", image, *TINY_OPTIONS, "--model-kwargs", '{"depth": "two"}', "--random-weights"],
            "model_kwargs",
        ),
        "decompression bomb": (["explain", str(bomb), *TINY_OPTIONS, "--random-weights"], "too large to read safely"),
        "empty trajectory file": (["report", str(empty_npz)], "is empty or truncated (EOFError"),
        "truncated trajectory file": (["report", str(truncated_npz)], "is empty or truncated (BadZipFile"),
        "heads not dividing the width": (
            ["explain", image, "--model", MODEL, "--model-kwargs", '{"num_heads": 5}', "--random-weights"],
            "cannot be built with --model-kwargs {'num_heads': 5} (dim should be divisible by num_heads)",
        ),
        "image smaller than a patch": (
            ["explain", image, "--model", MODEL, "--img-size", "4", "--random-weights"],
            "--img-size 4 is smaller than the model's 16-pixel patches; pass --img-size 16 or more.",
        ),
        "text file as checkpoint": ([*explain_tiny(image), "--checkpoint", str(text)], "is not a weights file"),
        "numpy file as checkpoint": ([*explain_tiny(image), "--checkpoint", str(array)], "is not a weights file"),
        "checkpoint of a deeper model": (
            [*explain_tiny(image), "--checkpoint", str(deeper)],
            "has tensors the model lacks, such as ['blocks.2.",
        ),
        "no weights": (["explain", image, *TINY_OPTIONS], "has no weights: pass --checkpoint FILE or --pretrained"),
        "empty run": (["report", str(empty_run)], "holds no head_importance.npz"),
        "corrupt trajectory": (["report", str(corrupt_run)], "not a readable"),
        "missing run": (["report", str(tmp_path / "no_run")], "does not exist"),
    }


def explain_tiny(image: str) -> list[str]:
    """`explain` of one image with the tiny model options."""
    return ["explain", image, *TINY_OPTIONS]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


ERROR_CASES = [
    "missing image",
    "unknown model",
    "unreadable image",
    "missing checkpoint",
    "checkpoint of another model",
    "unknown method",
    "no model",
    "bad model kwargs",
    "empty run",
    "corrupt trajectory",
    "missing run",
    "decompression bomb",
    "empty trajectory file",
    "truncated trajectory file",
    "heads not dividing the width",
    "image smaller than a patch",
    "text file as checkpoint",
    "numpy file as checkpoint",
    "checkpoint of a deeper model",
    "no weights",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_exit_non_zero_with_one_line(
    case: str, weights: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = _error_cases(tmp_path, weights, images)[case]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"gmar-lightning {argv[0]}: error: ") and expected in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out" / "maps.npz").exists()


def test_usage_errors_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "required: inputs" in lines[0]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--device", "nonsense"], "must be a torch device"),
        (["--device", "meta"], "meta tensors hold no data, so nothing can be explained; use cpu or cuda"),
        (["--batch-size", "0"], "must be a positive integer"),
        (["--mode", "shaded"], "invalid choice: 'shaded'"),
    ],
)
def test_bad_option_values_are_one_line(
    option: list[str], expected: str, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(images[0]), *TINY_OPTIONS, *option])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


@pytest.mark.parametrize("value", ["2", "-0.5", "high"])
def test_bad_target_accuracy_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--target-acc", value])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--target-acc" in lines[0] and "must be an accuracy in [0, 1]" in lines[0]


@pytest.mark.integration
def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    executable = shutil.which("gmar-lightning", path=os.path.dirname(sys.executable))
    command = [executable] if executable else [sys.executable, "-m", "gmar_lightning.cli"]
    completed = subprocess.run(
        [*command, "explain", str(tmp_path / "missing.png"), "--model", "vit_tiny_patch16_224"],
        capture_output=True,
        text=True,
        # A hang guard only, as long as the other CLI subprocess tests': at 120 s this one timed out in a full-suite
        # run at autogroup nice 19 under load 14, its interpreter starved before it got to the error.
        timeout=300,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"gmar-lightning explain: error: image {str(tmp_path / 'missing.png')!r} does not exist; pass image files or "
        "folders of images."
    ]


def test_explain_display_options_change_only_how_the_map_is_drawn(
    weights: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", str(images[0]), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    outputs = {}
    for name, options in {"blended": [], "masked": ["--mode", "masked", "--outlier-percentile", "5"]}.items():
        assert main([*argv, *options, "--output", str(tmp_path / name)]) == 0
        with np.load(tmp_path / name / "maps.npz") as arrays:
            outputs[name] = (arrays["maps_gmar_l1"], np.asarray(Image.open(tmp_path / name / "colour_gmar_l1.png")))
    np.testing.assert_array_equal(outputs["blended"][0], outputs["masked"][0])  # the same explanation
    assert outputs["blended"][1].shape == outputs["masked"][1].shape
    assert not np.array_equal(outputs["blended"][1], outputs["masked"][1])
    capsys.readouterr()  # the runs' progress bars
    assert main([*argv, "--outlier-percentile", "100", "--output", str(tmp_path / "bad")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "`outlier_percentile` must be a number in [0, 100)" in lines[0]
