"""`gmar-lightning explain` on models without a classifier: image-text folders (transformers CLIP and SigLIP, open_clip
``local-dir:``) zero-shot from ``--labels``, backbones (DINOv3, CLIP and SigLIP vision models) under ``--head FILE``,
and the one-line refusals.

Every reference is the model's own forward: ``logits_per_image`` of the transformers model, ``model(image, text)`` of
open_clip, and the test's own linear head on ``pooler_output``; the inputs are made with torchvision. Nothing here uses
the package's loading or logits code, except where a test checks that code against those references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("the image towers of transformers 4 image-text models are no PreTrainedModel", allow_module_level=True)

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

from gmar_lightning import explain  # noqa: E402
from gmar_lightning.classifiers import hf_zero_shot, open_clip_zero_shot  # noqa: E402
from gmar_lightning.cli import main  # noqa: E402
from tests.test_cli_hf import reference_inputs  # noqa: E402  (torchvision: shorter side, centre crop, normalise)
from tests.test_hf import sharpen  # noqa: E402

LABELS = ["cat", "dog", "bird"]
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "this", "is", ".", *LABELS]
TEXT = {
    "vocab_size": len(WORDS),
    "hidden_size": 32,  # SigLIP compares text and image embeddings without projections
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 12,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
HALF = (0.5, 0.5, 0.5)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the prompts' words that adds [BOS] and [EOS], as CLIP's tokenizer does."""
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def image_text_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)
        model = transformers.CLIPModel(config)
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT))
        with torch.no_grad():  # SigLIP initialises its bias to 0: make it count, as a trained model's does
            model.logit_bias.fill_(-3.0)
    sharpen(model.vision_model)  # peaked attention, so that maps differ clearly across tokens
    return model.eval()


class OwnLogits(nn.Module):
    """The image-text model's own ``logits_per_image`` for fixed prompt tokens."""

    def __init__(self, model: nn.Module, tokens: dict[str, Tensor]) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images, **self.tokens).logits_per_image


