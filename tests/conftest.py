"""Test-session setup shared by every test module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

# OpenMP's default spin-waiting costs ~8 ms per parallel op on small shared VMs; passive waiting halves the suite's
# time there and changes no result. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing in the tests may reach a W&B server.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The real ``wandb`` in offline mode with every directory under ``tmp_path``; runs are flushed on teardown."""
    wandb = pytest.importorskip("wandb")
    for variable, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(variable, value)
    wandb.finish()  # a run left open elsewhere would be reused by the next WandbLogger
    yield wandb
    wandb.finish()
    # `finish` can return before the wandb-core service has flushed the offline transaction log; tearing the service
    # down waits for it (the next `wandb.init` starts a fresh one).
    wandb.teardown()
