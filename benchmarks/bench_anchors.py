"""Batched ``explain`` against the practice users would otherwise run, and against the floor, as measured ratios.

The anchors are this script's own code, written the way the two public implementations users reach for work: a loop
over the images, one forward with unfused attention whose probabilities a hook keeps, ``.backward()`` on the model
(parameters requiring grad, ``model.zero_grad()`` first), and a chain of full ``N x N`` matrix products per image.

* ``rollout``: Abnar & Zuidema's rollout as the popular ``vit-explain`` code does it: head mean, the lowest
  ``discard_ratio`` of the fused matrix's entries zeroed (one ``topk`` over ``N^2`` values per layer; 0.9 is that
  code's default and this script's), ``(A + I) / 2``, rows renormalised, ``R <- A_hat R`` over the layers (forward
  only, no gradients).
* ``grad_rollout``: the same code's gradient rollout: ``mean_h(G * A)`` clamped at 0, the same discard, then the same
  chain. It is not the quantity of our ``grad_rollout``; it is timed against it because it is what users run for it.
* ``generic_rule``: Chefer et al.'s (2021) generic rule as their reference code does it: ``mean_h((G * A)^+)``,
  ``R <- R + Abar R`` from ``R = I``.

Each is timed against our batched ``explain`` on the same model and images (``rollout`` against
``explain(method="rollout")``, both gradient anchors against ``explain(method="grad_rollout")``, and every gradient
anchor also against ``explain(method="gmar_l1")``), interleaved, as medians. The floor is what any explanation of
this kind must pay: one forward with unfused attention plus a backward with respect to the attention tensors only
(frozen parameters). A training step (forward + backward to the parameters, fused attention) is timed too.

The anchors are kept on the device (the original code copies every attention map to the host), so on a GPU they are
faster than the code they stand for. Before timing, each case checks that the anchors compute what they claim: the
rollout (with ``discard_ratio`` 0) and generic-rule rows equal ``explain``'s token maps. ``--discard-ratio 0`` times
the plain chain, without that code's default discard.

Peak memory beside time: on CUDA ``torch.cuda.max_memory_allocated`` growth; on CPU the growth of the peak resident
set (``VmHWM``, reset before each operation) with glibc told to return freed blocks to the OS at once.

Run: ``python benchmarks/bench_anchors.py`` (all cases, B = 1, 8, 32 at 224, 384, 518 px); pick cases with
``--batches 1 8 --sizes 224 384``; ``--device cuda`` on a GPU; ``--quick`` for a dry run (tiny model, one repeat);
``--json PATH`` writes every number.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs about 8 ms per parallel op on small shared VMs (see bench_engine.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import ctypes
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from peak_memory import peak_bytes
from torch import Tensor, nn

from gmar_lightning import explain

ANCHORS = ("rollout", "grad_rollout", "generic_rule")
# The batched method each anchor is compared with (same quantity, or what users run for it).
MATCHED = {"rollout": "rollout", "grad_rollout": "grad_rollout", "generic_rule": "grad_rollout"}
OURS = ("rollout", "grad_rollout", "gmar_l1")


class AttentionRecorder:
    """Keeps each timm attention module's post-softmax probabilities (and their gradients) during one image's pass.

    This is the hook the public implementations put on ``attn_drop`` with fused attention switched off.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
        self.attentions: list[Tensor] = []
        self.gradients: dict[int, Tensor] = {}
        self.keep_gradients = False

    def _hook(self, _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        index = len(self.attentions)
        self.attentions.append(output)
        if self.keep_gradients and output.requires_grad:
            output.register_hook(lambda grad: self.gradients.__setitem__(index, grad.detach()))

    @contextlib.contextmanager
    def recording(self, keep_gradients: bool) -> Iterator[AttentionRecorder]:
        self.keep_gradients = keep_gradients
        handles = [m.attn_drop.register_forward_hook(self._hook) for m in self.modules]
        flags = [m.fused_attn for m in self.modules]
        try:
            for module in self.modules:
                module.fused_attn = False
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in zip(self.modules, flags, strict=True):
                module.fused_attn = flag
            self.attentions, self.gradients = [], {}


def discard_lowest(fused: Tensor, ratio: float, keep_first: bool) -> None:
    """``vit-explain``'s default step before each product: zero the lowest ``ratio`` of the fused ``N x N`` entries.

    That code ranks all ``N^2`` entries of the layer's fused matrix with one ``topk`` (``discard_ratio`` defaults to
    0.9 in both its classes) and zeroes them in place; its rollout spares flat index 0 (the class token's
    self-attention), its gradient rollout does not.
    """
    if ratio == 0:
        return
    flat = fused.view(-1)
    lowest = flat.topk(int(flat.numel() * ratio), largest=False).indices
    if keep_first:
        lowest = lowest[lowest != 0]
    flat[lowest] = 0


def anchor_rollout(model: nn.Module, recorder: AttentionRecorder, image: Tensor, discard_ratio: float) -> Tensor:
    with torch.no_grad(), recorder.recording(keep_gradients=False):
        model(image)
        result = torch.eye(recorder.attentions[0].shape[-1], device=image.device)
        for attention in recorder.attentions:
            fused = attention.mean(dim=1)[0]
            discard_lowest(fused, discard_ratio, keep_first=True)
            eye = torch.eye(fused.shape[-1], device=image.device)
            a = (fused + eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
    return result[0, 1:]


def anchor_grad_rollout(model: nn.Module, recorder: AttentionRecorder, image: Tensor, discard_ratio: float) -> Tensor:
    with recorder.recording(keep_gradients=True):
        model.zero_grad()
        output = model(image)
        mask = torch.zeros_like(output)
        mask[:, output.argmax(dim=-1)] = 1
        (output * mask).sum().backward()
        with torch.no_grad():
            result = torch.eye(recorder.attentions[0].shape[-1], device=image.device)
            for index, attention in enumerate(recorder.attentions):
                fused = (attention * recorder.gradients[index]).mean(dim=1)[0]
                fused[fused < 0] = 0
                discard_lowest(fused, discard_ratio, keep_first=False)
                eye = torch.eye(fused.shape[-1], device=image.device)
                a = (fused + eye) / 2
                a = a / a.sum(dim=-1, keepdim=True)
                result = a @ result
    return result[0, 1:]


def anchor_generic_rule(model: nn.Module, recorder: AttentionRecorder, image: Tensor) -> Tensor:
    with recorder.recording(keep_gradients=True):
        output = model(image)
        index = int(output.argmax(dim=-1))
        one_hot = torch.zeros_like(output)
        one_hot[0, index] = 1
        model.zero_grad()
        (one_hot * output).sum().backward(retain_graph=True)
        with torch.no_grad():
            relevance = torch.eye(recorder.attentions[0].shape[-1], device=image.device)
            for layer, attention in enumerate(recorder.attentions):
                cam = (recorder.gradients[layer][0] * attention[0]).clamp(min=0).mean(dim=0)
                relevance = relevance + cam @ relevance
    return relevance[0, 1:]


ANCHOR_FUNCTIONS = {"rollout": anchor_rollout, "grad_rollout": anchor_grad_rollout, "generic_rule": anchor_generic_rule}
# The vit-explain anchors, which take that code's discard_ratio.
DISCARDING = ("rollout", "grad_rollout")


def floor(model: nn.Module, recorder: AttentionRecorder, images: Tensor) -> None:
    """One forward with unfused attention, then a backward that stops at the attention tensors (parameters frozen)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        with recorder.recording(keep_gradients=False):
            logits = model(images.requires_grad_())
            objective = logits.gather(1, logits.argmax(dim=-1, keepdim=True)).sum()
            # Down to the first layer's attention: every layer's attention gradient is computed on the way, and none
            # is kept (asking for all of them would hold L gradients [B, H, N, N] until the call returns).
            torch.autograd.grad(objective, recorder.attentions[:1])
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def operations(
    model: nn.Module, images: Tensor, anchors: tuple[str, ...], discard_ratio: float
) -> dict[str, Callable[[], object]]:
    recorder = AttentionRecorder(model)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

    def per_image(name: str) -> Callable[[], list[Tensor]]:
        function = ANCHOR_FUNCTIONS[name]
        if name in DISCARDING:
            function = functools.partial(function, discard_ratio=discard_ratio)
        return lambda: [function(model, recorder, images[i : i + 1]) for i in range(images.shape[0])]

    def train_step() -> None:
        model.train()
        F.cross_entropy(model(images), labels).backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    ops: dict[str, Callable[[], object]] = {f"anchor_{name}": per_image(name) for name in anchors}
    for method in OURS:
        ops[f"explain_{method}"] = lambda method=method: explain(model, images, method=method)
    ops["floor"] = lambda: floor(model, recorder, images.detach().clone())
    ops["train_step"] = train_step
    return ops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_anchors(ops: dict[str, Callable[[], object]]) -> None:
    """The anchors compute what they stand for: rollout and generic-rule rows equal ``explain``'s token maps.

    A mismatch is printed, not raised, so that a long run on a borrowed machine still reports its timings.
    """
    pairs = [("anchor_rollout", "explain_rollout"), ("anchor_generic_rule", "explain_grad_rollout")]
    for anchor, ours in pairs:
        if anchor not in ops:
            continue
        expected = torch.stack(ops[anchor]()).flatten(1)
        actual = ops[ours]().token_maps.flatten(1)
        deviation = float(((actual - expected).abs() / expected.abs().clamp_min(1e-6)).max())
        verdict = "same" if deviation <= 2e-3 else "MISMATCH"
        print(f"  CHECK {anchor} rows vs {ours} token maps: max relative difference {deviation:.1e} ({verdict})")


def run_case(model: nn.Module, batch: int, size: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch + size)).to(device)
    # The check needs the undiscarded chain, the one quantity the anchors and ``explain`` share.
    check_anchors(operations(model, images, tuple(args.anchors), discard_ratio=0.0))
    ops = operations(model, images, tuple(args.anchors), args.discard_ratio)
    for op in ops.values():  # warm-up: allocator, kernels, lazy init
        op()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.repeats):
        for name, op in ops.items():  # interleaved, so load changes hit every operation alike
            synchronize(device)
            start = time.perf_counter()
            op()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    peaks = {name: peak_bytes(op, device) for name, op in ops.items()}
    recorder = AttentionRecorder(model)
    with torch.no_grad(), recorder.recording(keep_gradients=False):
        model(images[:1])
        tokens = recorder.attentions[0].shape[-1]
    return {"batch": batch, "size": size, "tokens": tokens, "times": times, "peaks": peaks}


def print_case(case: dict, repeats: int) -> None:
    times, peaks = case["times"], case["peaks"]
    print(f"  N={case['tokens']} tokens, times are medians of {repeats}")
    for name, seconds in times.items():
        print(f"  {name:<22} {seconds * 1000:10.1f} ms   peak {peaks[name] / 2**20:9.1f} MiB")
    for anchor in (name for name in times if name.startswith("anchor_")):
        label = anchor.removeprefix("anchor_")
        matched = f"explain_{MATCHED[label]}"
        line = f"  SPEEDUP {label:<13} vs {matched:<21} {times[anchor] / times[matched]:6.2f}x"
        if label != "rollout":
            line += f"   vs explain_gmar_l1 {times[anchor] / times['explain_gmar_l1']:6.2f}x"
        print(line)
    for method in ("gmar_l1", "grad_rollout"):
        name = f"explain_{method}"
        # On the CPU a small case's blocks come from freed heap memory of a process that ran bigger work before (a
        # test worker), so the training step may add nothing to the resident peak: that ratio is then undefined.
        peak_ratio = f"{peaks[name] / peaks['train_step']:5.2f}" if peaks["train_step"] else "  n/a"
        print(
            f"  RATIO {name:<22} / floor {times[name] / times['floor']:5.2f}  / train step "
            f"{times[name] / times['train_step']:5.2f}   peak / train step {peak_ratio}"
        )


def set_malloc_mmap_threshold(threshold: int) -> None:
    """Make glibc serve large blocks with mmap and unmap them on free, so the resident set follows live tensors."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8 32; --quick: 1 2)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes in px (default 224 384 518; --quick: 224)")
    parser.add_argument("--anchors", nargs="*", choices=ANCHORS, default=list(ANCHORS), help="none: ours only")
    parser.add_argument(
        "--discard-ratio",
        type=float,
        default=0.9,
        help="vit-explain's discard_ratio for its two anchors (0.9, that code's default; 0: the plain chain)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="dry run: tiny model, one repeat, B=1,2 at 224 px")
    parser.add_argument("--json", type=Path, help="write every time, peak and ratio here")
    args = parser.parse_args(argv)
    if not 0 <= args.discard_ratio < 1:
        parser.error(f"--discard-ratio {args.discard_ratio}: pass a fraction in [0, 1), e.g. 0.9 or 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu.")
    if args.quick:
        args.model, args.repeats = "vit_tiny_patch16_224", 1
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8, 32])
    args.sizes = args.sizes or ([224] if args.quick else [224, 384, 518])
    set_malloc_mmap_threshold(65536)
    # Exact float32 on both sides of every comparison: TF32 convolutions would round batched and per-image differently.
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    model = (
        timm.create_model(args.model, pretrained=False, dynamic_img_size=True, dynamic_img_pad=True)
        .to(args.device)
        .eval()
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"model={args.model} device={args.device} ({device_name}) threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} torch={torch.__version__} timm={timm.__version__} "
        f"discard_ratio={args.discard_ratio}"
    )
    cases = []
    for size in args.sizes:
        for batch in args.batches:
            print(f"case B={batch} {size}px")
            case = run_case(model, batch, size, args)
            print_case(case, args.repeats)
            cases.append(case)
            sys.stdout.flush()
    if args.json:
        header = {
            "model": args.model,
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "discard_ratio": args.discard_ratio,
        }
        args.json.write_text(json.dumps({**header, "repeats": args.repeats, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
