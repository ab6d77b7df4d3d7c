"""Peak extra memory of one operation, shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


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
