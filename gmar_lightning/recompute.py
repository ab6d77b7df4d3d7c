"""Explanations that keep fused attention: each layer's ``q``, ``k``, ``v`` and the gradient of its attention output.

The materialised path switches fused attention off so that every layer's ``[B, H, N, N]`` probabilities exist (and
autograd keeps them for the backward pass). For global attention that is not needed. With ``O_h = A_h V_h`` and
``G_h = dy/dO_h``, the attention gradient is ``dy/dA_h = G_h V_h^T``, and every method reads ``A_h`` and ``dy/dA_h``
only through sums over query rows, so each layer is reduced from ``q``, ``k``, ``v`` and ``G`` in query-row chunks
(`gmar_lightning.methods`: ``gram_l2_scores`` and ``recomputed_layer_sums``, which reduces a layer for every method
at once; derivations in ``docs/method.md``). The forward keeps timm's fused
``scaled_dot_product_attention``; hooks on ``q_norm``, ``k_norm``, ``qkv`` and ``norm`` (the attention output's
normalisation, an identity by default) see the tensors it uses, and on the CPU a ``TorchFunctionMode`` keeps the
log-sum-exp that the flash kernel returns with each output, so no block needs a softmax of its own. Where a layer's pass
forms ``G V^T`` anyway, it also computes that layer's attention backward (``dy/dq``, ``dy/dk``, ``dy/dv``), which the
kernel (called through ``_FlashAttention``) takes instead of recomputing the same blocks.

Applies to timm's ``Attention`` (ViT, DeiT and relatives) with one attention module per rollout layer; other layers,
``discard_ratio > 0`` (a top-k over a whole layer) and the ``attention`` method use the materialised path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from gmar_lightning import methods
from gmar_lightning.families import Probe, UnsupportedModelError
from gmar_lightning.methods import Method
from gmar_lightning.mixing import AttentionMixing
from gmar_lightning.options import ExplainOptions

__all__ = ["Block", "LayerInput", "LayerTensors", "MemoryEstimate", "applies", "block_shape", "per_image_bytes"]


def _is_plain_timm_attention(module: nn.Module) -> bool:
    from timm.layers.attention import Attention

    return type(module).forward is Attention.forward


def applies(probe: Probe, method: Method, options: ExplainOptions) -> bool:
    """Whether ``method`` can run from recomputed attention on ``probe``'s model with ``options`` (unless
    ``recompute_attention=False`` forbids it)."""
    if options.recompute_attention is False or method.propagate == "last_layer" or options.discard_ratio > 0:
        return False
    if any(len(layer) != 1 or not _is_plain_timm_attention(layer[0].module) for layer in probe.layers):
        return False
    return all(_is_global(step.mixing) for step in probe.plan.attention_steps)


def _is_global(mixing: AttentionMixing) -> bool:
    return mixing.queries is None and mixing.keys is None and mixing.key_map is None


CPU_BLOCK_ELEMENTS = 2**21
"""On the CPU, a block holds at most this many floats per ``[images, H, rows, N]`` tensor (8 MiB), and spans several
images only when it holds all their rows. Blocks that ran across the batch got thinner as it grew (85 query rows at
518 px and batch 16 under the earlier cap of ``2**23``), and the three reductions of a ViT-S/16 layer at 518 px, batch 4
took 0.60 s that way against 0.27 s in blocks of one image's 341 rows (``2**20`` and ``2**22`` were within noise of
``2**21``), on a 2-vCPU VM."""


class Block(NamedTuple):
    """The shape of one block of a layer's ``[B, H, N, N]`` attention: ``images`` images by ``rows`` query rows."""

    images: int
    rows: int


