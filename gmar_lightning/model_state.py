"""Temporary model states, each restored on exit (also after an error): eval mode, frozen parameters, no gradient
checkpointing, unfused attention, and the autograd/autocast/RNG state of an explanation.

The engine combines them all
([`eval_mode_without_fast_paths`][gmar_lightning.model_state.eval_mode_without_fast_paths]); the head tools and the
perturbation metrics take only the ones they need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gmar_lightning.capture import AttentionLayer

__all__ = [
    "eval_mode",
    "eval_mode_without_fast_paths",
    "frozen_parameters",
    "isolated",
    "no_grad_checkpointing",
    "resharded",
    "unfused_attention",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode, then restore every module's own ``training`` flag (not just the root's).

    Partially frozen models (some submodules kept in eval mode) come back exactly as they were, also after an error.
    """
    # Only modules in training mode change (and are restored): a model already in eval mode, as during validation,
    # costs one walk over its modules instead of two plus a setattr per module.
    training = [module for module in model.modules() if module.training]
    try:
        if training:
            model.eval()
        yield
    finally:
        for module in training:
            module.training = True


@contextlib.contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """Reshard every FSDP2 (``fully_shard``) module of ``model`` on exit, also after an error.

    FSDP2 gathers a module's parameters for its forward and reshards them in the backward pass, but a module whose
    parameters do not require grad (frozen for the explanation) gets no post-backward hook, and the root module never
    reshards after its forward: without this, the call would leave those parameters gathered on every rank.
    """
    try:
        yield
    finally:
        for module in model.modules():
            reshard = getattr(module, "reshard", None)
            if callable(reshard) and _is_fsdp_module(module):
                reshard()


def _is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support has no sharded modules
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Make every parameter stop requiring grad, then restore each one's own ``requires_grad``."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextlib.contextmanager
def _attributes_set_false(settings: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """Set each ``(module, flag)`` to ``False``, then restore the values in reverse order."""
    changed: list[tuple[nn.Module, str, object]] = []
    try:
        for module, flag in settings:
            changed.append((module, flag, getattr(module, flag)))
            setattr(module, flag, False)
        yield
    finally:
        for module, flag, value in reversed(changed):
            setattr(module, flag, value)


def no_grad_checkpointing(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Switch timm's ``grad_checkpointing`` off on every module that has it set.

    timm checkpoints blocks whenever ``grad_checkpointing`` is set, in eval mode too: recomputation would fire capture
    hooks twice, and reentrant checkpointing drops gradients to tensors that reach a block only through hooks.
    """
    return _attributes_set_false(
        [
            (module, "grad_checkpointing")
            for module in model.modules()
            if getattr(module, "grad_checkpointing", False) is True
        ]
    )


def unfused_attention(layers: list[AttentionLayer]) -> contextlib.AbstractContextManager[None]:
    """Set each layer's adapter ``disable_flags`` (timm: ``fused_attn``) to ``False``, so probabilities materialise."""
    # A flag the module lacks has no fast path to switch off (e.g. Swin V2's window attention).
    settings = [(layer.module, flag) for layer in layers for flag in layer.adapter.disable_flags]
    return _attributes_set_false([(module, flag) for module, flag in settings if hasattr(module, flag)])


@contextlib.contextmanager
def eval_mode_without_fast_paths(
    model: nn.Module, layers: list[AttentionLayer], freeze_parameters: bool = True
) -> Iterator[None]:
    """[`eval_mode`][gmar_lightning.model_state.eval_mode] with unfused attention, no gradient checkpointing and
    (unless ``freeze_parameters=False``, for a forward without gradients) frozen parameters; all restored."""
    # Parameters stop requiring grad for the call: autograd then saves no layer inputs for weight gradients, which
    # the explanation never needs, cutting the backward graph's memory roughly in half. The input image carries the
    # graph instead. Under no_grad nothing is saved anyway, and two walks over the parameters are spared.
    frozen = frozen_parameters(model) if freeze_parameters else contextlib.nullcontext()
    with frozen, unfused_attention(layers), no_grad_checkpointing(model), eval_mode(model):
        yield


@contextlib.contextmanager
def isolated(device: torch.device, needs_grad: bool) -> Iterator[None]:
    """Gradients on (even under no_grad/inference_mode), autocast off, RNG state restored afterwards."""
    rng_devices = [device] if device.type == "cuda" else []
    grad_mode = torch.enable_grad() if needs_grad else torch.no_grad()
    autocast_device = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    with (
        torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"),
        torch.inference_mode(False),
        grad_mode,
        torch.autocast(autocast_device, enabled=False),
    ):
        yield