def prompt_tokens(prompts: list[str]) -> dict[str, Tensor]:
    """The prompts tokenised as SigLIP was trained (and CLIP is unaffected): padded to the text model's length."""
    tokens = tiny_tokenizer()(prompts, padding="max_length", max_length=12, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    paths = [folder / "wide.png", folder / "tall.png"]
    Image.fromarray(generator.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(generator.integers(0, 256, (48, 36, 3), dtype=np.uint8)).save(paths[1])
    return paths


def assert_maps(output: Path, reference: nn.Module, inputs: Tensor, methods: list[str]) -> None:
    """maps.npz holds what ``explain`` gives on the reference module, and its predictions and probabilities."""
    with torch.no_grad():
        probabilities = reference(inputs).softmax(-1)
    with np.load(output / "maps.npz") as arrays:
        np.testing.assert_array_equal(arrays["predictions"], probabilities.argmax(-1).numpy())
        np.testing.assert_allclose(arrays["probabilities"], probabilities.max(-1).values.numpy(), atol=1e-5)
        for method in methods:
            expected = explain(reference, inputs, method=method)
            np.testing.assert_allclose(arrays[f"maps_{method}"], expected.maps.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_an_image_text_folder_is_explained_zero_shot_through_its_own_logits(
    kind: str, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = image_text_model(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    methods = ["gmar_l1", "rollout"]
    argv = ["explain", *map(str, images), "--model", f"hf:{folder}", "--device", "cpu", "--labels", ",".join(LABELS)]
    prompt = "this is a {}."
    assert main([*argv, "--prompt", prompt, "--method", ",".join(methods), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "(no image processor saved: defaults)" in printed and "wide.png: " in printed

    inputs = reference_inputs(images, 32, HALF, HALF, "bilinear")
    own = OwnLogits(model, prompt_tokens([prompt.format(label) for label in LABELS]))
    assert_maps(tmp_path / "out", own, inputs, methods)
    with np.load(tmp_path / "out" / "maps.npz") as arrays:
        assert arrays["class_names"].tolist() == LABELS

    # The zero-shot module the command builds gives the model's own logits (SigLIP: with its bias).
    classifier = hf_zero_shot(model, tiny_tokenizer(), LABELS, prompt)
    with torch.no_grad():
        torch.testing.assert_close(classifier(inputs), own(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(num_register_tokens=2, **VISION)),
        lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
        lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),  # its attention-pool head
    ],
    ids=["dinov3", "clip_vision", "siglip_vision"],
)
def test_a_backbone_folder_is_explained_under_a_head_file_on_its_pooled_output(
    backbone: object, images: list[Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = sharpen(backbone()).eval()
    model.save_pretrained(tmp_path / "backbone")
    head = nn.Linear(32, 3)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    argv = ["explain", *map(str, images), "--model", f"hf:{tmp_path / 'backbone'}", "--device", "cpu"]
    argv += ["--head", str(tmp_path / "head.pth"), "--method", "gmar_l1,rollout"]
    named = isinstance(model, transformers.CLIPVisionModel)  # the others' captions say "class <index>"
    assert main([*argv, *(["--labels", ",".join(LABELS)] if named else []), "--output", str(tmp_path / "out")]) == 0
    with np.load(tmp_path / "out" / "maps.npz") as arrays:
        assert arrays["class_names"].tolist() == LABELS if named else "class_names" not in arrays.files

    class Headed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = model, head

        def forward(self, pixels: Tensor) -> Tensor:
            return self.head(self.backbone(pixel_values=pixels).pooler_output)

    inputs = reference_inputs(images, 32, HALF, HALF, "bilinear")
    assert_maps(tmp_path / "out", Headed().eval(), inputs, ["gmar_l1", "rollout"])


def open_clip_folder(folder: Path) -> nn.Module:
    """A tiny open_clip CLIP saved the way open_clip's ``local-dir:`` loader reads it: open_clip_config.json
    (``model_cfg``, ``preprocess_cfg``) and open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "init_logit_bias": -3.0,  # a SigLIP-style bias, added to the scaled similarities
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    preprocess_cfg = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    sharpen(model.visual)
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )
    weights = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(weights, folder / "open_clip_model.safetensors")
    return model.eval()


def test_an_open_clip_local_dir_is_explained_zero_shot_through_its_own_logits(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    open_clip = pytest.importorskip("open_clip")
    model = open_clip_folder(tmp_path / "open_clip")
    name = f"local-dir:{tmp_path / 'open_clip'}"
    argv = ["explain", *map(str, images), "--model", name, "--device", "cpu", "--labels", ",".join(LABELS)]
    assert main([*argv, "--method", "gmar_l1,rollout", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (
        "shorter side resized to 32 px (bicubic), centre 32x32 crop, normalised with mean (0.4, 0.5, 0.6) and std "
        "(0.2, 0.25, 0.3) (the model's preprocess_cfg)"
    ) in printed

    tokens = open_clip.get_tokenizer(name)([f"a photo of a {label}." for label in LABELS])

    class OwnLogits(nn.Module):
        """open_clip's own forward for (image, text): normalised features, exp(logit_scale) and the bias."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: Tensor) -> Tensor:
            image_features, text_features, scale, bias = self.model(pixels, tokens)
            return scale * image_features @ text_features.T + bias

    inputs = reference_inputs(images, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic")
    assert_maps(tmp_path / "out", OwnLogits().eval(), inputs, ["gmar_l1", "rollout"])
    classifier = open_clip_zero_shot(model, open_clip.get_tokenizer(name), LABELS)
    with torch.no_grad():
        torch.testing.assert_close(classifier(inputs), OwnLogits()(inputs), rtol=1e-5, atol=1e-5)


def _refusal_folders(tmp_path: Path) -> dict[str, Path]:
    """A CLIPModel folder with and without its tokenizer, a ViTModel backbone, and a classifier whose saved weights
    lack its classifier (a ViTModel's weights under a config naming ViTForImageClassification)."""
    names = ("clip", "clip_no_tokenizer", "vit_backbone", "no_classifier", "vit_classifier")
    folders = {name: tmp_path / name for name in names}
    model = image_text_model("clip")
    model.save_pretrained(folders["clip"])
    tiny_tokenizer().save_pretrained(folders["clip"])
    model.save_pretrained(folders["clip_no_tokenizer"])
    for name in ("vit_backbone", "no_classifier"):
        transformers.ViTModel(transformers.ViTConfig(**VISION)).save_pretrained(folders[name])
    transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3, **VISION)).save_pretrained(
        folders["vit_classifier"]
    )
    config = json.loads((folders["no_classifier"] / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]
    (folders["no_classifier"] / "config.json").write_text(json.dumps(config))
    torch.save(nn.Linear(7, 3).state_dict(), tmp_path / "head_7.pth")
    torch.save(nn.Linear(32, 3).state_dict(), tmp_path / "head.pth")
    return folders


REFUSALS = {
    # A whole CLIPModel folder was loaded by AutoModelForImageClassification with a random classifier.
    "image-text model without labels": (
        ["--model", "hf:{clip}"],
        "holds CLIPModel, an image-text model whose class logits are zero-shot: pass --labels",
    ),
    "image-text model without tokenizer": (
        ["--model", "hf:{clip_no_tokenizer}", "--labels", "cat,dog"],
        "holds CLIPModel but no tokenizer (tokenizer_config.json or tokenizer.json); save the model's tokenizer",
    ),
    # A ViTModel folder was loaded as ViTForImageClassification with a random classifier.
    "backbone without head": (
        ["--model", "hf:{vit_backbone}"],
        "holds ViTModel, a backbone with neither a classifier nor a text tower, so it outputs features, not classes; "
        "pass --head FILE",
    ),
    "saved weights lacking the classifier": (
        ["--model", "hf:{no_classifier}"],
        "its saved weights lack 2 tensors of ViTForImageClassification (classifier.bias, classifier.weight), which "
        "would be random",
    ),
    "head of another width": (
        ["--model", "hf:{vit_backbone}", "--head", "{head_7}"],
        "--head's weight is [3, 7], but the model's pooled output has 32 features",
    ),
    "head on a classifier": (
        ["--model", "hf:{vit_classifier}", "--head", "{head}"],
        "holds ViTForImageClassification, which has its own classifier; drop --head.",
    ),
    "labels of another count": (
        ["--model", "hf:{vit_backbone}", "--head", "{head}", "--labels", "cat,dog"],
        "--labels names 2 classes but the model has 3",
    ),
    "class count beside labels": (
        ["--model", "hf:{clip}", "--labels", "cat,dog", "--num-classes", "3"],
        "--num-classes 3 differs from the 2 classes of --labels (or --class-names); drop --num-classes.",
    ),
    "prompt without a slot": (
        ["--model", "hf:{clip}", "--labels", "cat,dog", "--prompt", "a photo"],
        "--prompt 'a photo' must hold exactly one {}",
    ),
    "labels and class names": (
        ["--model", "hf:{clip}", "--labels", "cat,dog", "--class-names", "{head}"],
        "--labels and --class-names both name the classes; pass one of them.",
    ),
    "open_clip without labels": (["--model", "local-dir:{open_clip}"], "pass --labels"),
    "open_clip folder missing": (
        ["--model", "local-dir:{missing}", "--labels", "cat,dog"],
        "does not exist; pass local-dir:<folder> holding open_clip_config.json",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_models_without_class_logits_are_refused_in_one_line(
    case: str, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, expected = REFUSALS[case]
    paths = {name: str(path) for name, path in _refusal_folders(tmp_path).items()}
    paths.update(head=str(tmp_path / "head.pth"), head_7=str(tmp_path / "head_7.pth"), missing=str(tmp_path / "no"))
    if "{open_clip}" in " ".join(options):
        pytest.importorskip("open_clip")
        paths["open_clip"] = str(tmp_path / "open_clip")
        open_clip_folder(tmp_path / "open_clip")
    capsys.readouterr()
    argv = ["explain", str(images[0]), *(option.format(**paths) for option in options), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmar-lightning explain: error: "), lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "o" / "maps.npz").exists()


def test_an_open_clip_name_without_the_extra_names_it(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import open_clip` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert main(["explain", str(images[0]), "--model", f"local-dir:{tmp_path}", "--labels", "cat,dog"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gmar-lightning explain: error: --model local-dir:{tmp_path} names an open_clip model, which needs "
        'open_clip: pip install open_clip_torch (or pip install -e ".[open_clip]" in your gmar-lightning clone).'
    ]


def test_an_hf_hub_name_that_cannot_be_reached_is_one_line(images: list[Path]) -> None:
    pytest.importorskip("open_clip")
    name = "hf-hub:no-org/no-clip"
    command = [sys.executable, "-m", "gmar_lightning.cli", "explain", str(images[0]), "--model", name]
    result = subprocess.run(
        [*command, "--labels", "cat,dog"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"gmar-lightning explain: error: --model {name} cannot be loaded as an open_clip model ("
    )
    assert lines[0].endswith("or hf-hub: where the hub is reachable.")


def test_prompts_a_tokenizer_cannot_tell_apart_are_refused() -> None:
    # "cow" and "fox" are outside the tokenizer's words: both prompts become the same [UNK] tokens.
    with pytest.raises(ValueError, match="turns the prompts of 'cow' and 'fox' into the same tokens"):
        hf_zero_shot(image_text_model("clip"), tiny_tokenizer(), ["cat", "cow", "fox"])
