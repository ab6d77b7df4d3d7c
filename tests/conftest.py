"""Test-session setup shared by every test module."""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs ~8 ms per parallel op on small shared VMs; passive waiting halves the suite's
# time there and changes no result. libgomp reads it once, when torch loads, so it must come before `import torch`
# (set after it, it had no effect: the --quick evaluation test took 230 s instead of about 40 s under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Nothing in the tests may reach a W&B server.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the engine tests run: ``GMAR_TEST_DEVICE`` (``cpu`` by default; ``cuda`` on a GPU machine)."""
    device = torch.device(os.environ.get("GMAR_TEST_DEVICE", "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("GMAR_TEST_DEVICE=cuda but torch sees no CUDA device; unset it to test on CPU.")
        # The tests compare to 1e-5; TF32 convolutions would add their own rounding to one side of a comparison.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


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


@pytest.fixture
def rank_zero_notices() -> Iterator[list[str]]:
    """Messages Lightning's ``rank_zero_info`` emits (its logger does not propagate to the root logger)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
