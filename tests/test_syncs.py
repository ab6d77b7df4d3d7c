"""``explain`` reads device values at most once per call.

Each read of a device tensor's value (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, a device-to-host copy)
waits until the device has run all queued work; once per layer, that leaves a GPU idle while the host catches up.
On the CPU no read stalls anything, so these tests count the operations that would: ATen operations seen by a
dispatch mode (values read on the host, output sizes that depend on values) and the Python-level reads that bypass
the dispatcher (``tolist``, ``__bool__`` ...) seen by a function mode. The probe is left out: it builds the model's
token plan on the host from its structure, before any device work.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gmar_lightning import METHODS, explain, families
from gmar_lightning.heads.pruning import prune_heads
from gmar_lightning.resolve import resolve_model
from tests.models import make_images, make_model, sharpen

# What the engine is allowed per call: one read of all its value checks at the end (NaN/inf logits and gradients,
# targets out of range), whatever the method, model family or number of chunks.
MAX_READS_PER_CALL = 1

# ATen operations that read values on the host or size their output by values (a sync on a GPU).
READING_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2", "unique_dim"}
# Tensor methods that read values without going through the dispatcher.
READING_METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class _DeviceReads(TorchDispatchMode):
    """Counts the ATen operations that read device values, by name."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.paused and _reads(name, args, kwargs):
            self.counts[name] += 1
        return func(*args, **kwargs)


def _reads(name: str, args: tuple, kwargs: dict) -> bool:
    if name in READING_OPS:
        return True
    if name == "index":  # boolean-mask indexing lists the mask's True entries on the host
        return any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] if index is not None
        )
    if name in ("_to_copy", "copy_"):
        # A copy from an accelerator to the host waits for it; so does one onto it that blocks, or that starts from
        # pageable host memory (the driver stages it and may wait for the stream): only a non-blocking copy from
        # page-locked memory leaves the device running.
        source = args[1] if name == "copy_" else args[0]
        destination = kwargs.get("device", args[0].device) if name == "_to_copy" else args[0].device
        destination = torch.device(destination) if destination is not None else source.device
        non_blocking = args[2] if name == "copy_" and len(args) > 2 else kwargs.get("non_blocking", False)
        if source.device.type != destination.type:
            return source.device.type != "cpu" or not (non_blocking and source.is_pinned())
    return False


class _PythonReads(TorchFunctionMode):
    """Counts the Tensor methods that read values without going through the dispatcher.

    Such a read is one wait, whatever it dispatches on the way (``tolist`` copies a GPU tensor to the host, ``bool``
    calls ``item``): the operations it runs are not counted again.
    """

    def __init__(self, dispatch: _DeviceReads) -> None:
        super().__init__()
        self.dispatch = dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.dispatch.paused or name not in READING_METHODS:
            return func(*args, **(kwargs or {}))
        self.dispatch.counts[f"Tensor.{name}"] += 1
        self.dispatch.paused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.dispatch.paused = False


def count_reads(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> Counter:
    """The value reads ``call()`` makes, by operation, outside the model's probe."""
    counts: Counter = Counter()
    dispatch = _DeviceReads(counts)
    probe = families.probe

    def probe_uncounted(*args: object, **kwargs: object) -> families.Probe:
        dispatch.paused = True
        try:
            return probe(*args, **kwargs)
        finally:
            dispatch.paused = False

    monkeypatch.setattr(families, "probe", probe_uncounted)
    with _PythonReads(dispatch), dispatch:
        call()
    return counts


def swin() -> nn.Module:
    # 40 px / 4 = a 10x10 grid: windows of 4 need padding, and the second block of each stage shifts.
    torch.manual_seed(0)
    config = {"embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4, "num_classes": 5}
    return sharpen(timm.create_model("swin_tiny_patch4_window7_224", img_size=40, **config)).eval()


def pruned_vit() -> nn.Module:
    model = make_model("vit")
    prune_heads(model, {0: [1], 2: [0, 3]})
    return model


MODELS = {"vit": (lambda: make_model("vit"), (32, 32)), "swin": (swin, (40, 40)), "pruned_vit": (pruned_vit, (32, 32))}


def images_for(size: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_explain_reads_device_values_at_most_once(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, model_name: str, method: str
) -> None:
    build, size = MODELS[model_name]
    model, images = build().to(device), images_for(size, device)
    counts = count_reads(monkeypatch, lambda: explain(model, images, method))
    assert sum(counts.values()) <= MAX_READS_PER_CALL, dict(counts)


@pytest.mark.parametrize("method", ["gmar_l1", "grad_rollout", "rollout"])
@pytest.mark.parametrize(
    "options",
    [{"target": "tensor", "chunk_size": 3}, {"target": 2, "discard_ratio": 0.3, "head_norm": "global"}],
    ids=["tensor_target_in_chunks", "int_target_discard_global"],
)
def test_options_read_device_values_at_most_once(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, method: str, options: dict
) -> None:
    build, size = MODELS["swin"]
    model, images = build().to(device), images_for(size, device)
    if options["target"] == "tensor":
        options = {**options, "target": torch.tensor([0, 1, 2, 3], device=device)}
    if method != "gmar_l1":
        options.pop("head_norm", None)
    counts = count_reads(monkeypatch, lambda: explain(model, images, method, **options))
    assert sum(counts.values()) <= MAX_READS_PER_CALL, dict(counts)


class PatchMeanHead(nn.Module):
    """A timm ViT without a classifier under a head on the mean of its patch tokens: its read-out is checked."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = sharpen(make_model("vit"))
        self.vit.reset_classifier(0)
        self.head = nn.Linear(self.vit.embed_dim, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(images)[:, 1:].mean(1))


@pytest.mark.parametrize("method", METHODS)
def test_a_resolved_model_reads_device_values_at_most_once(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, method: str
) -> None:
    """The read-out check reads values once per resolution, not once per call."""
    model, images = PatchMeanHead().to(device), images_for((32, 32), device)
    resolved = resolve_model(model)
    explain(resolved, images, "rollout")  # resolution: the read-out check runs here
    counts = count_reads(monkeypatch, lambda: explain(resolved, images, method))
    assert sum(counts.values()) <= MAX_READS_PER_CALL, dict(counts)


def test_the_count_sees_a_read(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """The counter is not blind, and counts each read once: one ``bool`` of a tensor, one ``nonzero`` and one
    ``tolist`` are three reads (``bool`` runs ``item`` inside, and on a GPU ``tolist`` a copy to the host)."""
    tensor = make_images("vit").to(device)
    counts = count_reads(
        monkeypatch, lambda: (bool(tensor.isfinite().all()), tensor.nonzero(), tensor[0, 0, 0].tolist())
    )
    assert counts["Tensor.__bool__"] == 1 and counts["nonzero"] == 1 and counts["Tensor.tolist"] == 1
    assert sum(counts.values()) == 3, dict(counts)


def test_the_count_sees_a_copy_that_waits(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """Onto a GPU, a blocking copy and a non-blocking one from pageable memory wait; one from page-locked memory
    does not."""
    if device.type == "cpu":
        pytest.skip("host-to-device copies need an accelerator (GMAR_TEST_DEVICE=cuda)")
    host = torch.ones(3)
    pinned = host.pin_memory()
    counts = count_reads(monkeypatch, lambda: (host.to(device), host.to(device, non_blocking=True)))
    assert counts["_to_copy"] == 2, dict(counts)
    assert sum(count_reads(monkeypatch, lambda: pinned.to(device, non_blocking=True)).values()) == 0
