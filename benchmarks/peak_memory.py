"""Peak extra memory of one operation, shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

MMAP_THRESHOLD = "131072"
"""glibc's mmap threshold for children that measure memory: freed tensors then leave the resident set at once.

Only for memory: under it every block above 128 KiB is a fresh mapping whose pages fault in on first touch and leave
on free, which slows code that makes many short-lived blocks more than code that makes few large ones. On the CPU it
made a ViT-S/16 training step at 384 px, batch 4 about 20 % slower and ``explain(gmar_l1)`` about 40 % slower than
glibc's default, which raises its threshold as blocks are freed (``docs/performance.md``), so children that time run
under the allocator the benchmark was started with."""


def peak_bytes(op: Callable[[], object], device: torch.device) -> int:
    """Bytes the operation adds at its peak: CUDA's allocator peak, or on the CPU the process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    # Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, run the operation, read the new peak.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = resident_kib("VmHWM")
    op()
    return (resident_kib("VmHWM") - baseline) * 1024


def resident_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory on CPU needs Linux.")


def run_fresh(command: list[str], measures_memory: bool = True) -> dict:
    """Run a benchmark child in a fresh process and return the JSON of its last line: under ``MMAP_THRESHOLD`` when
    it ``measures_memory``, else under this process's own environment (a child that times)."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD} if measures_memory else None
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])
