"""Test-session setup shared by every test module."""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs ~8 ms per parallel op on small shared VMs; passive waiting halves the suite's
# time there and changes no result. libgomp reads it once, when torch loads, so it must come before `import torch`
# (set after it, it had no effect: the --quick evaluation test took 230 s instead of about 40 s under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pytest-xdist workers (pyproject's addopts: `-n auto`) share the CPUs: each takes its share of threads, but at least 2
# (on 2 cores, 2 workers of 2 threads ran a third of the suite as fast as, or faster than, 2 workers of 1 thread). Set
# before `import torch`, so the subprocesses that tests start inherit it too.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(2, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Nothing in the tests may reach a W&B server.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# `--dist loadgroup` (pyproject's addopts) sends every test marked `xdist_group("processes")` to one worker, in turn:
# the tests that start several processes (DDP and torchrun ranks, a TensorBoard server with headless Chromium, a pip
# install of transformers 4.x into the one cache folder both of its tests use) never run beside each other.


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject's addopts): for a bare ``pytest``, which runs the testpaths, one worker per 2 CPUs, at
    least 2 and at most 8; for tests named on the command line (``pytest tests/test_x.py -k y``), none: they run in
    this process, without the workers' start-up (about 6 s on 2 cores). ``-n 2`` asks for workers there;
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides both.

    The tests' tensors are tiny, so threads beyond 2 per process add little; 2 workers on a 2-core machine also let
    one test's subprocess start-up or I/O overlap with another's compute.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return 0
    return min(8, max(2, (os.cpu_count() or 1) // 2))


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
