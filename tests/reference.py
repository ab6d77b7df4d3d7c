"""A deliberately plain reference of every method: full attention and gradient tensors, full N x N products.

It shares no code with the package beyond timm itself, so agreement between the two is evidence, not tautology.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def capture_full(model: nn.Module, images: Tensor, target: Tensor | None = None) -> tuple[list, list, Tensor, Tensor]:
    """Every layer's attention ``[B, H, N, N]`` and its gradient of the summed target logits."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
    saved_flags = [m.fused_attn for m in modules]
    attentions: list[Tensor] = []
    handles = [m.attn_drop.register_forward_hook(lambda _m, inp, _out: attentions.append(inp[0])) for m in modules]
    was_training = model.training
    try:
        for m in modules:
            m.fused_attn = False
        model.eval()
        with torch.enable_grad():
            logits = model(images.clone().requires_grad_(True))
            targets = logits.argmax(-1) if target is None else target
            objective = logits[torch.arange(len(targets)), targets].sum()
            grads = list(torch.autograd.grad(objective, attentions))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(modules, saved_flags, strict=True):
            m.fused_attn = flag
        model.train(was_training)
    return [a.detach() for a in attentions], grads, logits.detach(), targets


def readout_rows(matrix: Tensor, readout: list[int]) -> Tensor:
    """Mean of the read-out tokens' rows of ``[B, N, N]``."""
    return matrix[:, readout, :].mean(dim=1)


def reference_explain(
    model: nn.Module,
    images: Tensor,
    method: str,
    *,
    num_prefix: int,
    readout: list[int] | None,
    grid: tuple[int, int],
    residual: float = 0.5,
    head_norm: str = "layer",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token maps ``[B, h, w]`` and head weights ``[B, L, H]`` (GMAR) computed the slow, obvious way."""
    attentions, grads, _, _ = capture_full(model, images, target)
    batch, _, num_tokens, _ = attentions[0].shape
    readout = list(range(num_prefix, num_tokens)) if readout is None else readout
    eye = torch.eye(num_tokens, device=attentions[0].device).expand(batch, num_tokens, num_tokens)
    weights_out = None
    if method == "attention":
        rows = readout_rows(attentions[-1].mean(1), readout)
    elif method == "grad_rollout":
        relevance = eye.clone()
        for layer in range(start_layer, len(attentions)):
            fused = (grads[layer] * attentions[layer]).clamp(min=0).mean(1)
            relevance = relevance + fused @ relevance
        rows = readout_rows(relevance, readout)
    else:
        if method == "rollout":
            fused_layers = [a.mean(1) for a in attentions]
        else:
            if method == "gmar_l1":
                scores = torch.stack([g.abs().sum(dim=(2, 3)) for g in grads], dim=1)
            else:
                scores = torch.stack([g.pow(2).sum(dim=(2, 3)).sqrt() for g in grads], dim=1)
            if head_norm == "layer":
                weights_out = scores / scores.sum(dim=2, keepdim=True)
            else:
                weights_out = scores / scores.sum(dim=(1, 2), keepdim=True)
            fused_layers = [(weights_out[:, i, :, None, None] * a).sum(1) for i, a in enumerate(attentions)]
        rollout = eye.clone()
        for layer in range(start_layer, len(attentions)):
            fused = fused_layers[layer].clone()
            if discard_ratio > 0:
                for b in range(batch):
                    flat = fused[b].flatten()
                    lowest = flat.argsort()[: int(flat.numel() * discard_ratio)]
                    lowest = [
                        i
                        for i in lowest.tolist()
                        if not (i // num_tokens == i % num_tokens and i // num_tokens in readout)
                    ]
                    flat[lowest] = 0
                    fused[b] = flat.view(num_tokens, num_tokens)
            mixed = residual * eye + (1 - residual) * fused
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed @ rollout
        rows = readout_rows(rollout, readout)
    return rows[:, num_prefix:].reshape(batch, *grid), weights_out