def block_shape(budget: int | None, batch: int, heads: int, tokens: int, block: int | None = None) -> Block:
    """The `Block` of a layer: three ``[images, H, rows, N]`` float32 blocks (logits, probabilities, a product) fit in
    ``budget`` bytes (the whole layer when ``budget`` is ``None``), and one block holds at most ``block`` floats. A
    block covers several images only when it holds all their rows, so its shape does not depend on the batch size
    (and a batch is reduced block for block as its images would be one by one) unless the whole layer fits.

    Examples:
        >>> block_shape(3 * 4 * 6 * 197 * 5, batch=2, heads=6, tokens=197)
        Block(images=1, rows=5)
        >>> block_shape(None, batch=4, heads=6, tokens=1025, block=2**21)  # 341 rows a block: 4 blocks, as equal
        Block(images=1, rows=257)
        >>> block_shape(None, 2, 6, 197), block_shape(1, 2, 6, 197), block_shape(None, 2, 6, 197, block=6 * 197 * 7)
        (Block(images=2, rows=197), Block(images=1, rows=1), Block(images=1, rows=7))
        >>> block_shape(None, 4, 6, 197, block=2 * 6 * 197 * 197)
        Block(images=2, rows=197)
    """
    if not batch * heads * tokens:  # a layer that lost every head (HeadPruning): nothing to chunk
        return Block(max(1, batch), max(1, tokens))
    limits = [limit for limit in (block, None if budget is None else budget // (3 * 4)) if limit is not None]
    if not limits:
        return Block(batch, tokens)
    limit = min(limits)
    rows = min(tokens, max(1, limit // (heads * tokens)))
    rows = -(-tokens // -(-tokens // rows))  # as many blocks, of equal rows: 4 of 257 rather than 3 of 341 and one of 2
    images = min(batch, max(1, limit // (heads * tokens * tokens))) if rows == tokens else 1
    return Block(int(images), int(rows))


class LayerTensors:
    """Hooks that keep each layer's ``q``, ``k``, ``v`` ``[B, H, N, d]`` and hand over ``G = dy/dO`` as it arrives.

    Args:
        probe: The model's probe (one timm ``Attention`` per layer).
        on_gradient: Called as ``on_gradient(layer, grad)`` inside the backward pass, with ``grad`` ``[B, H, N, d]``;
            ``None`` for a forward without gradients.
    """

    def __init__(self, probe: Probe, on_gradient: Callable[[int, Tensor], None] | None) -> None:
        self.probe = probe
        self.saved: dict[int, dict[str, Tensor]] = {}
        self.outputs: dict[int, Tensor] = {}
        self.on_gradient = on_gradient
        self._query: tuple[int, Tensor] | None = None  # the layer whose fused attention call comes next, and its q
        # The input gradients that a layer's recomputed pass left for its flash call's backward (`_FlashAttention`).
        self._input_grads: dict[int, tuple[Tensor, ...]] = {}

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Hook every layer for the ``with`` block; the hooks are removed on exit, also after an error."""
        handles = []
        try:
            for layer, modules in enumerate(self.probe.layers):
                module = modules[0].module
                handles.append(module.q_norm.register_forward_hook(self._keeper(layer, "q")))
                handles.append(module.k_norm.register_forward_hook(self._keeper(layer, "k")))
                handles.append(module.qkv.register_forward_hook(self._keeper(layer, "qkv")))
                handles.append(module.norm.register_forward_pre_hook(self._output_hook(layer)))
            # Only the CPU flash kernel's log-sum-exp is read; elsewhere the mode would only add host time per op.
            on_cpu = self.probe.layers[0][0].module.qkv.weight.device.type == "cpu" if self.probe.layers else False
            with _KeepLogSumExp(self) if on_cpu else contextlib.nullcontext():
                yield
        finally:
            self._query = None
            for handle in handles:
                handle.remove()

    def _keeper(self, layer: int, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            # Detached: the reductions recompute from these values and never differentiate through them.
            self.saved.setdefault(layer, {})[name] = output.detach()
            if name == "q":
                self._query = (layer, output)

        return hook

    def _output_hook(self, layer: int) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            saved = self.saved[layer]
            query = saved["q"]
            batch, heads, tokens, head_dim = query.shape
            expected = self.probe.plan.attention_steps[layer].mixing.num_tokens
            if tokens != expected:  # the attention [B, H, N, N] it stands for would not fit the plan
                raise UnsupportedModelError(
                    f"attention layer {self.probe.layer_names[layer]} produced {[batch, heads, tokens, tokens]}, but "
                    f"its token plan expects [{batch}, heads, {expected}, {expected}]: this architecture mixes tokens "
                    "in a way gmar-lightning does not map; see docs/supported_models.md."
                )
            qkv = saved.pop("qkv").reshape(batch, tokens, 3, heads, head_dim)
            saved["v"] = qkv[:, :, 2].transpose(1, 2)
            output = inputs[0]
            self.outputs[layer] = output
            if self.on_gradient is not None and output.requires_grad:
                shape = (batch, tokens, heads, head_dim)
                output.register_hook(lambda grad: self.on_gradient(layer, grad.view(shape).transpose(1, 2)))

        return hook

    def attention(self, query: Tensor, key: Tensor, value: Tensor, *args: object, **kwargs: object) -> Tensor | None:
        """The output of ``F.scaled_dot_product_attention(query, key, value, ...)`` when it is a hooked layer's call
        that runs the CPU flash kernel, from that kernel, keeping the log-sum-exp it returns as the layer's ``"lse"``;
        ``None`` for any other call."""
        pending, self._query = self._query, None
        if pending is None or query is not pending[1] or args or query.device.type != "cpu":
            return None
        plain = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
        if any(kwargs.get(name, default) != default for name, default in plain.items()) or set(kwargs) - set(plain):
            return None  # the recomputed rows are those of the plain softmax, and so must their normaliser be
        if torch._fused_sdp_choice(query, key, value) != SDPBackend.FLASH_ATTENTION.value:
            return None
        # The kernel that F.scaled_dot_product_attention itself calls here (same output); its log-sum-exp, which the
        # public function drops, is kept, and its backward takes the input gradients of the layer's recomputed pass.
        layer = pending[0]
        output, log_sum_exp = _FlashAttention.apply(query, key, value, layer, self._input_grads)
        self.saved[layer]["lse"] = log_sum_exp
        # The output, while the layer's backward is still to run (none runs for the first layer: `backward`).
        if layer > 0 and self.on_gradient is not None and output.requires_grad:
            self.saved[layer]["o"] = output.detach()
        return output

    def backward(self, objective: Tensor) -> None:
        """Differentiate ``objective`` down to the first layer's attention output (each layer's ``on_gradient`` runs
        as its ``dy/dO`` appears); no attention's backward runs below it."""
        try:
            torch.autograd.grad(objective, [self.outputs[0]], allow_unused=True)
        finally:
            self._input_grads.clear()
            for saved in self.saved.values():
                saved.pop("o", None)

    def reduce(self, layer: int, block: Block, grad: Tensor | None = None, **asked: object) -> methods.LayerSums:
        """``methods.recomputed_layer_sums`` of ``layer`` from its kept ``q``, ``k`` (and log-sum-exp), with ``v``
        when ``grad = dy/dO`` is given, in blocks of shape ``block``; ``asked``: the quantities (``l1``,
        ``head_rows``, ``relevance_rows``). Inside the backward pass the same pass may also compute the layer's
        attention backward (`_fuses_backward`), which it leaves for the layer's `_FlashAttention` to return."""
        saved = self.saved[layer]
        value = None if grad is None else saved["v"]
        # Inside the backward pass, the layer's attention backward runs next: from this pass's gradients, or the
        # kernel's own (which keeps its own reference to the output).
        output = saved.pop("o", None) if grad is not None else None
        fuses = output is not None and self._fuses_backward(grad, asked)
        sums = methods.recomputed_layer_sums(
            saved["q"], saved["k"], grad, value, block.rows, block.images, saved.get("lse"),
            output=output if fuses else None, **asked,
        )  # fmt: skip
        if fuses:
            self._input_grads[layer] = sums.input_grads
        return sums

    @staticmethod
    def _fuses_backward(grad: Tensor, asked: dict[str, object]) -> bool:
        """Whether a layer's pass also computes its attention's backward (`_FlashAttention`), which recomputes ``A``
        and ``G V^T`` in every block as the pass does: when the pass forms ``G V^T`` anyway (``l1``, a relevance), or
        when the gradient reaches at most half the query rows (the last layer under a class-token read-out), whose
        blocks alone the pass visits. Row products alone are no cheaper fused (a ViT-S/16 layer at 518 px: 79-85 ms
        beside the kernel's backward against 78-79 fused at batch 4, 333 against 352 at batch 16; with ``l1`` 101-108
        against 87, with a relevance 104-110 against 82-83)."""
        if asked.get("l1") or asked.get("relevance_rows"):
            return True
        return 2 * int(methods.nonzero_rows(grad).sum()) <= grad.shape[2]

    def release(self, layer: int) -> dict[str, Tensor]:
        """Forget ``layer``'s tensors and return them (``q``, ``k``, ``v``, and the flash kernel's output ``o``
        and log-sum-exp)."""
        self.outputs.pop(layer, None)
        return self.saved.pop(layer)


class _FlashAttention(torch.autograd.Function):
    """The CPU flash kernel, returning its log-sum-exp beside the output. Its backward returns the input gradients
    that the layer's recomputed pass left in ``stash`` (`LayerTensors.reduce`), or runs the kernel's own backward."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, layer: int, stash: dict) -> tuple[Tensor, Tensor]:
        output, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[:2]
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        ctx.layer, ctx.stash = layer, stash
        ctx.mark_non_differentiable(log_sum_exp)
        return output, log_sum_exp

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_log_sum_exp: None) -> tuple[Tensor | None, ...]:
        query, key, value, output, log_sum_exp = ctx.saved_tensors
        grads = ctx.stash.pop(ctx.layer, None)
        if grads is None:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_output, query, key, value, output, log_sum_exp, 0.0, False
            )
        return *(grad.to(tensor.dtype) for grad, tensor in zip(grads, (query, key, value), strict=True)), None, None


class _KeepLogSumExp(TorchFunctionMode):
    """Hands each ``F.scaled_dot_product_attention`` call inside `LayerTensors.hooked` to `LayerTensors.attention`
    (every other call runs as it would)."""

    def __init__(self, tensors: LayerTensors) -> None:
        super().__init__()
        self.tensors = tensors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output = self.tensors.attention(*args, **kwargs)
            if output is not None:
                return output
        return func(*args, **kwargs)


class LayerInput(NamedTuple):
    """What a streamed rollout receives for one layer: its ``matrix`` (head weights ``[B, H]`` for a rollout, ``G =
    dy/dO`` for the generic rule) and, when the engine's pass over the layer's blocks already reduced it for the row,
    that ``row`` and the ``reduced`` result (per-head row products ``[B, H, N]``, or the relevance row ``[B, N]``)."""

    matrix: Tensor
    row: Tensor | None = None
    reduced: Tensor | None = None

    def reduced_for(self, row: Tensor) -> Tensor | None:
        """``reduced``, when it was computed from ``row`` itself (else the step reduces the layer for ``row``).

        Examples:
            >>> row = torch.ones(1, 2)
            >>> given = LayerInput(torch.ones(1, 1), row, torch.zeros(1, 1, 2))
            >>> given.reduced_for(row) is given.reduced, given.reduced_for(row.clone())
            (True, None)
        """
        return self.reduced if self.row is row else None


def rollout_update(
    tensors: LayerTensors,
    options: ExplainOptions,
    blocks: Callable[[Tensor], Block],
    used: Callable[[int], object] | None = None,
) -> Callable[[int, AttentionMixing, Tensor, LayerInput], Tensor]:
    """One layer's rollout step from its recomputed attention fused with the head weights of its `LayerInput`;
    ``used(layer)`` is called once the step no longer needs the layer's tensors (to release them)."""

    def update(layer: int, _mixing: AttentionMixing, row: Tensor, given: LayerInput) -> Tensor:
        if layer >= options.start_layer:
            head_rows = given.reduced_for(row)
            if head_rows is None:
                head_rows = tensors.reduce(layer, blocks(tensors.saved[layer]["q"]), head_rows=[row]).head_rows[0]
            row = methods.rollout_from_head_rows(row, given.matrix, head_rows, options.residual)
        if used is not None:
            used(layer)
        return row

    return update


def gradient_rollout_update(
    tensors: LayerTensors,
    options: ExplainOptions,
    blocks: Callable[[Tensor], Block],
    used: Callable[[int], object] | None = None,
) -> Callable[[int, AttentionMixing, Tensor, LayerInput], Tensor]:
    """One layer's step of the generic rule from its recomputed attention and the ``G = dy/dO`` of its `LayerInput`;
    ``used`` as for `rollout_update`."""

    def update(layer: int, _mixing: AttentionMixing, row: Tensor, given: LayerInput) -> Tensor:
        if layer >= options.start_layer:
            relevance = given.reduced_for(row)
            if relevance is None:
                block = blocks(tensors.saved[layer]["q"])
                relevance = tensors.reduce(layer, block, given.matrix, relevance_rows=[row]).relevance[0]
            row = row + relevance
        if used is not None:
            used(layer)
        return row

    return update


TRAINING_ACTIVATIONS = 17
"""Float32 ``[N, D]`` activations per image and block that a timm ViT block's training step saves for its backward
pass: the two layer norms' inputs and outputs, ``q``, ``k``, ``v``, the attention output and its copy into the
projection, the MLP's ``4 D`` hidden layer before and after GELU (1 + 1 + 3 + 1 + 1 + 1 + 1 + 4 + 4)."""

FORWARD_ACTIVATIONS = 10
"""The same count for a forward that differentiates only with respect to the inputs (frozen weights): no Linear keeps
its input, so the layer norms' outputs, the projection's input and GELU's output are not saved."""


class MemoryEstimate(NamedTuple):
    """Estimated bytes per image: a training step, the materialised explanation (autograd keeps every layer's
    ``[H, n_q, n_k]`` probabilities) and the recomputed one's forward (its row blocks come on top, in the budget)."""

    training: int
    materialised: int
    recomputed: int


def per_image_bytes(probe: Probe) -> MemoryEstimate | None:
    """The `MemoryEstimate` of ``probe``'s model, or ``None`` when a layer's head count or width is unknown."""
    from gmar_lightning.heads.masking import num_heads_of, output_projection

    training = materialised = recomputed = 0
    for modules, step in zip(probe.layers, probe.plan.attention_steps, strict=True):
        windows, queries, keys = step.mixing.shape(1)
        for layer in modules:
            heads, projection = num_heads_of(layer.module), output_projection(layer.module)
            width = getattr(projection, "out_features", None)
            if heads is None or not isinstance(width, int):
                return None
            activations = step.mixing.num_tokens * width
            training += 4 * TRAINING_ACTIVATIONS * activations
            recomputed += 4 * FORWARD_ACTIVATIONS * activations
            materialised += 4 * (FORWARD_ACTIVATIONS * activations + windows * heads * queries * keys)
    return MemoryEstimate(training, materialised, recomputed)
