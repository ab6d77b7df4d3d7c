"""Hugging Face transformers ViTs with zero user code: every supported class against a full-matrix reference, model
state restored, wrappers, refusals, import without transformers, and the same tests under transformers 4.x.

The reference reads the attention the way transformers documents it (``output_attentions=True`` on an eager copy of
the model) and states each class's token layout by hand, so it shares nothing with ``gmar_lightning.families.hf``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import VisionTransformer
from torch import nn

transformers = pytest.importorskip("transformers")

from gmar_lightning import METHODS, GMARCallback, explain  # noqa: E402
from gmar_lightning.families import UnsupportedModelError  # noqa: E402
from tests.lightning_helpers import ClassifierModule, tiny_data, trainer_kwargs  # noqa: E402
from tests.reference import capture_full, reference_from_attention  # noqa: E402

TRANSFORMERS_4 = "4.57.6"  # the last 4.x release; CI runs this module again under it
TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 5,
}
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
GRID = (4, 4)
ATOL = 1e-5


def patch_mean_and(tokens: list[int], num_prefix: int, weight: float = 0.5) -> torch.Tensor:
    """A read-out weight vector: ``weight`` on the mean of ``tokens``, the rest on the mean of the patch tokens."""
    vector = torch.zeros(num_prefix + GRID[0] * GRID[1])
    vector[tokens] = weight / len(tokens)
    vector[num_prefix:] += (1 - weight) / (GRID[0] * GRID[1])
    return vector


def timm_wrapper() -> nn.Module:
    config = transformers.TimmWrapperConfig(
        architecture="vit_tiny_patch16_224",
        num_labels=5,
        model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4},
    )
    return transformers.TimmWrapperForImageClassification(config)


# name -> (model factory, prefix tokens, read-out: tokens averaged, None for the patch mean, or a weight vector)
CASES: dict[str, tuple[Callable[[], nn.Module], int, list[int] | torch.Tensor | None]] = {
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)), 1, [0]),
    "deit": (lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**TINY)), 2, [0]),
    "deit_with_teacher": (
        lambda: transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY)),
        2,
        [0, 1],
    ),
    "beit_mean_pooling": (
        lambda: transformers.BeitForImageClassification(
            transformers.BeitConfig(use_relative_position_bias=True, use_mean_pooling=True, **TINY)
        ),
        1,
        None,
    ),
    "beit_class_token": (
        lambda: transformers.BeitForImageClassification(
            transformers.BeitConfig(use_absolute_position_embeddings=True, use_mean_pooling=False, **TINY)
        ),
        1,
        [0],
    ),
    "dinov2": (
        lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**TINY)),
        1,
        patch_mean_and([0], 1),
    ),
    "dinov2_registers": (
        lambda: transformers.Dinov2WithRegistersForImageClassification(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **TINY)
        ),
        3,
        patch_mean_and([0], 3),
    ),
    "timm_wrapper": (timm_wrapper, 1, [0]),
}


def sharpen(model: nn.Module) -> nn.Module:
    """Large random weights, tokens and position tables: peaked attention, so maps differ across tokens and read-outs
    (transformers initialises the class and distillation tokens to zeros, which would make them indistinguishable)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 or "token" in name or "position" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def make_model(case: str) -> nn.Module:
    torch.manual_seed(0)
    return sharpen(CASES[case][0]()).eval()


def make_images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_attention(model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None) -> tuple:
    """Attention and gradients through transformers' own ``output_attentions`` on an eager copy of the model."""
    if type(model).__name__ == "TimmWrapperForImageClassification":
        attentions, grads, _, _ = capture_full(model.timm_model, images, target)
        return attentions, grads
    reference = copy.deepcopy(model).eval()
    reference.config._attn_implementation = "eager"
    with torch.enable_grad():
        output = reference(pixel_values=images.clone(), output_attentions=True)
        targets = output.logits.argmax(-1) if target is None else target
        objective = output.logits[torch.arange(len(targets)), targets].sum()
        grads = torch.autograd.grad(objective, output.attentions)
    return [a.detach() for a in output.attentions], list(grads)


def reference_maps(case: str, model: nn.Module, images: torch.Tensor, method: str, **options) -> tuple:
    _, num_prefix, readout = CASES[case]
    attentions, grads = reference_attention(model, images, options.pop("target", None))
    return reference_from_attention(
        attentions, grads, method, num_prefix=num_prefix, readout=readout, grid=GRID, **options
    )


def model_state(model: nn.Module) -> dict:
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "output_attentions")]
    return {
        "implementations": [getattr(c, "_attn_implementation", None) for c in configs],
        "output_attentions": [c.output_attentions for c in configs],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "capture_hooks_installed": [getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()],
    }


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_matrix_reference(case: str, method: str, device: torch.device) -> None:
    model, images = make_model(case).to(device), make_images().to(device)
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_maps(case, model, images, method)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(result.logits, model(images).logits, rtol=1e-5, atol=1e-5)
    if method.startswith("gmar"):
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
        assert result.head_weights.shape == (3, 2, 4)


