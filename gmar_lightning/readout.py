"""The read-out check: which of the last block's tokens a classifier's logits read, from the gradient that enters them.

A head of the user's own on a backbone's tokens may pool them otherwise than the backbone's family assumes (a mean of
the patch tokens where the class token is assumed). Such a map would be silently wrong, so the read-out is checked
once per resolution: one forward and backward pass of one image, with the last attention block's output hidden
states hooked. The tokens with a non-zero gradient there are the tokens the logits read; everything after the last
block acts on each token alone, except the pooling. When they match a linear pooling (one or more prefix tokens, the
mean of the patch tokens, the mean of all tokens, the class token beside the patch mean) that pooling is the
read-out; swapping two pooled tokens in the hidden states and seeing the logits unchanged confirms a mean. Anything
else is refused in one line. When the logits are read through the ViT's attention pool (``Family.attention_pool``),
the pool's attention is the read-out, as the family maps it. docs/method.md states the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import torch
from torch import Tensor, nn

from gmar_lightning import families
from gmar_lightning.families import UnsupportedModelError
from gmar_lightning.model_state import eval_mode_without_fast_paths
from gmar_lightning.naflex import NaFlexBatch
from gmar_lightning.tokens import TokenLayout

if TYPE_CHECKING:
    from gmar_lightning.resolve import ResolvedModel

__all__ = ["UNDECIDED", "checked_readout", "last_block"]

UNDECIDED: Final = object()
"""The check could not decide (non-finite logits or gradients, no token read): the family's read-out is used for this
call, the engine's own checks report the cause, and the next call checks again."""


def last_block(vit: nn.Module, attention_name: str) -> nn.Module | None:
    """The block that holds the attention module ``attention_name``: its outermost ancestor that is an item of a
    ``ModuleList`` or ``Sequential`` (timm ``blocks.11``, transformers ``encoder.layer.11``), or ``None``."""
    parts = attention_name.split(".")
    for depth in range(1, len(parts)):
        if isinstance(vit.get_submodule(".".join(parts[: depth - 1])), nn.ModuleList | nn.Sequential):
            return vit.get_submodule(".".join(parts[:depth]))
    return None


def _tensors(output: object) -> list[Tensor]:
    """The tensors of a module's output: the tensor itself, or those of a tuple."""
    parts = output if isinstance(output, tuple) else (output,)
    return [part for part in parts if isinstance(part, Tensor) and part.requires_grad]


def _hidden(output: object) -> Tensor | None:
    """The hidden states ``[B, N, D]`` of a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple) and output:
        output = output[0]
    return output if isinstance(output, Tensor) and output.dim() == 3 else None


class _BlockOutput:
    """Keeps the hidden states ``[B, N, D]`` a block outputs; with ``swap`` set, exchanges two tokens in them first."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.swap: tuple[int, int] | None = None
        self.hidden: Tensor | None = None

    def __call__(self, _module: nn.Module, _inputs: tuple, output: object) -> object:
        hidden = _hidden(output)
        if hidden is None or hidden.shape[1] != self.num_tokens:
            return None
        if self.swap is not None:
            order = torch.arange(self.num_tokens, device=hidden.device)
            first, second = self.swap
            order[first], order[second] = second, first
            hidden = hidden[:, order]
            output = hidden if isinstance(output, Tensor) else (hidden, *output[1:])
        self.hidden = hidden
        return output


