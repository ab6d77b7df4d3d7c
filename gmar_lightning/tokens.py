"""Where the patch tokens are in a ViT's sequence, which tokens the classifier reads, and the patch grid.

timm puts prefix tokens first: the class token, then a distillation token (DeiT) or register tokens, then the patch
tokens in row-major order. The classifier reads the class token (``global_pool="token"``), the mean of class and
distillation token (distilled DeiT), or the mean of the patch tokens (``global_pool="avg"``, the default of BEiT and
EVA). A [`TokenLayout`][gmar_lightning.tokens.TokenLayout] states this explicitly;
[`infer_token_layout`][gmar_lightning.tokens.infer_token_layout] reads it off timm's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmar_lightning._checks import check_non_negative_int

__all__ = ["TokenLayout", "infer_token_layout", "patch_embedding", "patch_grid"]


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence of a ViT as the read-out of an explanation needs it.

    Args:
        num_prefix_tokens: Tokens before the patch tokens (class, distillation, register tokens).
        readout_tokens: Indices of the tokens whose rows are averaged for the read-out, or ``None`` for the mean
            of the patch tokens (average pooling).
        pool_includes_prefix: With average pooling, whether the prefix tokens are part of the mean.
        with_patch_mean: The classifier reads the ``readout_tokens`` and, beside them, the mean of the patch tokens
            (Dinov2's head reads ``[class token, mean of patch tokens]``); the read-out averages the tokens' rows and
            the mean patch row as equal parts.

    Examples:
        >>> TokenLayout(num_prefix_tokens=1).readout_vector(num_tokens=5, batch_size=1).tolist()
        [[1.0, 0.0, 0.0, 0.0, 0.0]]
        >>> TokenLayout(num_prefix_tokens=1, readout_tokens=None).readout_vector(5, 1).tolist()
        [[0.0, 0.25, 0.25, 0.25, 0.25]]
        >>> TokenLayout(num_prefix_tokens=1, with_patch_mean=True).readout_vector(5, 1).tolist()
        [[0.5, 0.125, 0.125, 0.125, 0.125]]
    """

    num_prefix_tokens: int = 1
    readout_tokens: tuple[int, ...] | None = (0,)
    pool_includes_prefix: bool = False
    with_patch_mean: bool = False

    def __post_init__(self) -> None:
        check_non_negative_int("num_prefix_tokens", self.num_prefix_tokens)
        if self.readout_tokens is not None:
            # A negative index would silently read a patch token from the end of the sequence.
            if isinstance(self.readout_tokens, str | int) or not self.readout_tokens:
                raise ValueError(
                    f"`readout_tokens` must be a non-empty tuple of token indices or None, got {self.readout_tokens!r}."
                )
            for index in self.readout_tokens:
                check_non_negative_int("readout_tokens", index)
        if not isinstance(self.pool_includes_prefix, bool):
            raise TypeError(f"`pool_includes_prefix` must be a bool, got {self.pool_includes_prefix!r}.")
        if not isinstance(self.with_patch_mean, bool):
            raise TypeError(f"`with_patch_mean` must be a bool, got {self.with_patch_mean!r}.")

    def _pooled_patch_indices(self, num_tokens: int) -> Tensor:
        first = 0 if self.pool_includes_prefix else self.num_prefix_tokens
        return torch.arange(first, num_tokens)

    def readout_indices(self, num_tokens: int) -> Tensor:
        """Indices of the tokens the classifier pools."""
        if self.readout_tokens is None:
            return self._pooled_patch_indices(num_tokens)
        tokens = torch.tensor(self.readout_tokens, dtype=torch.long)
        if self.with_patch_mean:
            return torch.cat([tokens, self._pooled_patch_indices(num_tokens)]).unique()
        return tokens

    def readout_vector(self, num_tokens: int, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """``[B, N]`` the mean of the one-hot rows of the pooled tokens (and of the mean patch row, if read too)."""
        vector = torch.zeros(num_tokens, device=device)
        if self.readout_tokens is None:
            vector[self._pooled_patch_indices(num_tokens).to(device)] = 1.0
        else:
            vector[torch.tensor(self.readout_tokens, device=device)] = 1.0
            if self.with_patch_mean:
                patches = self._pooled_patch_indices(num_tokens).to(device)
                vector[patches] += 1.0 / len(patches)
        return (vector / vector.sum()).expand(batch_size, num_tokens)


def infer_token_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout off a timm ViT (VisionTransformer, DeiT, BEiT, EVA and their relatives).

    Raises:
        ValueError: If the model's pooling has no linear read-out (attention pooling, max pooling), or the model does
            not say how many prefix tokens it has (pass ``token_layout=TokenLayout(...)`` to ``explain`` then).
    """
    model_name = type(model).__name__
    num_prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(num_prefix, int):
        raise ValueError(
            f"`model` ({model_name}) has no integer `num_prefix_tokens`; pass `token_layout=TokenLayout(...)` to say "
            "which tokens are prefix tokens and which the classifier reads."
        )
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is not None:
        if pool == "map":
            raise ValueError(
                f"`model` ({model_name}) reads its tokens through its attention pool (global_pool='map'), not through "
                "a token layout; explain reads the pool's attention itself (docs/method.md, Attention pooling)."
            )
        raise ValueError(
            f"`model` ({model_name}) pools with global_pool={pool!r}, an attention pool that refines every token with "
            "a parameter-free self-attention without a skip connection (PRR), which gmar-lightning does not map yet; "
            "create it with global_pool='token', 'avg' or 'map'."
        )
    if getattr(model, "dist_token", None) is not None:
        return TokenLayout(num_prefix_tokens=num_prefix, readout_tokens=(0, 1))
    if pool == "token":
        if getattr(model, "cls_token", True) is None:
            raise ValueError(f"`model` ({model_name}) reads a class token it does not have; use global_pool='avg'.")
        return TokenLayout(num_prefix_tokens=num_prefix, readout_tokens=(0,))
    if pool == "avg":
        includes_prefix = bool(getattr(model, "pool_include_prefix", False))
        return TokenLayout(num_prefix_tokens=num_prefix, readout_tokens=None, pool_includes_prefix=includes_prefix)
    raise ValueError(
        f"`model` ({model_name}) uses global_pool={pool!r}, which has no linear read-out for rollout; "
        "create it with global_pool='token', 'avg' or 'map'."
    )


def patch_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` a timm ViT produces for an image of ``image_size`` (non-square sizes included)."""
    patch_embed = patch_embedding(model)
    if hasattr(patch_embed, "dynamic_feat_size"):
        height, width = patch_embed.dynamic_feat_size(image_size)
        return int(height), int(width)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no `patch_embed.patch_size` to tell its patch grid, so its maps "
            "cannot be placed on the image; see docs/supported_models.md for the supported models."
        )
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    return image_size[0] // patch_h, image_size[1] // patch_w


def patch_embedding(model: nn.Module) -> nn.Module | None:
    """A timm ViT's patch embedding: ``patch_embed``, or NaFlexViT's ``embeds`` (``None`` if it has neither)."""
    embedding = getattr(model, "patch_embed", None)
    return embedding if embedding is not None else getattr(model, "embeds", None)
