"""Temporary model states come back exactly as they were, also when the body raises."""

from __future__ import annotations

import pytest

from gmar_lightning.capture import find_attention_layers
from gmar_lightning.model_state import (
    eval_mode,
    eval_mode_without_fast_paths,
    frozen_parameters,
    no_grad_checkpointing,
    unfused_attention,
)
from tests.models import make_model


def test_each_state_is_set_inside_and_restored_after_an_error() -> None:
    model = make_model("vit").train()
    model.blocks[0].eval()  # partially frozen: every module's own flag must come back
    model.set_grad_checkpointing(True)
    model.cls_token.requires_grad_(False)
    layers = find_attention_layers(model)
    training = [module.training for module in model.modules()]
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    with pytest.raises(RuntimeError, match="body"), eval_mode_without_fast_paths(model, layers):
        assert not any(module.training for module in model.modules())
        assert not any(parameter.requires_grad for parameter in model.parameters())
        assert not any(layer.module.fused_attn for layer in layers)
        assert model.grad_checkpointing is False
        raise RuntimeError("body")
    assert [module.training for module in model.modules()] == training
    assert [parameter.requires_grad for parameter in model.parameters()] == requires_grad
    assert all(layer.module.fused_attn for layer in layers)
    assert model.grad_checkpointing is True


def test_the_head_tools_take_only_the_states_they_need() -> None:
    model = make_model("vit")
    layers = find_attention_layers(model)
    with eval_mode(model), frozen_parameters(model), no_grad_checkpointing(model):
        assert all(layer.module.fused_attn for layer in layers)  # fused attention stays on
    with unfused_attention(layers):
        assert not any(layer.module.fused_attn for layer in layers)
    assert all(layer.module.fused_attn for layer in layers)