@pytest.mark.parametrize("case", ["deit_with_teacher", "dinov2_registers", "beit_mean_pooling"])
def test_reference_tells_read_outs_apart(case: str) -> None:
    """The comparison above can fail: the class-token read-out alone gives a clearly different map."""
    model, images = make_model(case), make_images()
    attentions, grads = reference_attention(model, images)
    wrong, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=CASES[case][1], readout=[0], grid=GRID)
    right, _ = reference_maps(case, model, images, "gmar_l1")
    assert (wrong - right).abs().max() > 100 * ATOL


@pytest.mark.parametrize("options", [{"head_norm": "global", "discard_ratio": 0.3, "start_layer": 1}, {"target": 2}])
def test_options_match_reference(options: dict) -> None:
    model, images = make_model("dinov2_registers"), make_images()
    result = explain(model, images, **options)
    reference_options = {**options, "target": torch.tensor([2, 2, 2])} if "target" in options else options
    expected_maps, expected_weights = reference_maps("dinov2_registers", model, images, "gmar_l1", **reference_options)
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("case", ["vit", "beit_class_token", "dinov2"])
def test_batched_equals_per_image(case: str) -> None:
    model, images = make_model(case), make_images(batch=3)
    batched = explain(model, images)
    singles = torch.cat([explain(model, images[i : i + 1]).token_maps for i in range(3)])
    torch.testing.assert_close(batched.token_maps, singles, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["gmar_l2", "rollout"])
def test_attention_implementation_and_state_restored(method: str) -> None:
    model = make_model("vit").train()
    model.classifier.requires_grad_(False)
    before = model_state(model)
    assert before["implementations"][0] != "eager"  # the test is void if the model were eager already
    explain(model, make_images(), method=method)
    assert model_state(model) == before


def test_state_restored_when_the_call_raises() -> None:
    model = make_model("beit_mean_pooling").train()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"`target` .* out of range .* 5 classes"):
        explain(model, make_images(), target=7)
    assert model_state(model) == before


class Backbone(nn.Module):
    """A transformers ViT backbone nested as ``self.backbone`` with a separate head reading its class token."""

    def __init__(self, vit: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = vit
        self.head = nn.Linear(vit.config.hidden_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=images).last_hidden_state[:, 0])


def test_bare_backbone_with_separate_head_takes_logits_from_the_whole_model() -> None:
    torch.manual_seed(0)
    model = Backbone(transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)).eval()
    images = make_images()
    result = explain(model, images)
    torch.testing.assert_close(result.logits, model(images), rtol=1e-5, atol=1e-5)
    reference = copy.deepcopy(model)
    reference.backbone.config._attn_implementation = "eager"
    with torch.enable_grad():
        output = reference.backbone(pixel_values=images, output_attentions=True)
        logits = reference.head(output.last_hidden_state[:, 0])
        objective = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        grads = list(torch.autograd.grad(objective, output.attentions))
    attentions = [a.detach() for a in output.attentions]
    expected, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=1, readout=[0], grid=GRID)
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)


