"""The engine on an FSDP2-sharded ViT (``fully_shard``) over 2 CPU processes with gloo, launched by torchrun: every
rank explains the same batch in lockstep and gets exactly the unsharded model's maps, logits and head weights."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from tests.scripts import run_ranks_script

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("processes")]

SCRIPT = Path(__file__).with_name("fsdp_script.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_sharded_engine_equals_unsharded(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), str(SCRIPT), str(tmp_path)]
    run_ranks_script(command, "the sharded explanation")
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["gathered"] == []  # explain left every parameter sharded
        assert report["local"] < report["full"]
        assert len(report["differences"]) == 15  # 5 methods x 3 option sets
        for case, difference in report["differences"].items():
            assert difference["maps"] == difference["logits"] == 0.0, case
            assert difference["weights"] in (None, 0.0), case
