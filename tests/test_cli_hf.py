"""`gmar-lightning explain --model hf:<folder>`: Hugging Face classifiers, pruned ones loaded from their weights file or
a Lightning checkpoint, the saved image processor's input recipe, and one-line errors.

The reference inputs are made with torchvision's transforms, and the reference maps with `explain` on the model built
in the test, so nothing here reuses the command's loading or preprocessing code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("pruning Hugging Face ViTs needs the transformers 5 attention layout", allow_module_level=True)

from gmar_lightning import explain  # noqa: E402
from gmar_lightning.cli import main  # noqa: E402
from gmar_lightning.heads.pruning import prune_heads  # noqa: E402
from tests import test_hf, test_pruning_hf  # noqa: E402
from tests.lightning_helpers import tiny_data, trainer_kwargs  # noqa: E402
from tests.test_hf import HFViTModule  # noqa: E402  (a 2-layer, 4-head ViTForImageClassification for 4 classes)

TINY = {**test_hf.TINY, "num_labels": 4}  # a 32 px ViT with 8 px patches, 2 layers of 4 heads
REMOVED = {0: [1, 3], 1: [2]}


def tiny_vit(seed: int = 0, **config: int) -> torch.nn.Module:
    """A random ViT with large weights, so that removing heads changes its maps."""
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def reference_inputs(paths: list[Path], resize: int, mean: tuple, std: tuple, interpolation: str) -> torch.Tensor:
    """Shorter side resized to ``resize``, centre 32 px crop, normalised: written with torchvision directly."""
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=InterpolationMode(interpolation)),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    inputs = []
    for path in paths:
        with Image.open(path) as image:
            inputs.append(transform(image.convert("RGB")))
    return torch.stack(inputs)


def assert_maps_equal(output: Path, model: torch.nn.Module, inputs: torch.Tensor, methods: list[str]) -> None:
    with np.load(output / "maps.npz") as arrays:
        for method in methods:
            expected = explain(model, inputs, method=method)
            np.testing.assert_allclose(arrays[f"maps_{method}"], expected.maps.numpy(), atol=1e-5)
            np.testing.assert_array_equal(arrays["predictions"], expected.predictions.numpy())
            if expected.head_weights is not None:
                np.testing.assert_allclose(arrays[f"head_weights_{method}"], expected.head_weights.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A wide colour PNG and a small grayscale one, neither of the model's size."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    paths = [folder / "wide.png", folder / "gray.png"]
    Image.fromarray(generator.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(generator.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(paths[1])
    return paths


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``save_pretrained`` of the unpruned tiny ViT, without an image processor."""
    path = tmp_path_factory.mktemp("hf") / "vit"
    tiny_vit().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT with heads removed, saved the package's way: ``torch.save(model.state_dict())``."""
    model = tiny_vit()
    prune_heads(model, REMOVED)
    path = tmp_path_factory.mktemp("pruned") / "pruned.pth"
    torch.save(model.state_dict(), path)
    return path


