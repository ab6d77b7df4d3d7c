"""Loading the repository's scripts (benchmarks/, examples/), which are not packages, from their paths, and running
the tests' multi-process scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at ``path`` as module ``name`` (also registered in ``sys.modules``).

    Registering it lets dataclasses resolve their annotations through ``sys.modules``, and lets a script import its
    siblings' names once it has put its own folder on ``sys.path``.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` loaded as module ``name``, with ``benchmarks/`` on ``sys.path`` for the ``with`` block
    (the benchmarks import their sibling ``peak_memory.py``)."""
    folder = str(ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield load_script(ROOT / "benchmarks" / f"{name}.py", name)
    finally:
        sys.path.remove(folder)


def run_ranks_script(command: list[str], what: str, timeout: float = 300) -> None:
    """Run a multi-process (DDP, torchrun) test script to its end, with the repository on ``PYTHONPATH``.

    The script runs in its own session, so a hanging rank is killed together with every process it launched, and the
    test fails with ``what`` instead of waiting forever; a failing script fails the test with the end of its stderr.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s: a rank is hanging") from None
    assert process.returncode == 0, stderr[-3000:]