def test_classifier_inside_a_module_is_explained_as_itself() -> None:
    model = make_model("deit_with_teacher")
    holder = nn.Sequential(model)
    images = make_images()
    direct, wrapped = explain(model, images), explain(holder, images)
    torch.testing.assert_close(wrapped.token_maps, direct.token_maps, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: transformers.ViTModel(transformers.ViTConfig(**TINY)), r"`model` \(ViTModel\) is a transformers"),
        (
            lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY, "num_labels": 0})),
            r"num_labels=0.*not class logits",
        ),
        (lambda: VisionTransformer(num_classes=0, **TIMM_TINY), r"num_classes=0.*not class logits"),
    ],
    ids=["bare_backbone", "num_labels_0", "timm_num_classes_0"],
)
def test_headless_models_are_refused(make: Callable[[], nn.Module], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as error:
        explain(make().eval(), make_images())
    assert "\n" not in str(error.value)


class PassThrough(nn.Module):
    """Returns its headless backbone's output as if it were logits."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.backbone(images)
        return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY, "num_labels": 0})),
        lambda: VisionTransformer(num_classes=0, **TIMM_TINY),
    ],
    ids=["transformers", "timm"],
)
def test_wrapper_returning_a_headless_vits_features_is_refused(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"`model` \(PassThrough\) returns the pooled features of its ViT"):
        explain(PassThrough(make()).eval(), make_images())


class TimmBackboneWithHead(nn.Module):
    """A timm ViT with ``num_classes=0`` as ``self.backbone`` and a separate classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VisionTransformer(num_classes=0, **TIMM_TINY)
        self.head = nn.Linear(TIMM_TINY["embed_dim"], 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def test_headless_timm_backbone_with_separate_head_is_explained_through_the_head() -> None:
    torch.manual_seed(0)
    model, images = sharpen(TimmBackboneWithHead()).eval(), make_images()
    result = explain(model, images)
    torch.testing.assert_close(result.logits, model(images), rtol=1e-5, atol=1e-5)
    assert result.logits.shape == (3, 3)  # classes, not the backbone's 32 embedding dimensions
    attentions, grads, _, _ = capture_full(model, images)  # the reference differentiates the whole model's logits
    expected, _ = reference_from_attention(attentions, grads, "gmar_l1", num_prefix=1, readout=[0], grid=GRID)
    torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=ATOL)


class TeacherStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = VisionTransformer(num_classes=3, **TIMM_TINY)
        self.student = VisionTransformer(num_classes=3, **{**TIMM_TINY, "depth": 1})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


def test_several_vits_warn_with_their_names_and_vit_chooses() -> None:
    torch.manual_seed(0)
    model, images = TeacherStudent().eval(), make_images()
    with (
        pytest.warns(UserWarning, match=r"holds 2 ViTs: `teacher` .*`student` .*explaining `teacher`.*pass `vit=`"),
        pytest.raises(RuntimeError, match=r"forward does not run .*pass the ViT it classifies with as `vit=`"),
    ):
        explain(model, images, method="rollout")
    chosen = explain(model, images, vit=model.student)
    assert chosen.layer_names == ["blocks.0.attn"]
    torch.testing.assert_close(chosen.token_maps, explain(model.student, images).token_maps, rtol=0, atol=0)


def test_unsupported_transformers_model_is_refused_in_one_line() -> None:
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    pattern = r"`model` \(ConvNextForImageClassification\) cannot be explained: it has no attention over tokens"
    with pytest.raises(UnsupportedModelError, match=pattern) as error:
        explain(transformers.ConvNextForImageClassification(config).eval(), make_images())
    assert "\n" not in str(error.value) and "timm counterpart" not in str(error.value)


def test_transformers_is_optional(tmp_path: Path) -> None:
    """The core imports, and explains a timm ViT, with transformers unimportable. (Not the callback: Lightning's
    torchmetrics imports transformers itself whenever it is installed.)"""
    script = (  # a finder that says transformers is not installed, as find_spec-based checks (torchmetrics) see it
        "import sys\n"
        "class NoTransformers:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoTransformers())\n"
        "import torch, gmar_lightning, gmar_lightning.engine, gmar_lightning.families.hf\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)\n"
        "print(gmar_lightning.explain(vit, torch.randn(1, 3, 32, 32)).token_maps.shape)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 4])" in result.stdout


def transformers_4_environment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment variables under which a subprocess imports the last transformers 4.x (pure Python, installed once
    into a cached folder) and this repository; skips the test when the package registry cannot be reached."""
    folder = f"transformers-{TRANSFORMERS_4}"
    # `-p no:cacheprovider` (benchmarks/gpu_check.sh) leaves no cache: install into this session's temporary folder,
    # once for both tests that use it (pytest-xdist runs them in one worker, whose own folder it is).
    cache = getattr(request.config, "cache", None)
    target = cache.mkdir(folder) if cache is not None else tmp_path_factory.getbasetemp() / folder
    if not (target / "transformers").is_dir():
        # tokenizers and huggingface_hub are pinned too: transformers 4.x checks their versions on import.
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
             f"transformers=={TRANSFORMERS_4}", "huggingface_hub<1.0", "tokenizers>=0.22,<=0.23.0"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.skip(
                f"cannot install transformers {TRANSFORMERS_4} (registry unreachable?): {install.stderr[-300:]}"
            )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(Path(__file__).parents[1])])}
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert version.stdout.strip() == TRANSFORMERS_4, version.stderr[-2000:]
    return environment


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="this is the run under transformers 4.x")
@pytest.mark.xdist_group("processes")  # one worker installs transformers 4.x (tests/conftest.py)
def test_same_tests_pass_under_transformers_4(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Install the last transformers 4.x into a cached folder and run this module under it."""
    environment = transformers_4_environment(request, tmp_path_factory)
    # -n 0: one process, as this test already runs in a pytest-xdist worker beside another.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", __file__],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout


class HFViTModule(ClassifierModule):
    """A LightningModule fine-tuning a transformers ViT, as users write it: the callback needs no extra code."""

    def __init__(self) -> None:
        super().__init__()
        self.model = transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY, "num_labels": 4}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


@pytest.mark.integration
def test_fit_with_callback_logs_maps_and_head_weights_to_tensorboard(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = HFViTModule()
    implementation = module.model.config._attn_implementation
    callback = GMARCallback(num_probe=4, methods=("gmar_l1", "rollout"), metrics=("deletion_auc",))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, datamodule=tiny_data())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    # The callback logs at Lightning's validation logging step: one less than the global step after each epoch.
    expected_steps = [trainer.num_training_batches * epoch - 1 for epoch in (1, 2)]
    for tag in ("gmar/overlay/gmar_l1", "gmar/overlay/rollout", "gmar/head_importance"):
        assert [event.step for event in events.Images(tag)] == expected_steps, tag
    for layer in ("00", "01"):
        assert [event.step for event in events.Histograms(f"gmar/head_weights/layer_{layer}")] == expected_steps
    assert [event.step for event in events.Scalars("gmar/metrics/gmar_l1/deletion_auc")] == expected_steps
    assert callback.trajectory.weights.shape == (2, 2, 4)
    torch.testing.assert_close(callback.trajectory.weights.sum(-1), torch.ones(2, 2))
    assert module.model.config._attn_implementation == implementation