def checked_readout(
    resolved: ResolvedModel, image: Tensor | NaFlexBatch
) -> TokenLayout | object | None:  # object: UNDECIDED
    """The read-out of ``resolved``'s classifier as its gradient shows it, for one image ``[1, C, H, W]`` or a
    one-image NaFlex batch whose last slot is padding (`NaFlexBatch.alone_with_padding`).

    Returns:
        ``None`` when it is the family's own read-out (or the check cannot reach the ViT's last block), the
        `TokenLayout` it is when not, or `UNDECIDED`.

    Raises:
        UnsupportedModelError: The logits read the tokens in no linear pooling, or read padding slots; the one-line
            message names the fix.
    """
    naflex = isinstance(image, NaFlexBatch)
    if naflex:  # one sequence of patches: a 1 x N grid
        patch_h, patch_w = resolved.naflex.patch_size
        size = (patch_h, image.length * patch_w)
    else:
        size = (int(image.shape[-2]), int(image.shape[-1]))
    assumed = families.probe(resolved.vit, size, None, resolved.family)
    grid = assumed.plan.grid
    num_prefix = assumed.plan.num_prefix_tokens
    num_tokens = num_prefix + grid[0] * grid[1]  # one token space throughout: a single-sequence ViT
    # The image's own tokens; a NaFlex sample's padding slots follow them.
    own_tokens = num_prefix + int(image.valid.sum()) if naflex else num_tokens
    # The last block: an attention pool after the blocks, the plan's last layer then, is in no block.
    blocks = (last_block(resolved.vit, layer[0].name) for layer in reversed(assumed.layers))
    block = next((block for block in blocks if block is not None), None)
    if block is None:  # no block to hook: the check does not apply
        return None
    tap = _BlockOutput(num_tokens)
    handles = [block.register_forward_hook(tap)]
    pool_outputs: list[Tensor] = []
    pool = resolved.family.attention_pool(resolved.vit)
    if pool is not None:
        handles.append(pool.register_forward_hook(lambda _m, _i, output: pool_outputs.extend(_tensors(output))))
    try:
        with resolved.isolated(True) as device, eval_mode_without_fast_paths(resolved.classifier, [], True):
            if naflex:
                inputs = image.to(device).inputs(resolved.dtype, requires_grad=True)
            else:
                inputs = image.to(device=device, dtype=resolved.dtype).clone().requires_grad_(True)
            logits = resolved.logits(inputs).float()
            if tap.hidden is None:  # the forward does not run the block (the engine says so), or not as [B, N, D]
                return None
            gradient, *pooled = torch.autograd.grad(logits.sum(), [tap.hidden, *pool_outputs], allow_unused=True)
            if gradient is None:  # the logits do not depend on the ViT's tokens
                return None
            norms = gradient[0].float().norm(dim=-1)
            finite = torch.isfinite(norms).all() & torch.isfinite(logits).all()
            # Whether the logits read the attention pool: its read-out is then the family's, the pool's attention.
            through_pool = sum((part.abs().sum() for part in pooled if part is not None), norms.new_zeros(()))
            *values, ok, via_pool = torch.cat([norms, finite[None].float(), through_pool[None]]).tolist()  # one read
            if not ok:
                return UNDECIDED
            if via_pool > 0:
                return None
            tolerance = torch.finfo(resolved.dtype).eps ** 0.5 * logits.abs().max().clamp_min(1e-12)

            def unchanged_by_swap(first: int, second: int) -> bool:
                """Whether exchanging two tokens of the last block's output leaves the logits as they are."""
                tap.swap = (first, second)
                try:
                    with torch.no_grad():
                        swapped = resolved.logits(inputs).float()
                finally:
                    tap.swap = None
                return bool((swapped - logits.detach()).abs().max() <= tolerance)

            read = {index for index, norm in enumerate(values) if norm > 0}
            if any(index >= own_tokens for index in read):
                raise UnsupportedModelError(
                    f"`model` ({type(resolved.classifier).__name__}) reads the padding slots of its NaFlex batch "
                    "through its ViT's last block, so its logits depend on how much padding an image gets; mask the "
                    "padding out of your head's pooling (as Siglip2ForImageClassification does with "
                    "pixel_attention_mask)."
                )
            observed = _observed(read, num_prefix, own_tokens, unchanged_by_swap)
    finally:
        for handle in handles:
            handle.remove()
    if observed is UNDECIDED:
        return UNDECIDED
    if isinstance(observed, str):
        raise UnsupportedModelError(
            f"`model` ({type(resolved.classifier).__name__}) reads {observed}: none of the read-outs gmar-lightning "
            "infers (prefix tokens, a mean of the patch or of all tokens, the class token beside the patch mean); pass "
            "`token_layout=TokenLayout(...)` to state it (docs/method.md)."
        )
    family_readout = assumed.plan.readout.cpu()
    if torch.equal(observed.readout_vector(num_tokens, 1)[0], family_readout):
        return None
    return observed


def _observed(
    read: set[int], num_prefix: int, num_tokens: int, unchanged_by_swap: Callable[[int, int], bool]
) -> TokenLayout | str | object:
    """The linear pooling that reads the tokens ``read``; else what the logits read, as a phrase for the refusal
    (`UNDECIDED` when they read no token)."""
    if not read:
        return UNDECIDED
    patches = set(range(num_prefix, num_tokens))
    prefix = tuple(sorted(read - patches))
    if not read & patches:  # one or more prefix tokens: their rows' mean (a distilled DeiT averages two heads)
        return TokenLayout(num_prefix, prefix)
    if not patches <= read:
        return f"only {len(read & patches)} of the {len(patches)} patch tokens of its ViT's last block"
    if len(patches) > 1 and not unchanged_by_swap(num_prefix, num_tokens - 1):
        # e.g. a head on the flattened tokens
        return (
            f"all {len(patches)} patch tokens of its ViT's last block, but not through their mean (exchanging two "
            "changes the logits)"
        )
    if not prefix:
        return TokenLayout(num_prefix, None)
    if len(prefix) == num_prefix and unchanged_by_swap(0, num_prefix):
        return TokenLayout(num_prefix, None, pool_includes_prefix=True)
    return TokenLayout(num_prefix, prefix, with_patch_mean=True)
