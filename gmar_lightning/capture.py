"""Find attention modules through adapters and hook their probabilities.

timm computes attention with fused ``scaled_dot_product_attention`` by default, which never materialises the
attention probabilities. Each timm attention module has a per-instance ``fused_attn`` flag and an ``attn_drop``
submodule that receives the post-softmax, pre-dropout probabilities ``A [B, H, N, N]`` on the unfused path. The
capture therefore turns ``fused_attn`` off on each instance for the duration of one call, hooks ``attn_drop``'s
input, and restores everything in ``finally``.

timm's attention pooling (``AttentionPoolLatent``, ``global_pool='map'``) has the same flag but no submodule that
receives its probabilities: its capture reads the first softmax its own forward computes (``softmax_in_forward``).

Other attention implementations plug in through an [`AttentionAdapter`][gmar_lightning.capture.AttentionAdapter].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ADAPTERS",
    "KEPT_HEADS",
    "TIMM_ADAPTER",
    "TIMM_POOL_ADAPTER",
    "AdapterRegistry",
    "AttentionAdapter",
    "AttentionLayer",
    "AttentionNotFoundError",
    "attention_adapter",
    "attention_modules",
    "find_attention_layers",
    "head_slots",
    "hook_attention",
    "register_attention_adapter",
    "unregister_attention_adapter",
    "unwrap_model",
]


class AttentionNotFoundError(ValueError):
    """The model has no attention module that any registered adapter recognises."""


@dataclass(frozen=True)
class AttentionAdapter:
    """How to reach the attention probabilities of one kind of attention module.

    Args:
        name: A label for messages.
        matches: Whether a module is an attention module of this kind.
        probs_module: Given a matching module, the submodule whose first positional input is the post-softmax
            attention ``[B, H, N, N]`` on the unfused path (timm: ``attn_drop``). ``None`` with ``output_index``.
        disable_flags: Boolean attributes set to ``False`` for the call to force the unfused path
            (timm: ``fused_attn``). Their values are restored afterwards.
        output_index: Instead of a submodule's input, the attention is element ``output_index`` of the matching
            module's own output tuple (transformers attention modules return ``(output, weights)``).
        softmax_in_forward: Instead, the attention is the result of the first ``softmax`` the matching module computes
            during its forward (on the unfused path), for modules that pass their probabilities to no submodule (timm's
            ``AttentionPoolLatent``). The module's own forward runs unchanged; the capture only observes the call.
        viewed_weights: With ``output_index``: the output's weights are a view of the tensor the module multiplied
            with its values (``nn.MultiheadAttention`` with ``average_attn_weights=False``); the capture reads that
            tensor (``weights._base``), which the logits depend on, rather than the view, which they do not.

    Examples:
        >>> class MyAttention(nn.Module):  # computes softmax, then calls self.dropout(attn)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.dropout = nn.Dropout(0.0)
        >>> adapter = AttentionAdapter("mine", lambda m: isinstance(m, MyAttention), lambda m: m.dropout)
        >>> with attention_adapter(adapter):
        ...     [layer.name for layer in find_attention_layers(nn.Sequential(MyAttention()))]
        ['0']
    """

    name: str
    matches: Callable[[nn.Module], bool]
    probs_module: Callable[[nn.Module], nn.Module] | None
    disable_flags: tuple[str, ...] = ()
    output_index: int | None = None
    softmax_in_forward: bool = False
    viewed_weights: bool = False


def _is_timm_attention(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)


TIMM_ADAPTER = AttentionAdapter(
    name="timm",
    matches=_is_timm_attention,
    probs_module=lambda module: module.attn_drop,
    disable_flags=("fused_attn",),
)


def _is_timm_attention_pool(module: nn.Module) -> bool:
    from timm.layers import AttentionPoolLatent

    return isinstance(module, AttentionPoolLatent)


TIMM_POOL_ADAPTER = AttentionAdapter(
    name="timm attention pool",
    matches=_is_timm_attention_pool,
    probs_module=None,
    disable_flags=("fused_attn",),
    softmax_in_forward=True,
)
"""timm's ``AttentionPoolLatent``: latent queries attend to the tokens; no ``attn_drop`` receives its probabilities,
so they are read where its forward softmaxes them."""


class AdapterRegistry:
    """The adapters the capture tries, in order: registered ones (latest first), then the built-in ones.

    Changed only through `register`, `unregister` and the `registered` context manager; the
    built-in adapters cannot be removed.

    Args:
        builtins: Adapters always tried last, in this order.
    """

    def __init__(self, builtins: tuple[AttentionAdapter, ...]) -> None:
        self._builtins = builtins
        self._registered: list[AttentionAdapter] = []

    def __iter__(self) -> Iterator[AttentionAdapter]:
        return iter((*self._registered, *self._builtins))

    def match(self, module: nn.Module) -> AttentionAdapter | None:
        """The first adapter that recognises ``module``, or ``None``."""
        return next((adapter for adapter in self if adapter.matches(module)), None)

    def register(self, adapter: AttentionAdapter) -> None:
        """Try ``adapter`` before every adapter registered earlier and before the built-in ones."""
        if not isinstance(adapter, AttentionAdapter):
            raise TypeError(f"`adapter` must be an AttentionAdapter, got {type(adapter).__name__}.")
        if adapter in self._registered:
            self._registered.remove(adapter)
        self._registered.insert(0, adapter)

    def unregister(self, adapter: AttentionAdapter) -> None:
        """Forget an adapter added with `register`."""
        if adapter not in self._registered:
            name = getattr(adapter, "name", type(adapter).__name__)
            raise ValueError(f"`adapter` {name!r} is not registered; register it before unregistering it.")
        self._registered.remove(adapter)

    @contextlib.contextmanager
    def registered(self, adapter: AttentionAdapter) -> Iterator[AttentionAdapter]:
        """Register ``adapter`` for the ``with`` block only; it is unregistered on exit, also after an error."""
        self.register(adapter)
        try:
            yield adapter
        finally:
            self.unregister(adapter)


ADAPTERS = AdapterRegistry((TIMM_ADAPTER, TIMM_POOL_ADAPTER))
"""The capture's adapter registry; the first adapter that matches a module wins."""


