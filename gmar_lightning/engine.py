"""``explain``: one forward and at most one backward pass over a batch, reduced as it streams, into an Explanation.

The engine never imports Lightning. It leaves the model exactly as it found it: training flags, fused-attention and
gradient-checkpointing flags, hooks, parameter ``.grad`` and the RNG state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmar_lightning import methods, recompute
from gmar_lightning._checks import check_choice, check_int_in_range
from gmar_lightning.capture import KEPT_HEADS, hook_attention, slot_count
from gmar_lightning.explanation import Explanation
from gmar_lightning.families import Probe, UnsupportedModelError
from gmar_lightning.methods import METHOD_TABLE, Method
from gmar_lightning.mixing import AttentionMixing, AttentionReadout, TokenPlan, to_device
from gmar_lightning.model_state import resharded
from gmar_lightning.naflex import NaFlexBatch, is_naflex_batch, keys_of
from gmar_lightning.options import ExplainOptions
from gmar_lightning.resolve import ResolvedModel, as_resolved
from gmar_lightning.tokens import TokenLayout, patch_embedding

__all__ = ["explain", "explain_many"]

Target = int | Sequence[int] | Tensor | None


def _as_windows(attention: Tensor) -> Tensor:
    """``[B * W, H, n_q, n_k]`` from a capture that keeps windows in their own dimension (``[B, W, H, n_q, n_k]``)."""
    return attention.flatten(0, 1) if attention.dim() == 5 else attention


Layout = Callable[[Tensor], Tensor]


@dataclass
class _LayerReductions:
    """What the hooks keep of each rollout layer: one fused ``[B * W, n_q, n_k]`` matrix and, for GMAR, head scores.

    A layer may have several attention modules (parallel branches of one block); their heads are the layer's heads.
    """

    method: Method
    batch: int
    layouts: list[list[Layout]]  # per rollout layer and branch: the captured tensor as [B * W, H, n_q, n_k]
    matrices: list[Tensor | None]
    scores: list[Tensor | None]
    weights: list[Tensor | None]  # per layer [B, H_l] the head weights the layer was fused with (GMAR)
    pending: dict[int, dict[int, Tensor]] = field(default_factory=dict)  # layer -> branch -> attention
    gradients: dict[int, dict[int, Tensor]] = field(default_factory=dict)  # layer -> branch -> reduced gradient
    stream: methods.RowStream | None = None  # when set, each layer's matrix goes to the rollout instead of `matrices`
    streamed: set[int] = field(default_factory=set)

    @property
    def branches(self) -> list[int]:
        return [len(layouts) for layouts in self.layouts]

    def on_attention(self, layer: int, branch: int, attention: Tensor) -> None:
        if self.method.needs_gradients:
            self.pending.setdefault(layer, {})[branch] = attention
            attention.register_hook(lambda grad, layer=layer, branch=branch: self.on_gradient(layer, branch, grad))
        elif not self.method.last_layer_only or layer == len(self.matrices) - 1:  # the head mean
            windows = self.layouts[layer][branch](attention)
            # max(..., 1): a layer whose heads were all pruned away contributes no attention, not NaN.
            partial = windows.float().sum(dim=1) / (self.branches[layer] * max(windows.shape[1], 1))
            self.matrices[layer] = partial if self.matrices[layer] is None else self.matrices[layer] + partial

    def on_gradient(self, layer: int, branch: int, grad: Tensor) -> None:
        # Runs inside the backward pass: reduce the [B * W, H, n_q, n_k] gradient at once so it can be freed.
        layout = self.layouts[layer][branch]
        attention, grad = layout(self.pending[layer][branch]), layout(grad)
        if self.method.weighs_heads:
            reduced = methods.head_scores(grad, self.method.gradient_norm, self.batch)
        else:
            reduced = methods.positive_relevance(attention, grad)
            if self.branches[layer] > 1:
                reduced = reduced / self.branches[layer]
        done = self.gradients.setdefault(layer, {})
        done[branch] = reduced
        if len(done) < self.branches[layer]:
            return
        attentions = [self.layouts[layer][index](self.pending[layer].pop(index)) for index in range(len(done))]
        del self.pending[layer]
        if not self.method.weighs_heads:
            self._keep(layer, _total([done[index] for index in range(len(attentions))]))
            return
        scores = _joined([done[index] for index in range(len(attentions))], dim=1)
        weights = methods.layer_head_weights(scores, complete=True)  # a layer's own heads: no NaN slot
        self.scores[layer], self.weights[layer] = scores, weights
        branch_weights = weights.split([a.shape[1] for a in attentions], dim=1)
        self._keep(layer, _total([methods.fuse_heads(a, w) for a, w in zip(attentions, branch_weights, strict=True)]))

    def _keep(self, layer: int, matrix: Tensor) -> None:
        if self.stream is None:
            self.matrices[layer] = matrix
            return
        self.stream.feed(layer, matrix.detach().unflatten(0, (self.batch, -1)))
        self.streamed.add(layer)

    def fill_unreached(self) -> None:
        """Layers the target does not depend on get zero gradients (uniform GMAR weights, zero relevance)."""
        for layer, branches in list(self.pending.items()):
            for branch, attention in list(branches.items()):
                if branch not in self.gradients.get(layer, {}):
                    self.on_gradient(layer, branch, torch.zeros_like(attention))


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of ``parts``; one part is returned as it is (``sum()`` would add it to 0, a copy per layer)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _joined(parts: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(parts, dim)``, without copying a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _check_naflex(resolved: ResolvedModel, images: Mapping, options: ExplainOptions) -> NaFlexBatch:
    """A NaFlex batch in the spelling the ViT takes (timm's NaFlexViT, transformers' SigLIP 2)."""
    naflex = resolved.naflex
    name = type(resolved.vit).__name__
    if naflex is None:
        raise TypeError(
            f"`images` is a NaFlex batch, which only timm's NaFlexViT and transformers' SigLIP 2 take, not {name}; "
            "pass the images as a float tensor [B, C, H, W]."
        )
    keys = keys_of(images)
    if keys != naflex.keys:
        raise TypeError(f"`images` is a NaFlex batch with keys {list(keys)}; {name} takes {naflex.describe()}.")
    batch = NaFlexBatch.from_dict(images)
    patch_h, patch_w = naflex.patch_size
    width = batch.patches.shape[2:].numel()
    if naflex.channels is not None and width != naflex.channels * patch_h * patch_w:
        raise ValueError(
            f"`images` patches have {width} values each, but {name} takes {naflex.channels}x{patch_h}x{patch_w} = "
            f"{naflex.channels * patch_h * patch_w}; patchify the images with the model's patch size and channels."
        )
    if options.discard_ratio > 0:
        raise ValueError(
            "`discard_ratio` must be 0 for a NaFlex batch: its per-layer quantile would count the padding entries; "
            "leave it at 0."
        )
    return batch


def _check_images(resolved: ResolvedModel, images: object, options: ExplainOptions) -> Tensor | NaFlexBatch:
    if is_naflex_batch(images):
        return _check_naflex(resolved, images, options)
    naflex = resolved.naflex
    if naflex is not None and not naflex.takes_images:
        given = f"a tensor {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"`images` must be {naflex.describe()}: {type(resolved.vit).__name__} takes patch sequences, not {given}."
        )
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a float tensor [B, C, H, W], got {type(images).__name__}.")
    if images.dim() != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"`images` must have shape [B, C, H, W], got {list(images.shape)}{hint}.")
    if not images.is_floating_point():
        raise TypeError(f"`images` must be a float tensor, got {images.dtype}; convert and normalise it first.")
    if images.is_meta:
        raise ValueError("`images` are meta tensors, which hold no data; pass images on the CPU or a GPU.")
    if images.shape[0] == 0:
        raise ValueError("`images` is an empty batch; pass at least one image.")
    patch_embed = patch_embedding(resolved.vit)
    expected_channels = resolved.family.num_channels(resolved.vit)
    if expected_channels is not None and images.shape[1] != expected_channels:
        raise ValueError(
            f"`images` have {images.shape[1]} channels but the model takes {expected_channels}; "
            "convert the images (e.g. grayscale to RGB) before explaining."
        )
    img_size = getattr(patch_embed, "img_size", None)
    actual = tuple(images.shape[-2:])
    if img_size is not None and getattr(patch_embed, "strict_img_size", False) and actual != tuple(img_size):
        raise ValueError(
            f"`images` are {actual[0]}x{actual[1]} but the model takes {img_size[0]}x{img_size[1]}; resize them, or "
            "create the model with dynamic_img_size=True."
        )
    return images


def _batch_size(images: Tensor | NaFlexBatch) -> int:
    return images.batch_size if isinstance(images, NaFlexBatch) else int(images.shape[0])


def _masked(layout: Layout, mask: Tensor) -> Layout:
    """``layout`` followed by zeroing the entries outside ``mask`` ``[B, 1, n_q, n_k]``."""
    return lambda tensor: layout(tensor).masked_fill(~mask.to(tensor.device), 0.0)


def _padded_probe(probe: Probe, images: NaFlexBatch) -> Probe:
    """``probe`` with a ``[B, N]`` read-out: the model's pooling weights on each image's own tokens, renormalised
    (timm's masked mean over the valid patches). A pool's read-out weighs its latents, which padding does not touch."""
    plan = probe.plan
    if isinstance(plan.attention_steps[-1].mixing, AttentionReadout):
        readout = plan.readout.float().expand(images.batch_size, -1)
    else:
        tokens = images.token_valid(plan.num_prefix_tokens).to(plan.readout.device)
        readout = plan.readout.float() * tokens
        readout = readout / readout.sum(dim=1, keepdim=True)
    return dataclasses.replace(probe, plan=dataclasses.replace(plan, readout=readout))


def _check_target(target: Target, batch: int) -> Target:
    """Check the whole ``target`` against the whole batch once, before chunks slice it: an int (or 0-dim integer
    tensor) for every image, or one integer class per image."""
    if target is None or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    if isinstance(target, bool | str) or not isinstance(target, Sequence | Tensor):
        raise TypeError(
            f"`target` must be None, an int or an integer tensor [B], got {type(target).__name__} {target!r}."
        )
    try:
        targets = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"`target` must hold integer class indices, got {target!r}.") from None
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        # int(tensor(1.7)) or int(tensor(True)) would silently explain class 1.
        raise TypeError(f"`target` must hold integer class indices, got dtype {targets.dtype}.")
    if targets.is_meta:
        raise ValueError("`target` is a meta tensor, which holds no data; pass class indices on the CPU or a GPU.")
    if targets.dim() == 0:
        return int(targets)
    if targets.shape != (batch,):
        raise ValueError(
            f"`target` must be an int or have shape [{batch}] (one class per image), got {list(targets.shape)}."
        )
    return targets


def _resolve_targets(target: Target, logits: Tensor) -> Tensor:
    """The ``[B]`` classes to explain on the logits' device; their range is checked with the other flags of
    `_Flags`, after the pass, so that no device value is read here."""
    batch = logits.shape[0]
    if target is None:
        return logits.argmax(dim=-1)
    if isinstance(target, bool) or not isinstance(target, int | Sequence | Tensor):
        raise TypeError(f"`target` must be None, an int or a LongTensor [B], got {type(target).__name__}.")
    if isinstance(target, int):  # made on the device: no copy
        return torch.full((batch,), target, dtype=torch.long, device=logits.device)
    targets = to_device(torch.as_tensor(target), logits.device)
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer class indices, got dtype {targets.dtype}.")
    targets = targets.long().expand(batch) if targets.dim() == 0 else targets.long()
    if targets.shape != (batch,):
        raise ValueError(f"`target` must be an int or have shape [{batch}], got {list(targets.shape)}.")
    return targets


# The value checks of one call, in the order their errors are raised. They are gathered on the device as the chunks
# run and read once at the end of the call: reading a device value waits for all queued work, and one wait per layer
# or check would leave a GPU idle while the host catches up.
_BAD_LOGITS, _BAD_TARGETS, _BAD_GRADIENTS = range(3)


def _flags(logits: Tensor, targets: Tensor, summary: list[Tensor]) -> Tensor:
    """``[3]`` bool on the device: NaN/inf logits, targets out of range, NaN/inf attention gradients."""
    checks = [~torch.isfinite(logits).all(), ((targets < 0) | (targets >= logits.shape[1])).any()]
    gradients = ~torch.isfinite(_joined([part.flatten() for part in summary])).all() if summary else None
    checks.append(gradients if gradients is not None else torch.zeros_like(checks[0]))
    return torch.stack(checks)


def _raise_flagged(model: nn.Module, flags: Tensor, targets: Tensor, num_classes: int) -> None:
    """Raise the first error that ``flags`` ``[chunks, 3]`` records; the call's one read of device values."""
    bad = flags.any(dim=0).tolist()
    if bad[_BAD_LOGITS]:
        raise FloatingPointError(
            f"`model` ({type(model).__name__}) produced NaN/inf logits; check `images` and the weights for NaN/inf."
        )
    if bad[_BAD_TARGETS]:
        raise ValueError(f"`target` {targets.tolist()} is out of range for a model with {num_classes} classes.")
    if bad[_BAD_GRADIENTS]:
        raise FloatingPointError(
            "`model` produced NaN/inf attention gradients for `target`; check `images` and the weights for NaN/inf."
        )


def _check_shape(probe: Probe, layer: int, attention: Tensor, batch: int) -> None:
    """The captured attention must have the shape the family's token plan expects, or the maps would be wrong."""
    mixing = probe.plan.attention_steps[layer].mixing
    expected = mixing.shape(batch)
    actual = (attention.shape[0], attention.shape[-2], attention.shape[-1])
    if attention.dim() != 4 or actual != expected:
        raise UnsupportedModelError(
            f"attention layer {probe.layer_names[layer]} produced {list(attention.shape)}, but its token plan expects "
            f"[{expected[0]}, heads, {expected[1]}, {expected[2]}]: this architecture mixes tokens in a way "
            "gmar-lightning does not map; see docs/supported_models.md."
        )


@dataclass
class _Chunk:
    """What one chunk of images yields, before the chunks are concatenated and rolled out."""

    logits: Tensor  # [B, C] float32
    targets: Tensor  # [B] the explained classes
    matrices: list[Tensor | None]  # per layer [B, W, n_q, n_k]; None where the method keeps no matrix
    scores: list[Tensor] | None  # per layer [B, H_l] head scores, for methods that weigh heads
    weights: list[Tensor] | None  # per layer [B, H_l] head weights (normalised per layer), beside the scores
    rows: Tensor | None  # [B, N] the read-out rows, when the rollout streamed through the backward pass
    flags: Tensor  # [3] bool: what `_raise_flagged` checks


def _layer_update(
    method: Method, plan: TokenPlan, options: ExplainOptions, shares: Tensor | None = None
) -> Callable[[int, AttentionMixing, Tensor, Tensor], Tensor]:
    """One layer's step of the read-out row for a rollout method, with the options that act layer by layer.

    ``shares`` ``[B, L]`` scales each layer's fused attention for the global head norm.
    """
    if method.propagate == "gradient_rollout":

        def relevance_step(layer: int, mixing: AttentionMixing, row: Tensor, relevance: Tensor) -> Tensor:
            return methods.gradient_rollout_step(mixing, row, relevance) if layer >= options.start_layer else row

        return relevance_step
    protected = {}
    if options.discard_ratio > 0:
        protected = dict(zip((step.layer for step in plan.attention_steps), plan.protected_tokens(), strict=True))

    def rollout_step(layer: int, mixing: AttentionMixing, row: Tensor, fused: Tensor) -> Tensor:
        if layer < options.start_layer:
            return row
        if shares is not None:
            fused = fused * shares[:, layer, None, None, None]
        padding = mixing.key_padding()
        if padding is not None:  # attention to padding slots reaches no token
            fused = fused.masked_fill(padding.to(fused.device), 0.0)
        if options.discard_ratio > 0:
            fused = methods.discard_lowest(fused, options.discard_ratio, mixing.diagonal(protected[layer]))
        return methods.rollout_step(mixing, row, fused, options.residual)

    return rollout_step


def _streams(method: Method, options: ExplainOptions) -> bool:
    """Whether the rollout can run inside the backward pass: every layer's step is known once its gradient is.

    The global head norm needs every layer's scores before the first step; the head-mean methods see their layers in
    forward order, the opposite of the row's.
    """
    if not method.needs_gradients or method.propagate == "last_layer":
        return False
    return method.propagate == "gradient_rollout" or options.head_norm == "layer"


def _explain_chunk(
    resolved: ResolvedModel,
    probe: Probe,
    images: Tensor | NaFlexBatch,
    specs: tuple[Method, ...],
    target: Target,
    options: ExplainOptions,
) -> list[_Chunk]:
    """Run one chunk of images through the model and, for gradient methods, one backward pass that serves them all.

    Each method reduces the same captured attention (and the same attention gradient) in its own `_LayerReductions`.
    """
    batch = _batch_size(images)
    layouts = [[module.layout or _as_windows for module in layer] for layer in probe.layers]
    if isinstance(images, NaFlexBatch):  # padding takes no part: its attention and gradient entries are zeroed
        mixings = [step.mixing for step in probe.plan.attention_steps]
        masks = images.masks(mixings, probe.plan.num_prefix_tokens)
        layouts = [[_masked(layout, mask) for layout in layer] for layer, mask in zip(layouts, masks, strict=True)]
    branches = [len(layer) for layer in probe.layers]
    layers = len(branches)
    every = []
    for method in specs:
        reductions = _LayerReductions(method, batch, layouts, [None] * layers, [None] * layers, [None] * layers)
        if _streams(method, options):
            update = _layer_update(method, probe.plan, options)
            reductions.stream = methods.RowStream(probe.plan, update, batch, images.device)
        every.append(reductions)
    owners = [(layer, branch) for layer, count in enumerate(branches) for branch in range(count)]

    def on_attention(index: int, attention: Tensor) -> None:
        layer, branch = owners[index]
        _check_shape(probe, layer, layouts[layer][branch](attention), batch)
        for reductions in every:
            reductions.on_attention(layer, branch, attention)

    needs_grad = any(method.needs_gradients for method in specs)
    # Inference tensors cannot enter autograd: clone inside inference_mode(False). requires_grad makes the attention
    # part of the graph even when every parameter is frozen.
    if isinstance(images, NaFlexBatch):
        inputs = images.inputs(resolved.dtype, needs_grad)
    else:
        inputs = images.clone().requires_grad_(needs_grad)
    with hook_attention(probe.modules, on_attention):
        logits = resolved.logits(inputs)
    targets = _resolve_targets(target, logits)
    if needs_grad:
        gradient_reductions = [reductions for reductions in every if reductions.method.needs_gradients]
        first_layer = list(gradient_reductions[0].pending.get(0, {}).values())
        if len(first_layer) != branches[0]:
            raise RuntimeError(
                f"No attention probabilities were captured from {probe.layer_names[0]}: `model`'s forward does not "
                "run it; pass the ViT it classifies with as `vit=`."
            )
        # Out-of-range targets are clamped for the pass (a device index error would be fatal on a GPU) and reported
        # from the flags once the call's work is queued.
        objective = logits.gather(1, targets.clamp(0, logits.shape[1] - 1)[:, None]).sum()
        # Differentiate with respect to the first layer's attention only: every later layer depends on it, so the
        # tensor hooks see each layer's gradient on the way down, and no parameter's .grad is touched.
        torch.autograd.grad(objective, first_layer, allow_unused=True)
        for reductions in gradient_reductions:
            reductions.fill_unreached()
    return [_chunk_of(reductions, probe, logits, targets, batch) for reductions in every]


def _chunk_of(reductions: _LayerReductions, probe: Probe, logits: Tensor, targets: Tensor, batch: int) -> _Chunk:
    """What one method's reductions kept of a chunk."""
    method = reductions.method
    missing = [
        name
        for index, (name, matrix) in enumerate(zip(probe.layer_names, reductions.matrices, strict=True))
        if matrix is None and index not in reductions.streamed
    ]
    if not method.last_layer_only and missing:
        raise RuntimeError(
            f"No attention probabilities were captured from {', '.join(missing)}: `model`'s forward does not run "
            "them; pass the ViT it classifies with as `vit=`."
        )
    matrices = [
        matrix.detach().unflatten(0, (batch, -1)) if matrix is not None else None for matrix in reductions.matrices
    ]
    scores = list(reductions.scores) if method.weighs_heads else None
    weights = list(reductions.weights) if method.weighs_heads else None
    rows = reductions.stream.result() if reductions.stream is not None else None
    summary = []
    if method.needs_gradients:
        summary = scores if scores is not None else [rows] if rows is not None else matrices
    flags = _flags(logits.detach(), targets, summary)
    return _Chunk(logits.detach().float(), targets, matrices, scores, weights, rows, flags)


def _free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: CUDA's free memory, or on a Linux CPU the kernel's ``MemAvailable`` (what
    can be allocated without swapping); ``None`` where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(available.group(1)) * 1024 if available else None


def _memory_budget(probe: Probe, batch: int, options: ExplainOptions, device: torch.device) -> int | None:
    """The call's budget in bytes: the option, or a training step's estimated activations for the batch; at most the
    device's free memory (a probe may be larger than the training batch). ``None`` when neither is known (no bound)."""
    budget = options.memory_budget
    if budget is None:
        estimate = recompute.per_image_bytes(probe)
        budget = estimate.training * batch if estimate is not None else None
    free = _free_memory(device)
    if free is not None:
        budget = free if budget is None else min(budget, free)
    return budget


def _micro_batch(probe: Probe, batch: int, budget: int | None, recomputed: bool) -> int:
    """Images per pass: as many as the estimated memory of their explanation fits in ``budget``."""
    estimate = recompute.per_image_bytes(probe)
    if budget is None or estimate is None:
        return batch
    return max(1, min(batch, budget // (estimate.recomputed if recomputed else estimate.materialised)))


@dataclass
class _RecomputedReductions:
    """What the recomputed path keeps of one method: per layer head scores and weights (GMAR), and the row stream."""

    method: Method
    scores: list[Tensor | None]
    weights: list[Tensor | None]
    stream: methods.RowStream | None = None


def _explain_chunk_recomputed(
    resolved: ResolvedModel,
    probe: Probe,
    images: Tensor,
    specs: tuple[Method, ...],
    target: Target,
    options: ExplainOptions,
) -> list[_Chunk]:
    """`_explain_chunk` with fused attention kept: each layer is reduced from ``q``, ``k``, ``v`` and ``dy/dO`` in
    blocks that fit ``options.memory_budget`` (`gmar_lightning.recompute`), by every method in ``specs`` from the same
    forward and backward pass."""
    batch, layers = images.shape[0], len(probe.layers)
    reached: set[int] = set()
    needs_gradients = any(method.needs_gradients for method in specs)
    block = recompute.CPU_BLOCK_ELEMENTS if images.device.type == "cpu" else None

    def blocks(tensor: Tensor) -> recompute.Block:
        return recompute.block_shape(options.memory_budget, *tensor.shape[:3], block=block)

    every = [_RecomputedReductions(method, [None] * layers, [None] * layers) for method in specs]
    streaming = [reductions for reductions in every if _streams(reductions.method, options)]
    # A layer's q, k, v are released once every method that rolls out through the backward pass used them; methods
    # that roll out after it (the head mean, the global head norm) keep q and k of every layer.
    after = len(streaming) < len(every)
    uses = dict.fromkeys(range(layers), len(streaming))

    def used(layer: int) -> None:
        uses[layer] -= 1
        if uses[layer] > 0:
            return
        if after:  # q and k wait for the rollout after the backward pass
            tensors.outputs.pop(layer, None)
            tensors.saved[layer].pop("v", None)
        else:
            tensors.release(layer)

    l1 = any(reductions.method.gradient_norm == "l1" for reductions in every)

    def on_gradient(layer: int, grad: Tensor) -> None:
        # Runs inside the backward pass, as each layer's dy/dO appears (last layer first). One pass over the layer's
        # blocks serves every method: the L1 scores and the row products of each streamed rollout whose row waits for
        # this layer share one q k^T and one G V^T per block.
        reached.add(layer)
        rolling = layer >= options.start_layer
        ready = [reductions for reductions in streaming if rolling and reductions.stream.waiting_for == layer]
        row_of = {id(reductions): reductions.stream.row for reductions in ready}
        sums = tensors.reduce(
            layer, blocks(grad), grad, l1=l1,
            head_rows=[row_of[id(reductions)] for reductions in ready if reductions.method.weighs_heads],
            relevance_rows=[row_of[id(reductions)] for reductions in ready if not reductions.method.weighs_heads],
        )  # fmt: skip
        value = tensors.saved[layer]["v"]
        head_rows, relevance = iter(sums.head_rows), iter(sums.relevance)
        for reductions in every:
            method = reductions.method
            if not method.needs_gradients:
                continue
            row = row_of.get(id(reductions))
            if not method.weighs_heads:
                reduced = None if row is None else next(relevance)
                reductions.stream.feed(layer, recompute.LayerInput(grad, row, reduced))
                continue
            scores = sums.l1 if method.gradient_norm == "l1" else methods.gram_l2_scores(grad, value)
            reductions.scores[layer] = scores
            reductions.weights[layer] = methods.layer_head_weights(scores, complete=True)
            if reductions.stream is not None:
                reduced = None if row is None else next(head_rows)
                reductions.stream.feed(layer, recompute.LayerInput(reductions.weights[layer], row, reduced))
        if not streaming:  # v served the scores only
            tensors.saved[layer].pop("v")

    tensors = recompute.LayerTensors(probe, on_gradient if needs_gradients else None)
    for reductions in streaming:
        if reductions.method.propagate == "gradient_rollout":
            update = recompute.gradient_rollout_update(tensors, options, blocks, used)
        else:
            update = recompute.rollout_update(tensors, options, blocks, used)
        reductions.stream = methods.RowStream(probe.plan, update, batch, images.device)
    inputs = images.clone().requires_grad_(needs_gradients)
    with tensors.hooked():
        logits = resolved.logits(inputs)
    targets = _resolve_targets(target, logits)
    missing = [name for layer, name in enumerate(probe.layer_names) if layer not in tensors.outputs]
    if missing:
        raise RuntimeError(
            f"No attention was captured from {', '.join(missing)}: `model`'s forward does not run them; pass the ViT "
            "it classifies with as `vit=`."
        )
    if needs_gradients:
        objective = logits.gather(1, targets.clamp(0, logits.shape[1] - 1)[:, None]).sum()
        # As in `_explain_chunk`: differentiate with respect to the first layer's attention output only.
        tensors.backward(objective)
        for layer in range(layers):
            if layer not in reached:  # the target does not depend on it: zero gradients
                on_gradient(layer, torch.zeros_like(tensors.saved[layer]["v"]))
    chunks = []
    for position, reductions in enumerate(every):
        method = reductions.method
        if reductions.stream is not None:
            rows_out = reductions.stream.result()
        else:
            if method.weighs_heads:  # the global head norm: every layer's share of its image's scores
                per_layer = torch.stack([part.sum(dim=1) for part in reductions.scores], dim=1)
                shares = methods.layer_shares(per_layer[..., None])
                layer_weights = [w * shares[:, index, None] for index, w in enumerate(reductions.weights)]
            else:  # the head mean
                heads = [tensors.saved[index]["q"].shape[1] for index in range(layers)]
                # A layer that lost every head gets an empty [B, 0] (max: no division by its zero heads).
                layer_weights = [
                    images.new_full((batch, count), 1.0 / max(count, 1), dtype=torch.float32) for count in heads
                ]
            # The last method to roll out after the backward pass releases each layer as it goes.
            last = all(other.stream is not None for other in every[position + 1 :])
            update = recompute.rollout_update(tensors, options, blocks, tensors.release if last else None)

            def step(layer: int, mixing: AttentionMixing, row: Tensor, update=update, weights=layer_weights) -> Tensor:
                return update(layer, mixing, row, recompute.LayerInput(weights[layer]))

            rows_out = methods.propagate(probe.plan, step, batch, images.device)
        scores = reductions.scores if method.weighs_heads else None
        weights = reductions.weights if method.weighs_heads else None
        summary = scores if scores is not None else [rows_out] if method.needs_gradients else []
        flags = _flags(logits.detach(), targets, summary)
        chunks.append(_Chunk(logits.detach().float(), targets, [None] * layers, scores, weights, rows_out, flags))
    return chunks


def _head_grid(probe: Probe, per_layer: list[Tensor]) -> Tensor:
    """``[B, L, H]`` from per-layer ``[B, H_l]``, each head in the column of its original index, NaN where none.

    ``H`` is the largest head count a layer has or had. A layer keeps its heads' original indices after
    [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] (its ``kept_heads`` buffer); other layers with fewer heads
    (e.g. the early stages of Swin or PVT) fill their first columns.
    """
    kept_masks, widths = [], []
    for modules, part in zip(probe.layers, per_layer, strict=True):
        single = len(modules) == 1
        kept_masks.append(getattr(modules[0].module, KEPT_HEADS, None) if single else None)
        widths.append(slot_count(modules[0].module, part.shape[1]) if single else part.shape[1])
    if all(kept is None for kept in kept_masks) and len(set(widths)) == 1:  # every layer has all its heads
        return torch.stack(per_layer, dim=1)
    grid = per_layer[0].new_full((per_layer[0].shape[0], len(per_layer), max(widths)), float("nan"))
    for index, (kept, part) in enumerate(zip(kept_masks, per_layer, strict=True)):
        if kept is None:
            grid[:, index, : part.shape[1]] = part
            continue
        if part.shape[1] == 0:  # every head removed: the layer's row stays NaN
            continue
        # The kept heads' slots, without listing them on the host (a device sync per layer): the k-th True entry of
        # `kept` takes the layer's k-th head.
        kept = kept.to(grid.device)
        heads = (kept.long().cumsum(0) - 1).clamp_min(0)
        grid[:, index, : kept.numel()] = part[:, heads].masked_fill(~kept, float("nan"))
    return grid


def explain(
    model: nn.Module | ResolvedModel,
    images: Tensor | Mapping[str, Tensor],
    method: str = "gmar_l1",
    target: Target = None,
    *,
    residual: float = 0.5,
    head_norm: str = "layer",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    chunk_size: int | None = None,
    token_layout: TokenLayout | None = None,
    memory_budget: int | None = None,
    recompute_attention: bool | None = None,
    vit: nn.Module | None = None,
) -> Explanation:
    """Explain a ViT's predictions for a batch with GMAR or one of the baselines.

    GMAR (Jo et al., 2025): backpropagate the target logit to every layer's post-softmax attention ``A_l``,
    score each head by the L1 (``gmar_l1``) or L2 (``gmar_l2``) norm of its gradient, normalise the scores into
    head weights, fuse each layer's heads with those weights and roll the fused matrices out across layers
    (Abnar & Zuidema, 2020). Baselines: ``rollout`` (head mean), ``grad_rollout`` (Chefer et al., 2021, generic
    rule) and ``attention`` (last layer, head mean). See ``docs/method.md`` for every formula.

    The whole batch takes one forward and (gradient methods) one backward pass, in eval mode and float32, with
    fused attention switched off for the call only (timm ViT attention keeps it: each layer is recomputed from
    ``q``, ``k``, ``v`` in query-row chunks, docs/method.md). Resolving a classifier that puts its own head on the
    ViT's tokens adds one forward and backward pass of one image, which checks the read-out (docs/method.md).
    Everything the call changes is restored, also on error.

    ``model`` is the whole classifier: the logits are always its output, so a ViT backbone with a separate head, a ViT
    nested as ``self.backbone`` or a LightningModule are explained as they classify. The ViT inside it (found
    automatically, or ``vit``) supplies the attention layers, the token layout and the patch grid. Each call resolves
    the model ([`resolve_model`][gmar_lightning.resolve.resolve_model]); to explain one model many times, resolve it
    once and pass the [`ResolvedModel`][gmar_lightning.resolve.ResolvedModel].

    Args:
        model: A module whose forward maps ``images`` to logits ``[B, C]`` (a tensor, or an output with ``.logits``
            as transformers classifiers return) and holds a ViT: a timm model of a supported family, a supported
            Hugging Face transformers ViT (see [`families.hf`][gmar_lightning.families.hf]), or any model whose
            attention an [`AttentionAdapter`][gmar_lightning.capture.AttentionAdapter] reaches. ``torch.compile``d
            models are explained through their eager module. A ViT without a classifier (``num_classes=0``,
            ``num_labels=0``, a bare transformers backbone) is refused: its outputs are features, not classes.
            Or a [`ResolvedModel`][gmar_lightning.resolve.ResolvedModel] of one.
        images: ``[B, C, H, W]`` float batch, normalised as the model expects; or a NaFlex batch (images of
            different sizes as patch sequences padded to one length; see
            [`NaFlexBatch`][gmar_lightning.naflex.NaFlexBatch]): for a timm NaFlexViT (which takes image tensors too)
            a dict of ``patches``, ``patch_coord`` and ``patch_valid``, for transformers' SigLIP 2 (which takes only
            these) the ``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes`` of ``Siglip2ImageProcessor``;
            explained with padding in no attention row or column and each image on its own grid
            (``Explanation.grid_sizes``).
        method: One of ``"gmar_l1"``, ``"gmar_l2"``, ``"rollout"``, ``"grad_rollout"``, ``"attention"``.
        target: Class to explain: ``None`` for the predicted class, an ``int`` for all images, or a ``[B]`` tensor.
        residual: Weight of the identity added to each layer's fused attention before renormalising rows
            (GMAR and rollout).
        head_norm: ``"layer"`` normalises head scores over each layer's heads, ``"global"`` over all layers and
            heads (GMAR only).
        discard_ratio: Fraction of each layer's lowest fused-attention entries zeroed before the rollout, keeping the
            read-out tokens' diagonal entries (GMAR and rollout).
        start_layer: First layer (0-based) included in the rollout (all methods but ``attention``).
        chunk_size: Explain at most this many images per pass, to bound memory; results are identical.
        token_layout: Override the inferred prefix tokens and read-out (see
            [`TokenLayout`][gmar_lightning.tokens.TokenLayout]).
        memory_budget: Bytes of attention-sized buffers to hold at once (micro-batches and query-row chunks are
            sized to fit); ``None``: a training step's estimated activations. Capped by the device's free memory
            (CUDA) or available memory (CPU, Linux ``MemAvailable``).
        recompute_attention: Keep fused attention and recompute what each method needs in query-row chunks where
            the model allows (timm ViT attention); ``None``: where the materialised path would not fit the budget
            in one pass; ``False`` materialises every layer's probabilities.
        vit: The ViT inside ``model`` whose attention is explained. Default: the outermost ViT found in ``model``
            (with a warning that names them all if there are several, as in teacher-student set-ups).

    The keyword options but ``vit`` are the fields of [`ExplainOptions`][gmar_lightning.options.ExplainOptions],
    which checks them.

    Returns:
        An [`Explanation`][gmar_lightning.explanation.Explanation] with token maps, upsampled maps in ``[0, 1]``,
        targets, logits and, for GMAR, head weights and scores ``[B, L, H]``: ``H`` is the largest head count of any
        layer, and heads a layer does not have (removed by [`prune_heads`][gmar_lightning.heads.pruning.prune_heads], or
        fewer in an early Swin or PVT stage) are NaN.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
        >>> result = explain(vit, torch.randn(2, 3, 32, 32), method="gmar_l1")
        >>> result.token_maps.shape, result.maps.shape, result.head_weights.shape
        (torch.Size([2, 4, 4]), torch.Size([2, 32, 32]), torch.Size([2, 2, 4]))
        >>> torch.allclose(result.head_weights.sum(-1), torch.ones(2, 2))
        True
    """
    check_choice("method", method, tuple(METHOD_TABLE))
    options = ExplainOptions(
        residual, head_norm, discard_ratio, start_layer, chunk_size, token_layout, memory_budget, recompute_attention
    )
    return _explain(model, images, (METHOD_TABLE[method],), target, options, vit)[0]


def explain_many(
    model: nn.Module | ResolvedModel,
    images: Tensor | Mapping[str, Tensor],
    methods: Sequence[str] = ("gmar_l1", "grad_rollout"),
    target: Target = None,
    *,
    residual: float = 0.5,
    head_norm: str = "layer",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    chunk_size: int | None = None,
    token_layout: TokenLayout | None = None,
    memory_budget: int | None = None,
    recompute_attention: bool | None = None,
    vit: nn.Module | None = None,
) -> dict[str, Explanation]:
    """Explain a batch with several methods from one forward and at most one backward pass.

    GMAR's head scores and ``grad_rollout``'s relevance ``(grad A * A)^+`` both come from the same attention ``A`` and
    its gradient, so every method reduces what one pass captured. The pass takes ``explain``'s recomputed path (fused
    attention kept, each layer reduced from ``q``, ``k``, ``v`` and ``dy/dO`` in blocks) where every method in
    ``methods`` would take it alone, and materialises the attention probabilities otherwise. Each result equals
    [`explain`][gmar_lightning.engine.explain] with that method alone to float rounding; the arguments are
    ``explain``'s.

    Args:
        model: As for ``explain``.
        images: As for ``explain``.
        methods: Distinct names of [`METHODS`][gmar_lightning.explanation.METHODS].
        target: As for ``explain``: the same classes for every method.
        residual: As for ``explain``.
        head_norm: As for ``explain``.
        discard_ratio: As for ``explain``.
        start_layer: As for ``explain``.
        chunk_size: As for ``explain``: one forward and one backward pass per chunk.
        token_layout: As for ``explain``.
        memory_budget: As for ``explain``: sizes the micro-batches.
        recompute_attention: As for ``explain``; the recomputed path needs every method to allow it.
        vit: As for ``explain``.

    Returns:
        Method name -> its [`Explanation`][gmar_lightning.explanation.Explanation], in the order of ``methods``.

    Examples:
        >>> import timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
        >>> results = explain_many(vit, torch.randn(2, 3, 32, 32), ("gmar_l1", "grad_rollout"))
        >>> list(results), results["gmar_l1"].head_weights.shape, results["grad_rollout"].head_weights
        (['gmar_l1', 'grad_rollout'], torch.Size([2, 2, 4]), None)
    """
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if not names or len(set(names)) != len(names) or any(name not in METHOD_TABLE for name in names):
        raise ValueError(f"`methods` must be distinct names of {', '.join(METHOD_TABLE)}, got {methods!r}.")
    options = ExplainOptions(
        residual, head_norm, discard_ratio, start_layer, chunk_size, token_layout, memory_budget, recompute_attention
    )
    specs = tuple(METHOD_TABLE[name] for name in names)
    return dict(zip(names, _explain(model, images, specs, target, options, vit), strict=True))


def _explain(
    model: nn.Module | ResolvedModel,
    images: Tensor | Mapping[str, Tensor],
    specs: tuple[Method, ...],
    target: Target,
    options: ExplainOptions,
    vit: nn.Module | None,
) -> list[Explanation]:
    """The checks and the isolated pass shared by `explain` and `explain_many`."""
    resolved = as_resolved(model, vit, options.token_layout)
    images = _check_images(resolved, images, options)
    if isinstance(images, NaFlexBatch):  # one sequence of N patches: a 1 x N grid until each image takes its own
        patch_h, patch_w = resolved.naflex.patch_size
        probe = resolved.probe(images, size=(patch_h, images.length * patch_w))
    else:
        probe = resolved.probe(images)
    check_int_in_range("start_layer", options.start_layer, 0, len(probe.layers) - 1)
    target = _check_target(target, _batch_size(images))
    needs_gradients = any(spec.needs_gradients for spec in specs)
    with resolved.isolated(needs_gradients) as device, resharded(resolved.classifier):
        return _explain_batch(resolved, probe, images.to(device), specs, target, options)


def _explain_batch(
    resolved: ResolvedModel,
    probe: Probe,
    images: Tensor | NaFlexBatch,
    specs: tuple[Method, ...],
    target: Target,
    options: ExplainOptions,
) -> list[Explanation]:
    """Explain ``images`` in chunks and roll out each method; runs inside `ResolvedModel.isolated`."""
    # Feed the parameters' dtype: autocast is off, so a bf16-true model gets bf16 inputs; reductions are float32.
    dtype = resolved.dtype
    batch = _batch_size(images)
    naflex = isinstance(images, NaFlexBatch)
    budget = _memory_budget(probe, batch, options, images.device)
    # One method or several (each reduces the same q, k, v and dy/dO) may take the recomputed path.
    # The recomputed path's softmax from q and k knows no padding mask: NaFlex batches take the materialised path.
    recomputed = (
        not naflex
        and all(recompute.applies(probe, method, options) for method in specs)
        and (options.recompute_attention or _micro_batch(probe, batch, budget, recomputed=False) < batch)
    )
    step = options.chunk_size or _micro_batch(probe, batch, budget, recomputed)
    estimate = recompute.per_image_bytes(probe)
    if recomputed and budget is not None and estimate is not None:  # the row blocks get what the forward leaves
        budget = max(budget - min(step, batch) * estimate.recomputed, 1)
    chunk_options = dataclasses.replace(options, memory_budget=budget)
    # The plan's index tensors go to the device once per call rather than once per layer and use.
    probe = dataclasses.replace(probe, plan=probe.plan.to(images.device))
    if naflex:  # each image reads only its own tokens
        probe = _padded_probe(probe, images)
    per_chunk = []
    # The recomputed path keeps fused attention: no module's attention flags are switched.
    with resolved.switches(probe, any(spec.needs_gradients for spec in specs), keep_fused=recomputed):
        for start in range(0, batch, step):
            chunk_target = target[start : start + step] if isinstance(target, Tensor | Sequence) else target
            if naflex:
                chunk_images = images[start : start + step]
                chunk_probe = dataclasses.replace(
                    probe, plan=dataclasses.replace(probe.plan, readout=probe.plan.readout[start : start + step])
                )
            else:
                chunk_images, chunk_probe = images[start : start + step].to(dtype=dtype), probe
            if recomputed:
                chunks = _explain_chunk_recomputed(resolved, probe, chunk_images, specs, chunk_target, chunk_options)
            else:
                chunks = _explain_chunk(resolved, chunk_probe, chunk_images, specs, chunk_target, chunk_options)
            per_chunk.append(chunks)
    return [
        _rolled_out(resolved, probe, images, method, [chunks[index] for chunks in per_chunk], options)
        for index, method in enumerate(specs)
    ]


def _rolled_out(
    resolved: ResolvedModel,
    probe: Probe,
    images: Tensor | NaFlexBatch,
    method: Method,
    chunks: list[_Chunk],
    options: ExplainOptions,
) -> Explanation:
    """One method's explanation from its chunks: head weights, the rollout and the upsampled maps."""
    batch = _batch_size(images)
    logits = _joined([chunk.logits for chunk in chunks])
    targets = _joined([chunk.targets for chunk in chunks])
    plan = probe.plan
    weights = scores = shares = None
    if method.weighs_heads:
        # Weights are normalised per image, so the chunks' weights are those of the whole batch.
        per_layer = [_joined([chunk.scores[i] for chunk in chunks]) for i in range(len(probe.layers))]
        layer_weights = [_joined([chunk.weights[i] for chunk in chunks]) for i in range(len(probe.layers))]
        if options.head_norm == "global":
            shares = methods.layer_shares(torch.stack([part.sum(dim=1) for part in per_layer], dim=1)[..., None])
            layer_weights = [w * shares[:, i, None] for i, w in enumerate(layer_weights)]
        scores, weights = _head_grid(probe, per_layer), _head_grid(probe, layer_weights)
    if chunks[0].rows is not None:  # rolled out inside the backward pass
        rows = _joined([chunk.rows for chunk in chunks])
    else:
        matrices = [
            _joined([chunk.matrices[i] for chunk in chunks]) if chunks[0].matrices[i] is not None else None
            for i in range(len(probe.layers))
        ]
        if method.propagate == "last_layer":
            rows = methods.propagate_last_attention(plan, matrices[-1])
        else:
            update = _layer_update(method, plan, options, shares)
            rows = methods.propagate(
                plan, lambda layer, mixing, row: update(layer, mixing, row, matrices[layer]), batch, images.device
            )

    grid_sizes = None
    if isinstance(images, NaFlexBatch):
        token_maps = images.token_maps(rows[:, plan.num_prefix_tokens :])
        maps = images.maps(token_maps, resolved.naflex.patch_size)
        grid_sizes = images.grid_sizes()
    else:
        token_maps = rows[:, plan.num_prefix_tokens :].reshape(batch, *plan.grid)
        upsampled = F.interpolate(token_maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = methods.normalize_maps(upsampled.squeeze(1))
    _raise_flagged(resolved.classifier, torch.stack([chunk.flags for chunk in chunks]), targets, logits.shape[1])
    return Explanation(
        method=method.name,
        token_maps=token_maps,
        maps=maps,
        targets=targets,
        logits=logits,
        head_weights=weights,
        head_scores=scores,
        layer_names=list(probe.layer_names),
        options=options,
        grid_sizes=grid_sizes,
    )
