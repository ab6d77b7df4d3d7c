"""``torch.nn.MultiheadAttention`` as a captured attention layer: per-head weights, in the autograd graph, for a call.

``nn.MultiheadAttention`` computes its probabilities inside ``F.multi_head_attention_forward`` and hands them out only
with ``need_weights=True``. With ``average_attn_weights=False`` the returned ``[B, H, n_q, n_k]`` weights are a view of
the ``[B * H, n_q, n_k]`` tensor it multiplies with the values (eval mode has no dropout between them): the capture
reads that tensor ([`AttentionAdapter.viewed_weights`][gmar_lightning.capture.AttentionAdapter]), because the logits
depend on it and not on the view. [`per_head_weights`][gmar_lightning.families.mha.per_head_weights] switches both
arguments on for the call, whatever the caller passes (open_clip passes ``need_weights=False``; SigLIP's pooling head
takes the averaging default), and removes the switch afterwards. The module's output is the same either way: the
weights are an extra output, which the callers drop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from gmar_lightning.capture import AttentionAdapter, AttentionLayer

__all__ = ["MHA_ADAPTER", "mha_layer", "per_head_weights"]

MHA_ADAPTER = AttentionAdapter(
    name="nn.MultiheadAttention",
    matches=lambda module: isinstance(module, nn.MultiheadAttention),
    probs_module=None,
    output_index=1,
    viewed_weights=True,
)
"""Reads element 1 of an ``nn.MultiheadAttention`` output under
[`per_head_weights`][gmar_lightning.families.mha.per_head_weights]."""

# Where nn.MultiheadAttention.forward takes these arguments when they are passed by position.
_POSITIONS = {"need_weights": 4, "average_attn_weights": 6}


def mha_layer(name: str, module: nn.MultiheadAttention) -> AttentionLayer:
    """A capture layer for ``module``, laid out as ``[B, H, n_q, n_k]``."""
    heads = module.num_heads

    def layout(weights: Tensor) -> Tensor:
        return weights.unflatten(0, (-1, heads)) if weights.dim() == 3 else weights

    return AttentionLayer(name, module, MHA_ADAPTER, layout=layout)


def _force_per_head_weights(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    for name, position in _POSITIONS.items():
        if len(args) > position:
            args[position] = name == "need_weights"
        else:
            kwargs[name] = name == "need_weights"
    return tuple(args), kwargs


@contextlib.contextmanager
def per_head_weights(modules: Iterable[nn.MultiheadAttention]) -> Iterator[None]:
    """Make every call of ``modules`` return per-head weights inside the block (``need_weights=True``,
    ``average_attn_weights=False``); the switch is removed on exit, also after an error."""
    handles = [module.register_forward_pre_hook(_force_per_head_weights, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
