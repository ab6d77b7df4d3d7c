"""Speed and memory of ``explain`` against one plain training step, as ratios measured in one run.

For every image size and batch (default: ViT-S/16 shape, random init, 224, 384 and 518 px, batches 4 and 16) and every
method (``gmar_l1``, ``gmar_l2``, ``rollout``, ``grad_rollout``):

* ``explain`` time <= 1.0x one training step (forward + backward to parameters, fused attention); aim <= 0.75 for
  ``gmar_l2`` and ``rollout`` (on a GPU the target is 0.75 for every method);
* ``explain`` peak memory <= 1.0x the training step's;
* a per-image loop of ``explain(gmar_l1)`` is never faster than the batched call (loop / batched >= 1.0; >= 10 on a
  GPU).

Beside them, without a target, the floor: what every gradient method pays before it reduces anything, the forward
(fused attention) and the backward that stops at the first layer's attention output, parameters frozen; and the
callback's explanation: ``explain_many`` of its default pair, ``gmar_l1`` and ``grad_rollout``, from one pass.

Times are medians of interleaved repeats in one fresh process per size and batch, so a noisy machine slows every
operation alike; the load average is printed beside them, and each time ratio is also printed in the process's CPU time
(``time.process_time``, both threads), which other jobs on a shared machine disturb less than wall time (the targets
are on wall time). Peak memory is measured in a fresh process per operation:
on CUDA with ``torch.cuda.max_memory_allocated``, on CPU as the growth of the process's peak resident set (``VmHWM``,
reset with ``echo 5 > /proc/self/clear_refs`` just before) over the state with model and batch loaded, under a fixed
glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``) so that freed tensors leave the resident set at once. Times
are not taken under that threshold, which slows every operation and ``explain``'s many short-lived row blocks most
(``peak_memory.MMAP_THRESHOLD``): the timing process runs under the allocator this script was started with, glibc's
default unless you export ``MALLOC_MMAP_THRESHOLD_`` yourself, and prints which.

Run: ``python benchmarks/bench_engine.py`` (``--device cuda`` on a GPU; ``--model``, ``--sizes``, ``--batches``,
``--methods`` and ``--repeats`` to vary; ``--json PATH`` writes the numbers). On a small shared machine, run it at low
priority: ``setsid bash -c 'echo 19 > /proc/self/autogroup; exec python benchmarks/bench_engine.py'``.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs about 8 ms per parallel op on small shared VMs (2 vCPUs): that measures the
# VM, not the code, and halves the speed of both sides. Passive waiting is set before torch loads; override by
# exporting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from peak_memory import MMAP_THRESHOLD, peak_bytes, run_fresh
from timm.layers.attention import Attention

from gmar_lightning import explain, explain_many

METHODS = ("gmar_l1", "gmar_l2", "rollout", "grad_rollout")
LOOP_METHOD = "gmar_l1"
CALLBACK_PAIR = ("gmar_l1", "grad_rollout")
"""``GMARCallback``'s default methods, which it explains with one ``explain_many`` call per evaluation."""


def build(
    model_name: str, batch: int, image_size: int, device: str
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=image_size).to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    return model, images, labels


