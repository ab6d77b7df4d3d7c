"""Finding attention modules through the adapter registry."""

from __future__ import annotations

import pytest
from torch import Tensor, nn

from gmar_lightning.capture import (
    ADAPTERS,
    TIMM_ADAPTER,
    TIMM_POOL_ADAPTER,
    AttentionAdapter,
    AttentionNotFoundError,
    attention_adapter,
    find_attention_layers,
    register_attention_adapter,
    unregister_attention_adapter,
)
from tests.models import make_model


class Softmaxed(nn.Module):
    """An attention module of a kind no built-in adapter knows: softmax, then a dropout that sees the probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.probs = nn.Dropout(0.0)

    def forward(self, scores: Tensor) -> Tensor:
        return self.probs(scores.softmax(dim=-1))


def softmaxed_adapter(name: str = "softmaxed") -> AttentionAdapter:
    return AttentionAdapter(name, lambda module: isinstance(module, Softmaxed), lambda module: module.probs)


def test_timm_attention_is_found_in_forward_order() -> None:
    layers = find_attention_layers(make_model("vit"))
    assert [layer.name for layer in layers] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(layer.adapter is TIMM_ADAPTER for layer in layers)


def test_registered_adapters_come_first_and_leave_again() -> None:
    model = nn.Sequential(Softmaxed(), Softmaxed())
    with pytest.raises(AttentionNotFoundError, match=r"`model` \(Sequential\)"):
        find_attention_layers(model)
    first, second = softmaxed_adapter("first"), softmaxed_adapter("second")
    register_attention_adapter(first)
    try:
        with attention_adapter(second):
            assert list(ADAPTERS)[:3] == [second, first, TIMM_ADAPTER]
            assert {layer.adapter.name for layer in find_attention_layers(model)} == {"second"}
        assert list(ADAPTERS) == [first, TIMM_ADAPTER, TIMM_POOL_ADAPTER]
    finally:
        unregister_attention_adapter(first)
    assert list(ADAPTERS) == [TIMM_ADAPTER, TIMM_POOL_ADAPTER]


def test_the_context_manager_unregisters_after_an_error() -> None:
    adapter = softmaxed_adapter()
    with pytest.raises(RuntimeError, match="inside"), attention_adapter(adapter):
        raise RuntimeError("inside")
    assert adapter not in list(ADAPTERS)


def test_registry_misuse_is_one_line() -> None:
    with pytest.raises(TypeError, match="`adapter` must be an AttentionAdapter, got str"):
        register_attention_adapter("timm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`adapter` 'timm' is not registered"):
        unregister_attention_adapter(TIMM_ADAPTER)  # built-in adapters cannot be removed
