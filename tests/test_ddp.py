"""Real DDP with 2 CPU processes (gloo): rank 0 explains without collectives and nothing hangs or desynchronises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.lightning_helpers import tiny_data

# Two real DDP processes.
pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("ddp_script.py")


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent), "OMP_WAIT_POLICY": "PASSIVE"}
    # Its own session, so a hang can be killed with every rank Lightning launched, not just the first.
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("DDP fit did not finish within 300 s: a rank is hanging") from None
    assert process.returncode == 0, stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["world_size"] == rank1["world_size"] == 2
    # Only rank 0 explains and keeps a trajectory; the other rank never took a probe.
    assert rank0["trajectory_epochs"] == [0, 1] and rank0["has_probe"]
    assert rank1["trajectory_epochs"] == [] and not rank1["has_probe"]
    # The probe is the first samples of the validation set, as on one device, not rank 0's shard (0, 2, 4, ...).
    first_samples = torch.stack([tiny_data(num_train=64, num_val=32, batch_size=8).val_dataset[i][0] for i in range(4)])
    assert torch.tensor(rank0["probe_images"]).equal(first_samples.double().flatten())
    # Both ranks end with the same weights: no desynchronisation.
    assert rank0["weights_sum"] == rank1["weights_sum"]
    assert rank0["weights_abs_sum"] == rank1["weights_abs_sum"]
    events = EventAccumulator(rank0["log_dir"], size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    assert len(events.Images("gmar/overlay/gmar_l1")) == 2
    assert len(events.Histograms("gmar/head_weights/layer_00")) == 2
    assert (Path(rank0["log_dir"]) / "head_importance.npz").exists()
