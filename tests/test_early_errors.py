"""Errors come early, in one line that names the argument and the fix, and commands say what they do: the callback's
checks at ``setup``, a malicious ``hf:`` folder, ``demo --checkpoint last.ckpt``. Real fits and real CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning import GMARCallback
from gmar_lightning.heads.pruning import prune_heads
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def cli(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "gmar_lightning.cli", *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


DEMO = [
    "demo", "--max-train-images", "32", "--max-val-images", "16", "--batch-size", "16", "--img-size", "32",
    "--model-kwargs", '{"embed_dim": 32, "depth": 2}', "--num-probe", "4", "--no-progress-bar", "--logger", "csv",
]  # fmt: skip


def test_demo_checkpoint_of_its_own_run_resumes_it_and_says_so(tmp_path: Path) -> None:
    first = cli(*DEMO, "--epochs", "1", "--log-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "gmar_demo" / "version_0" / "checkpoints" / "last.ckpt"

    resumed = cli(*DEMO, "--epochs", "2", "--log-dir", str(tmp_path), "--checkpoint", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (line,) = [line for line in resumed.stdout.splitlines() if line.startswith("Resuming")]
    assert str(last) in line and "from epoch 1, step 2" in line and "version_1" in line, line
    trajectory = HeadTrajectory.load_npz(tmp_path / "gmar_demo" / "version_1" / "head_importance.npz")
    assert trajectory.epochs == [0, 1]  # the first run's evaluation came back with the checkpoint
    assert trajectory.steps == [1, 3]  # val_loss's logging steps, one less than the global steps 2 and 4

    weights = tmp_path / "weights.pth"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    torch.save({key.removeprefix("model."): value for key, value in state.items()}, weights)
    fresh = cli(*DEMO, "--epochs", "1", "--log-dir", str(tmp_path), "--checkpoint", str(weights))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert f"Starting from the weights in {weights} at epoch 0" in fresh.stdout


def test_a_malicious_hf_weights_file_is_refused_in_one_plain_line(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    folder = tmp_path / "evil"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, folder / "pytorch_model.bin")
    image = ROOT / "docs" / "images" / "overlay_gmar_l1.png"
    result = cli("explain", str(image), "--model", f"hf:{folder}", "--output", str(tmp_path / "out"))
    assert result.returncode != 0 and not marker.exists()
    (line,) = result.stderr.strip().splitlines()
    assert "holds pickled code (posix.system) in pytorch_model.bin, which was refused without running it" in line
    assert "trust" not in line and "weights_only" not in line and "\x1b" not in line


# ---------------------------------------------------------------------------------------------------------------
# GMARCallback: every check that can run before training does, in one line naming the argument
# ---------------------------------------------------------------------------------------------------------------


class OneChannelViT(TinyViTModule):
    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4, in_chans=1
        )


class HeadlessDictViT(TinyViTModule):
    """A backbone without a classifier under a separate head, whose forward returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, images: torch.Tensor) -> dict:  # type: ignore[override]
        return {"scores": self.head(self.vit(images))}


class FirstTrainingBatch(pl.Callback):
    """Records whether training ever started."""

    started = False

    def on_train_batch_start(self, *args: object) -> None:
        FirstTrainingBatch.started = True


@pytest.mark.parametrize(
    ("module", "options", "error", "message"),
    [
        (TinyViTModule, {"probe": [0, 100]}, ValueError, r"`probe` indices \[100\] are out of range .* 24 samples"),
        (TinyViTModule, {"model_getter": lambda module: None}, TypeError, r"`model_getter` returned NoneType"),
        (OneChannelViT, {"mean": (0.5,) * 3, "std": (0.2,) * 3}, ValueError, r"`mean` and `std` have 3 values .* 1-"),
        (HeadlessDictViT, {}, ValueError, r"^The model cannot be explained: .*dict"),
    ],
)
def test_the_callback_refuses_before_training_starts_in_one_line(
    tmp_path: Path, module: type, options: dict, error: type, message: str
) -> None:
    FirstTrainingBatch.started = False
    callback = GMARCallback(num_probe=4, on_error="raise", **options)
    trainer = pl.Trainer(
        callbacks=[callback, FirstTrainingBatch()], logger=False, **trainer_kwargs(tmp_path, max_epochs=1)
    )
    with pytest.raises(error, match=message) as raised:
        trainer.fit(module(), datamodule=tiny_data())
    assert not FirstTrainingBatch.started
    assert "\n" not in str(raised.value)


def test_a_model_without_any_head_left_is_named_as_such(tmp_path: Path) -> None:
    module = TinyViTModule()
    prune_heads(module.vit, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    # The materialised path: the recomputed one (the default) fails on a layer without heads before this point (a
    # ZeroDivisionError in recompute.query_rows, left to its owner).
    callback = GMARCallback(num_probe=4, on_error="raise", explain_options={"recompute_attention": False})
    trainer = pl.Trainer(callbacks=[callback], logger=False, **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match=r"the model has no attention head left \(every head was removed\)"):
        trainer.fit(module, datamodule=tiny_data())
