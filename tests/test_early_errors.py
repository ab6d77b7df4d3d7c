"""Errors come early, in one line that names the argument and the fix, and commands say what they do: the callback's
checks at ``setup``, a malicious ``hf:`` folder, ``demo --checkpoint last.ckpt``. Real fits and real CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmar_lightning.trajectory import HeadTrajectory

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
    assert trajectory.steps == [2, 4]

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
    image = ROOT / "docs" / "images" / "overlay_rollout.png"
    result = cli("explain", str(image), "--model", f"hf:{folder}", "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and not marker.exists()
    (line,) = result.stderr.strip().splitlines()
    assert "holds pickled code (posix.system) in pytorch_model.bin, which was refused without running it" in line
    assert "trust" not in line and "weights_only" not in line and "\x1b" not in line