def operations(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, methods: list[str], loop: bool
) -> dict[str, Callable[[], None]]:
    def train_step() -> None:
        model.train()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def floor() -> None:
        # What every gradient method pays before reducing anything: the forward (fused attention) and the backward
        # that stops at the first layer's attention output, parameters frozen.
        flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        kept: list[torch.Tensor] = []
        first = next(module for module in model.modules() if isinstance(module, Attention))
        handle = first.proj.register_forward_pre_hook(lambda _module, inputs: kept.append(inputs[0]))
        try:
            model.eval()
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            logits = model(images.clone().requires_grad_())
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), kept[:1])
        finally:
            handle.remove()
            for parameter, requires_grad in flags:
                parameter.requires_grad_(requires_grad)

    ops: dict[str, Callable[[], None]] = {"train_step": train_step}
    if loop:  # timed with the rest (not a memory case)
        ops["floor"] = floor
    # The loop is compared with the batched call of its own method, timed beside it even when not asked for.
    for method in dict.fromkeys([*methods, LOOP_METHOD] if loop else methods):
        ops[method] = lambda method=method: explain(model, images, method=method)

    def explain_loop() -> None:
        for index in range(images.shape[0]):
            explain(model, images[index : index + 1], method=LOOP_METHOD)

    if loop:
        ops["per_image_loop"] = explain_loop
        ops["callback_pair"] = lambda: explain_many(model, images, CALLBACK_PAIR)
    return ops


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_operations(args: argparse.Namespace) -> dict[str, object]:
    """Medians of interleaved repeats of every operation (called in a fresh subprocess per size and batch)."""
    model, images, labels = build(args.model, args.batch, args.image_size, args.device)
    ops = operations(model, images, labels, args.methods, loop=True)
    load_before = os.getloadavg()[0]
    for name, op in ops.items():  # warm-up: allocator, kernels, lazy init (the loop's calls are warm by then)
        if name != "per_image_loop":
            op()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    cpu_samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.repeats):
        for name, op in ops.items():  # interleaved, so load changes hit every operation alike
            synchronize(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            op()
            synchronize(args.device)
            samples[name].append(time.perf_counter() - start)
            cpu_samples[name].append(time.process_time() - cpu_start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    cpu_times = {name: statistics.median(values) for name, values in cpu_samples.items()}
    return {
        "times": times,
        "cpu_times": cpu_times,
        "load": [load_before, os.getloadavg()[0]],
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def peak_memory_of(args: argparse.Namespace, name: str) -> int:
    """Run one operation in this process (called in a fresh subprocess) and return its peak extra bytes."""
    model, images, labels = build(args.model, args.batch, args.image_size, args.device)
    op = operations(model, images, labels, [name] if name in METHODS else [], loop=False)[name]
    return peak_bytes(op, torch.device(args.device))


def run_child(args: argparse.Namespace, size: int, batch: int, extra: list[str], measures_memory: bool) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--repeats", str(args.repeats)]
    command += ["--image-size", str(size), "--batch", str(batch), "--methods", *args.methods, *extra]
    return run_fresh(command, measures_memory)


def measure_case(args: argparse.Namespace, size: int, batch: int) -> dict:
    timing = run_child(args, size, batch, ["--time-case"], measures_memory=False)
    names = ("train_step", *args.methods)
    peaks = {name: run_child(args, size, batch, ["--memory-of", name], True)["peak_bytes"] for name in names}
    return {"size": size, "batch": batch, **timing, "peaks": peaks}


def ratios_of(case: dict, device: str) -> list[tuple[str, float | None, str, float]]:
    times, peaks = case["times"], case["peaks"]
    time_target = 0.75 if device.startswith("cuda") else 1.0
    rows = []
    for method in METHODS:
        if method not in peaks:  # the methods asked for (the loop's own method may be timed beside them)
            continue
        rows.append((f"{method} time / train step", times[method] / times["train_step"], "<=", time_target))
        # A training step that adds nothing to the resident peak (a warm heap served it) has no ratio.
        peak = peaks[method] / peaks["train_step"] if peaks["train_step"] else None
        rows.append((f"{method} peak / train-step peak", peak, "<=", 1.0))
    for name in ("floor", "callback_pair"):  # no target: the gradient methods' floor, the callback's explanation
        if name in times:
            rows.append((f"{name} time / train step", times[name] / times["train_step"], "info", 0.0))
    loop_target = 10.0 if device.startswith("cuda") else 1.0
    loop = times["per_image_loop"] / times[LOOP_METHOD]
    rows.append((f"per-image loop / batched ({LOOP_METHOD})", loop, ">=", loop_target))
    return rows


def cpu_ratio(case: dict, label: str) -> str:
    """The same time ratio in the process's CPU time (both threads), for a time row: on a shared machine, wall time
    also measures the other jobs' share of the cores."""
    cpu, first = case["cpu_times"], label.split()[0]
    if label.endswith("time / train step"):
        return f"cpu-time ratio {cpu[first] / cpu['train_step']:.2f}"
    if label.startswith("per-image loop"):
        return f"cpu-time ratio {cpu['per_image_loop'] / cpu[LOOP_METHOD]:.2f}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 518])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the times, peaks and ratios here")
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--time-case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory_of(args, args.memory_of)}))
        return
    if args.time_case:
        print(json.dumps(time_operations(args)))
        return

    print(
        f"model={args.model} device={args.device} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} memory: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} "
        f"torch={torch.__version__} timm={timm.__version__} repeats={args.repeats}",
        flush=True,
    )
    failures, cases = 0, []
    for size in args.sizes:
        for batch in args.batches:
            case = measure_case(args, size, batch)
            times, peaks = case["times"], case["peaks"]
            threshold = case["mmap_threshold"]
            allocator = f"MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "glibc default"
            print(
                f"{size}px batch {batch} (load average {case['load'][0]:.1f} -> {case['load'][1]:.1f}; "
                f"times under {allocator} malloc)"
            )
            for name, seconds in times.items():
                peak = f"  peak {peaks[name] / 2**20:8.1f} MiB" if name in peaks else ""
                print(f"  {name:<15} {seconds:8.3f} s  cpu {case['cpu_times'][name]:8.3f} s{peak}")
            case["ratios"] = []
            for label, value, relation, target in ratios_of(case, args.device):
                if relation == "info":
                    print(f"  RATIO {label:<36} {value:5.2f}  {'(no target)':<24}{cpu_ratio(case, label)}".rstrip())
                    case["ratios"].append({"label": label, "value": value, "relation": relation, "target": None})
                    continue
                if value is None:
                    print(f"  RATIO {label:<36}   n/a  (target {relation} {target}: not measured)")
                    failures += 1
                    continue
                met = value <= target if relation == "<=" else value >= target
                failures += not met
                verdict = f"(target {relation} {target}: {'met' if met else 'MISSED'})"
                print(f"  RATIO {label:<36} {value:5.2f}  {verdict:<24}{cpu_ratio(case, label)}".rstrip())
                case["ratios"].append({"label": label, "value": value, "relation": relation, "target": target})
            print(flush=True)
            cases.append(case)
    if args.json:
        args.json.write_text(json.dumps(cases, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
