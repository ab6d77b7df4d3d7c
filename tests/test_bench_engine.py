"""``benchmarks/bench_engine.py``: which operations it times and how it reports a ratio it cannot measure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from tests.scripts import benchmark_script


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_script("bench_engine") as module:
        yield module


def test_the_per_image_loop_is_timed_beside_its_own_batched_method_when_others_are_asked(bench: ModuleType) -> None:
    model, images = torch.nn.Linear(1, 1), torch.zeros(2, 1)
    ops = bench.operations(model, images, torch.zeros(2, dtype=torch.long), ["rollout"], loop=True)
    assert list(ops) == ["train_step", "floor", "rollout", bench.LOOP_METHOD, "per_image_loop", "callback_pair"]
    assert list(bench.operations(model, images, images, ["rollout"], loop=False)) == ["train_step", "rollout"]
    times = {"train_step": 2.0, "floor": 1.5, "rollout": 1.0, bench.LOOP_METHOD: 1.0, "per_image_loop": 3.0}
    case = {"times": {**times, "callback_pair": 1.2}, "peaks": {"train_step": 0, "rollout": 5}}
    rows = {label: value for label, value, _, _ in bench.ratios_of(case, "cpu")}
    # Only the asked method gets rows; a training step that added nothing to the peak leaves that ratio unmeasured.
    assert rows == {
        "rollout time / train step": 0.5,
        "rollout peak / train-step peak": None,
        "floor time / train step": 0.75,
        "callback_pair time / train step": 0.6,
        f"per-image loop / batched ({bench.LOOP_METHOD})": 3.0,
    }


def test_times_run_under_the_allocator_it_was_started_with_and_peaks_under_the_fixed_mmap_threshold(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed 128 KiB mmap threshold makes every large block a fresh mapping, which slows explain's short-lived row
    # blocks more than the training step: it serves the memory measurement only.
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    child = [sys.executable, "-c", "import json, os; print(json.dumps(os.environ.get('MALLOC_MMAP_THRESHOLD_')))"]
    assert bench.run_fresh(child, measures_memory=True) == bench.MMAP_THRESHOLD
    assert bench.run_fresh(child, measures_memory=False) is None
    args = argparse.Namespace(model="vit_tiny_patch16_224", device="cpu", repeats=1, methods=["rollout"])
    case = bench.measure_case(args, 32, 1)
    assert case["mmap_threshold"] is None
    assert set(case["peaks"]) == {"train_step", "rollout"}
    timed = {"train_step", "floor", "rollout", bench.LOOP_METHOD, "per_image_loop", "callback_pair"}
    assert set(case["times"]) == timed
