"""The engine on an FSDP2-sharded ViT (``fully_shard``) over 2 CPU processes with gloo, launched by torchrun: every
rank explains the same batch in lockstep and gets exactly the unsharded model's maps, logits and head weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("fsdp_script.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_sharded_engine_equals_unsharded(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port())]
    process = subprocess.Popen(
        [*command, str(SCRIPT), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hanging rank is killed with its whole session
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("the sharded explanation did not finish within 300 s: a rank is hanging") from None
    assert process.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["gathered"] == []  # explain left every parameter sharded
        assert report["local"] < report["full"]
        assert len(report["differences"]) == 15  # 5 methods x 3 option sets
        for case, difference in report["differences"].items():
            assert difference["maps"] == difference["logits"] == 0.0, case
            assert difference["weights"] in (None, 0.0), case