def test_pruned_weights_file_loads_into_the_folders_architecture(
    folder: Path, pruned_weights: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    methods = ["gmar_l1", "rollout"]
    argv = ["explain", *map(str, images), "--model", f"hf:{folder}", "--device", "cpu", "--method", ",".join(methods)]
    assert main([*argv, "--checkpoint", str(pruned_weights), "--output", str(tmp_path / "pruned")]) == 0
    printed = capsys.readouterr().out
    assert "shorter side resized to 32 px (bilinear), centre 32x32 crop" in printed
    assert "mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5) (no image processor saved: defaults)" in printed

    pruned = tiny_vit()
    prune_heads(pruned, REMOVED)
    inputs = reference_inputs(images, 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
    assert_maps_equal(tmp_path / "pruned", pruned, inputs, methods)
    with np.load(tmp_path / "pruned" / "maps.npz") as arrays:
        head_weights = arrays["head_weights_gmar_l1"]
        assert head_weights.shape == (2, 2, 4)
        assert np.isnan(head_weights[:, 0, [1, 3]]).all() and np.isnan(head_weights[:, 1, 2]).all()
        pruned_maps = arrays["maps_gmar_l1"]

    # The folder's own (unpruned) weights explain differently: the checkpoint, spec included, was what counted.
    assert main([*argv, "--output", str(tmp_path / "unpruned")]) == 0
    with np.load(tmp_path / "unpruned" / "maps.npz") as arrays:
        assert not np.allclose(arrays["maps_gmar_l1"], pruned_maps, atol=1e-3)
        assert not np.isnan(arrays["head_weights_gmar_l1"]).any()
    assert_maps_equal(tmp_path / "unpruned", tiny_vit(), inputs, methods)


@pytest.mark.parametrize("case", ["deit_with_teacher", "beit_rel_pos", "dinov2_registers"])
def test_pruned_weights_of_other_families_load_alike(case: str, images: list[Path], tmp_path: Path) -> None:
    model = test_pruning_hf.make(case)  # 3 layers of 4 heads, 5 classes, large weights
    model.save_pretrained(tmp_path / case)
    prune_heads(model, test_pruning_hf.KEEP)  # 2, 4 and 1 heads remain
    torch.save(model.state_dict(), tmp_path / "pruned.pth")
    output = tmp_path / "out"
    argv = ["explain", *map(str, images), "--model", f"hf:{tmp_path / case}", "--device", "cpu"]
    assert main([*argv, "--checkpoint", str(tmp_path / "pruned.pth"), "--output", str(output)]) == 0
    inputs = reference_inputs(images, 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
    assert_maps_equal(output, model, inputs, ["gmar_l1"])


def test_the_saved_image_processor_sets_the_input_recipe(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "deit_processor"
    tiny_vit(seed=3).save_pretrained(folder)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transformers.DeiTImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    ).save_pretrained(folder)  # bicubic, resize to 40 px and crop 32: crop_pct 0.8
    output = tmp_path / "out"
    assert (
        main(["explain", *map(str, images), "--model", f"hf:{folder}", "--device", "cpu", "--output", str(output)]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        "shorter side resized to 40 px (bicubic), centre 32x32 crop, normalised with mean (0.4, 0.5, 0.6) and std "
        "(0.2, 0.25, 0.3) (the saved image processor)"
    ) in printed
    assert_maps_equal(output, tiny_vit(seed=3), reference_inputs(images, 40, mean, std, "bicubic"), ["gmar_l1"])
    with np.load(output / "maps.npz") as arrays:
        # The 50 x 40 image becomes 50 x 40 (shorter side 40): the 32 px crop starts at column 9, row 4.
        np.testing.assert_allclose(arrays["crop_boxes"][0], [9, 4, 41, 36])

    # --mean, --std and --crop-pct still override the saved processor.
    overridden = ["--mean", "0", "0", "0", "--std", "1", "1", "1", "--crop-pct", "1"]
    argv = ["explain", str(images[0]), "--model", f"hf:{folder}", "--device", "cpu", *overridden]
    assert main([*argv, "--output", str(tmp_path / "overridden")]) == 0
    assert "resized to 32 px (bicubic), centre 32x32 crop, normalised with mean (0, 0, 0)" in capsys.readouterr().out
    reference = reference_inputs(images[:1], 32, (0.0,) * 3, (1.0,) * 3, "bicubic")
    assert_maps_equal(tmp_path / "overridden", tiny_vit(seed=3), reference, ["gmar_l1"])


@pytest.mark.integration
def test_lightning_checkpoint_of_a_pruned_wrapped_model_loads(images: list[Path], tmp_path: Path) -> None:
    module = HFViTModule()
    module.model.save_pretrained(tmp_path / "vit")  # the architecture, saved before pruning
    prune_heads(module.model, REMOVED)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=False, enable_checkpointing=False))
    trainer.fit(module, datamodule=tiny_data(num_train=16, num_val=8, batch_size=8))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")

    output = tmp_path / "out"
    argv = ["explain", *map(str, images), "--model", f"hf:{tmp_path / 'vit'}", "--device", "cpu"]
    assert main([*argv, "--checkpoint", str(tmp_path / "pruned.ckpt"), "--output", str(output)]) == 0
    inputs = reference_inputs(images, 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
    assert_maps_equal(output, module.model.eval(), inputs, ["gmar_l1"])


def test_partial_checkpoint_and_random_weights_keep_their_meaning(
    folder: Path, pruned_weights: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", str(images[0]), "--model", f"hf:{folder}", "--device", "cpu", "--num-classes", "3"]
    # The pruned checkpoint's 4-class head does not fit a 3-class model: refused, unless partial loading is asked for.
    assert main([*argv, "--checkpoint", str(pruned_weights), "--output", str(tmp_path / "strict")]) == 2
    assert "--partial-checkpoint" in capsys.readouterr().err
    partial = ["--checkpoint", str(pruned_weights), "--partial-checkpoint"]
    assert main([*argv, *partial, "--output", str(tmp_path / "partial")]) == 0
    with np.load(tmp_path / "partial" / "maps.npz") as arrays:
        assert np.isnan(arrays["head_weights_gmar_l1"][0, 0, [1, 3]]).all()  # pruned like the checkpoint

    config_only = tmp_path / "config_only"
    transformers.ViTConfig(**TINY).save_pretrained(config_only)
    assert main(["explain", str(images[0]), "--model", f"hf:{config_only}", "--output", str(tmp_path / "none")]) == 2
    assert "holds a config but no weights" in capsys.readouterr().err
    argv = ["explain", str(images[0]), "--model", f"hf:{config_only}", "--random-weights"]
    assert main([*argv, "--output", str(tmp_path / "random")]) == 0
    with np.load(tmp_path / "random" / "maps.npz") as arrays:
        assert arrays["maps_gmar_l1"].shape == (1, 32, 32)


def _error_cases(tmp_path: Path, folder: Path, pruned_weights: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    pruned_folder = tmp_path / "pruned_folder"
    model = tiny_vit()
    prune_heads(model, REMOVED)
    model.save_pretrained(pruned_folder)
    eight_heads = tiny_vit(num_attention_heads=8)
    prune_heads(eight_heads, {0: [5]})
    torch.save(eight_heads.state_dict(), tmp_path / "eight_heads.pth")
    deeper = tiny_vit(num_hidden_layers=3)
    prune_heads(deeper, {2: [0]})
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    convnext = tmp_path / "convnext"
    transformers.ConvNextConfig(hidden_sizes=[8] * 4, depths=[1] * 4, num_labels=3).save_pretrained(convnext)
    model_option = ["--model", f"hf:{folder}"]
    return {
        "missing folder": (["--model", f"hf:{tmp_path / 'missing'}"], "does not exist; pass a folder written by"),
        "folder without config": (["--model", f"hf:{empty}"], "holds no config.json; pass a folder written by"),
        "nothing after hf:": (["--model", "hf:"], "names no model; pass hf:<save_pretrained folder or hub id>"),
        "pruned save_pretrained folder": (
            ["--model", f"hf:{pruned_folder}"],
            "holds the weights of a pruned model (vit.encoder.layer.0.attention.kept_heads), which from_pretrained",
        ),
        "pruned from more heads": (
            [*model_option, "--checkpoint", str(tmp_path / "eight_heads.pth")],
            "does not fit this model: `state_dict` keeps heads [0, 1, 2, 3, 4, 6, 7] of 8 in layer",
        ),
        "pruned in a layer the model lacks": (
            [*model_option, "--checkpoint", str(tmp_path / "deeper.pth")],
            "was pruned from a model with attention layers this one lacks (['vit.layers.2.attention.kept_heads'])",
        ),
        "pretrained with hf": ([*model_option, "--pretrained"], "drop --pretrained"),
        "classes the saved weights lack": (
            [*model_option, "--num-classes", "3"],
            "the saved weights do not fit the config changed by --num-classes, --img-size or --model-kwargs "
            "({'num_labels': 3}); drop those options, or pass --checkpoint FILE or --random-weights.",
        ),
        "image smaller than a patch": (
            [*model_option, "--img-size", "4", "--random-weights"],
            "--img-size 4 is smaller than the model's 8-pixel patches; pass --img-size 8 or more.",
        ),
        "not a ViT": (
            ["--model", f"hf:{convnext}", "--random-weights"],
            "cannot be explained: it has no attention over tokens",
        ),
        "target beyond the config's labels": (
            [*model_option, "--target", "4"],
            "out of range for a model with 4 classes",
        ),
        "config override the architecture refuses": (
            [*model_option, "--model-kwargs", '{"patch_size": 0}', "--random-weights"],
            "cannot be built (integer division or modulo by zero); check --num-classes, --img-size and --model-kwargs.",
        ),
    }


ERROR_CASES = [
    "missing folder",
    "folder without config",
    "nothing after hf:",
    "pruned save_pretrained folder",
    "pruned from more heads",
    "pruned in a layer the model lacks",
    "pretrained with hf",
    "classes the saved weights lack",
    "image smaller than a patch",
    "not a ViT",
    "config override the architecture refuses",
    "target beyond the config's labels",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_hf_inputs_exit_with_one_line(
    case: str,
    folder: Path,
    pruned_weights: Path,
    images: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options, expected = _error_cases(tmp_path, folder, pruned_weights)[case]
    capsys.readouterr()
    assert main(["explain", str(images[0]), *options, "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gmar-lightning explain: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out" / "maps.npz").exists()


def test_a_hub_id_that_cannot_be_reached_is_one_line(images: list[Path]) -> None:
    # "owner/name" that is no local folder is a hub id; offline, the hub is not asked and loading fails at once.
    command = [sys.executable, "-m", "gmar_lightning.cli", "explain", str(images[0]), "--model", "hf:no-org/no-vit"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "gmar-lightning explain: error: --model hf:no-org/no-vit cannot be loaded ("
    )
    assert lines[0].endswith("; pass a folder written by save_pretrained, or a hub id where the hub is reachable.")


def test_hf_model_without_transformers_names_the_extra(
    folder: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import transformers` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["explain", str(images[0]), "--model", f"hf:{folder}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gmar-lightning explain: error: --model hf:{folder} needs transformers: pip install transformers (or pip "
        'install -e ".[hf]" in your gmar-lightning clone).'
    ]


@pytest.mark.integration
@pytest.mark.xdist_group("processes")  # one worker installs transformers 4.x (tests/conftest.py)
def test_under_transformers_4_the_folder_explains_and_pruned_weights_are_refused_in_one_line(
    folder: Path,
    pruned_weights: Path,
    images: list[Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    environment = test_hf.transformers_4_environment(request, tmp_path_factory)
    command = [sys.executable, "-m", "gmar_lightning.cli", "explain", str(images[0]), "--model", f"hf:{folder}"]
    command += ["--device", "cpu"]
    unpruned = subprocess.run(
        [*command, "--output", str(tmp_path / "unpruned")], capture_output=True, text=True, timeout=300, env=environment
    )
    assert unpruned.returncode == 0, unpruned.stderr[-2000:]
    with np.load(tmp_path / "unpruned" / "maps.npz") as arrays:  # the same model as under transformers 5
        inputs = reference_inputs(images[:1], 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
        np.testing.assert_allclose(arrays["maps_gmar_l1"], explain(tiny_vit(), inputs).maps.numpy(), atol=1e-5)
    pruned = subprocess.run(
        [*command, "--checkpoint", str(pruned_weights), "--output", str(tmp_path / "pruned")],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert pruned.returncode == 2
    assert pruned.stderr.strip().splitlines() == [
        f"gmar-lightning explain: error: `checkpoint` {str(pruned_weights)!r} was pruned from a model with attention "
        "layers this one lacks (['vit.layers.0.attention.kept_heads', 'vit.layers.1.attention.kept_heads']); build "
        "the architecture the weights were pruned from (transformers ViTs pruned under transformers 5 need "
        "transformers >= 5)."
    ]
    assert not (tmp_path / "pruned" / "maps.npz").exists()


def test_id2label_names_the_classes_and_placeholders_do_not(
    folder: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    named = tmp_path / "named"
    labels = {0: "tench", 1: "goldfish", 2: "shark", 3: "coffee"}
    tiny_vit(id2label=labels, label2id={name: index for index, name in labels.items()}).save_pretrained(named)
    output = tmp_path / "named_out"
    assert main(["explain", str(images[0]), "--model", f"hf:{named}", "--device", "cpu", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "Class names from the config's id2label: tench, goldfish, shark, coffee" in printed
    with np.load(output / "maps.npz") as arrays:
        assert arrays["class_names"].tolist() == list(labels.values())
        prediction = int(arrays["predictions"][0])
    assert f"wide.png: {labels[prediction]} (" in printed
    # transformers' placeholders (LABEL_0, ...) name nothing: the captions keep "class N".
    output = tmp_path / "placeholder_out"
    assert main(["explain", str(images[0]), "--model", f"hf:{folder}", "--device", "cpu", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "Class names from" not in printed and "wide.png: class " in printed
    with np.load(output / "maps.npz") as arrays:
        assert "class_names" not in arrays.files


def _new_family_models() -> dict[str, torch.nn.Module]:
    """Tiny CLIP and SigLIP classifiers and a Swin, each with large weights so their maps are not flat."""
    from tests import test_hf_families

    models = {
        "clip": test_hf_families.make_model("clip_classifier"),
        "siglip": test_hf_families.make_model("siglip_classifier"),
        "swin": test_hf_families.make_swin("swin"),
    }
    return {name: model.eval() for name, model in models.items()}


@pytest.mark.parametrize("name", ["clip", "siglip", "swin"])
def test_clip_siglip_and_swin_folders_explain_as_the_model_does(name: str, images: list[Path], tmp_path: Path) -> None:
    model = _new_family_models()[name]
    model.save_pretrained(tmp_path / name)
    methods = ["gmar_l1", "rollout"]
    argv = ["explain", *map(str, images), "--model", f"hf:{tmp_path / name}", "--device", "cpu"]
    assert main([*argv, "--method", ",".join(methods), "--output", str(tmp_path / "out")]) == 0
    assert_maps_equal(
        tmp_path / "out", model, reference_inputs(images, 32, (0.5,) * 3, (0.5,) * 3, "bilinear"), methods
    )


def test_an_image_size_override_reaches_the_vision_config_of_a_clip_classifier(
    images: list[Path], tmp_path: Path
) -> None:
    _new_family_models()["clip"].save_pretrained(tmp_path / "clip")
    argv = ["explain", str(images[0]), "--model", f"hf:{tmp_path / 'clip'}", "--device", "cpu", "--random-weights"]
    assert main([*argv, "--img-size", "48", "--output", str(tmp_path / "out")]) == 0
    with np.load(tmp_path / "out" / "maps.npz") as arrays:
        assert arrays["maps_gmar_l1"].shape == (1, 48, 48)