def register_attention_adapter(adapter: AttentionAdapter) -> None:
    """Teach the capture a new kind of attention module; it is tried before the built-in timm adapter."""
    ADAPTERS.register(adapter)


def unregister_attention_adapter(adapter: AttentionAdapter) -> None:
    """Forget an adapter added with
    [`register_attention_adapter`][gmar_lightning.capture.register_attention_adapter]."""
    ADAPTERS.unregister(adapter)


def attention_adapter(adapter: AttentionAdapter) -> contextlib.AbstractContextManager[AttentionAdapter]:
    """Use ``adapter`` inside a ``with`` block only (see
    [`register_attention_adapter`][gmar_lightning.capture.register_attention_adapter])."""
    return ADAPTERS.registered(adapter)


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a model, with the adapter that reaches its probabilities.

    ``layout``, when set, turns the captured tensor into ``[B * W, H, n_q, n_k]`` (and its gradient the same way),
    for modules whose probabilities are laid out otherwise (CaiT's talking heads put the heads last).
    """

    name: str
    module: nn.Module
    adapter: AttentionAdapter
    layout: Callable[[Tensor], Tensor] | None = None

    @property
    def probs_module(self) -> nn.Module:
        return self.adapter.probs_module(self.module)


KEPT_HEADS = "kept_heads"
"""Name of the persistent ``[H_original]`` bool buffer that an attention module which lost heads carries (True: the head
is still there); [`gmar_lightning.heads.pruning.prune_heads`][gmar_lightning.heads.pruning.prune_heads] writes it, so it
travels in every state dict."""


def head_slots(module: nn.Module, num_heads: int) -> Tensor:
    """The original index (slot) of each of an attention module's ``num_heads`` current heads, ascending (CPU int64).

    ``0 .. num_heads - 1`` for a module that never lost a head; the positions of the ``kept_heads`` buffer's True
    entries for one that did. Layers with different head counts are laid side by side by these slots.

    Examples:
        >>> head_slots(nn.Linear(2, 2), 3).tolist()
        [0, 1, 2]
    """
    kept = getattr(module, KEPT_HEADS, None)
    if kept is None:
        return torch.arange(num_heads)
    return kept.nonzero().flatten().cpu()


def slot_count(module: nn.Module, num_heads: int) -> int:
    """How many heads the module had before any was removed (the width of its row in an ``[L, H]`` head grid)."""
    kept = getattr(module, KEPT_HEADS, None)
    return num_heads if kept is None else int(kept.numel())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the eager module behind ``torch.compile`` (``OptimizedModule._orig_mod``), or the model itself."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def attention_modules(module: nn.Module, prefix: str = "") -> list[AttentionLayer]:
    """The attention modules inside ``module`` that a registered adapter recognises, in registration order.

    Names are qualified with ``prefix`` (the name of ``module`` in its model). An empty list when there are none.
    """
    layers = []
    for name, child in module.named_modules(prefix=prefix):
        adapter = ADAPTERS.match(child)
        if adapter is not None:
            layers.append(AttentionLayer(name, child, adapter))
    return layers


def find_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """List the model's attention layers in forward (registration) order.

    Raises:
        AttentionNotFoundError: If no module matches any adapter; the message names the model class and the fix.
    """
    layers = attention_modules(unwrap_model(model))
    if not layers:
        raise AttentionNotFoundError(
            f"`model` ({type(model).__name__}) has no recognisable attention modules: expected timm attention "
            "(a `fused_attn` flag and an `attn_drop` submodule); register an AttentionAdapter for other kinds."
        )
    return layers


OnAttention = Callable[[int, Tensor], None]


class _FirstSoftmax(TorchFunctionMode):
    """Hands the result of the first ``softmax`` computed while the mode is active to ``on_softmax``, once.

    The computation itself is untouched: the mode calls the very function it intercepts and returns its result, so
    the module's output is the one its forward computes, to the bit (tested).
    """

    def __init__(self, on_softmax: Callable[[Tensor], None]) -> None:
        super().__init__()
        self._on_softmax = on_softmax
        self._seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self._seen and func in (torch.softmax, Tensor.softmax, torch.nn.functional.softmax):
            self._seen = True
            self._on_softmax(result)
        return result


def _softmax_hooks(module: nn.Module, on_softmax: Callable[[Tensor], None]) -> list:
    """Forward hooks that observe ``module``'s first softmax for the length of each of its forward calls."""
    active: list[_FirstSoftmax] = []

    def enter(_module: nn.Module, _inputs: tuple) -> None:
        mode = _FirstSoftmax(on_softmax)
        mode.__enter__()
        active.append(mode)

    def leave(_module: nn.Module, _inputs: tuple, _output: object) -> None:
        active.pop().__exit__(None, None, None)

    # always_call: the mode is left also when the forward raises.
    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


@contextlib.contextmanager
def hook_attention(layers: list[AttentionLayer], on_attention: OnAttention) -> Iterator[None]:
    """Call ``on_attention(layer_index, probs)`` with each layer's post-softmax attention during forward passes.

    The hooks are removed on exit, also when the body raises.
    """
    handles = []

    def make_hook(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            on_attention(index, inputs[0])

        return hook

    def make_output_hook(index: int, position: int, viewed: bool) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            weights = output[position]
            if isinstance(weights, Tensor):  # None if the module ignored the switch to eager attention
                on_attention(index, weights._base if viewed and weights._base is not None else weights)

        return hook

    try:
        for index, layer in enumerate(layers):
            position = layer.adapter.output_index
            if layer.adapter.softmax_in_forward:
                handles.extend(_softmax_hooks(layer.module, lambda probs, index=index: on_attention(index, probs)))
            elif position is None:
                handles.append(layer.probs_module.register_forward_pre_hook(make_hook(index)))
            else:
                hook = make_output_hook(index, position, layer.adapter.viewed_weights)
                handles.append(layer.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
