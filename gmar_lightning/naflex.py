"""NaFlex batches: timm NaFlexViT's variable-resolution input, each image a sequence of patches padded to one length.

A NaFlex batch is a dict of ``patches`` ``[B, N, P*P*C]`` (or ``[B, N, Ph, Pw, C]``), ``patch_coord`` ``[B, N, 2]``
(the ``(y, x)`` grid cell of each patch) and ``patch_valid`` ``[B, N]`` (False: padding), as timm's NaFlex collator
builds it. NaFlexViT masks padding out of every attention (no query row, no key column) and out of its pooling; the
engine does the same with the attention it reads (docs/method.md, NaFlex batches) and places each image's map on its
own grid, ``(max y + 1, max x + 1)`` of its valid patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmar_lightning.methods import normalize_maps
from gmar_lightning.mixing import AttentionMixing, AttentionReadout

__all__ = ["NaFlexBatch", "is_naflex_vit"]

_KEYS = ("patches", "patch_coord", "patch_valid")


def is_naflex_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm NaFlexViT (its forward takes NaFlex batches)."""
    from timm.models.naflexvit import NaFlexVit

    return isinstance(model, NaFlexVit)


@dataclass(frozen=True)
class NaFlexBatch:
    """A checked NaFlex batch.

    Args:
        patches: ``[B, N, P*P*C]`` or ``[B, N, Ph, Pw, C]`` float patches.
        coord: ``[B, N, 2]`` integer ``(y, x)`` cells.
        valid: ``[B, N]`` bool, False for padding.
    """

    patches: Tensor
    coord: Tensor
    valid: Tensor

    @classmethod
    def from_dict(cls, batch: Mapping) -> NaFlexBatch:
        """Check a NaFlex dict and keep its three tensors.

        Raises:
            TypeError, ValueError: A key is missing, a tensor has the wrong shape or dtype, an image has no valid
                patch, or two valid patches of an image share a cell; one line that names the fix.
        """
        missing = [key for key in _KEYS if not isinstance(batch.get(key), Tensor)]
        if missing:
            raise TypeError(
                f"`images` is a NaFlex batch without tensor(s) {', '.join(map(repr, missing))}; pass a dict of "
                "'patches' [B, N, P*P*C], 'patch_coord' [B, N, 2] and 'patch_valid' [B, N] (timm's NaFlex collator)."
            )
        patches, coord, valid = (batch[key] for key in _KEYS)
        if not patches.is_floating_point() or patches.dim() not in (3, 5):
            raise ValueError(
                f"`images['patches']` must be a float tensor [B, N, P*P*C], got {patches.dtype} {list(patches.shape)}."
            )
        batch_size, length = patches.shape[:2]
        if batch_size == 0:
            raise ValueError("`images` is an empty NaFlex batch; pass at least one image.")
        if coord.shape != (batch_size, length, 2) or coord.is_floating_point() or coord.dtype == torch.bool:
            raise ValueError(
                f"`images['patch_coord']` must be an integer tensor [{batch_size}, {length}, 2] of (y, x) cells, got "
                f"{coord.dtype} {list(coord.shape)}."
            )
        if valid.shape != (batch_size, length) or valid.dtype != torch.bool:
            raise ValueError(
                f"`images['patch_valid']` must be a bool tensor [{batch_size}, {length}] (False: padding), got "
                f"{valid.dtype} {list(valid.shape)}."
            )
        if bool((valid.sum(dim=1) == 0).any()):
            raise ValueError("`images['patch_valid']` has an image without a valid patch; drop it from the batch.")
        if bool((coord[valid] < 0).any()):
            raise ValueError(
                "`images['patch_coord']` has a negative cell among the valid patches; cells are (y, x) >= 0."
            )
        checked = cls(patches, coord.long(), valid)
        cells, sizes = checked.cells(), checked.grid_sizes()
        for index in range(batch_size):
            taken = cells[index][valid[index]]
            if taken.unique().numel() != taken.numel():
                raise ValueError(
                    f"`images['patch_coord']` puts two valid patches of image {index} (grid {sizes[index].tolist()}) "
                    "on one cell; each valid patch needs its own (y, x)."
                )
        return checked

    @property
    def batch_size(self) -> int:
        return int(self.patches.shape[0])

    @property
    def length(self) -> int:
        """``N``, the padded sequence length in patches."""
        return int(self.patches.shape[1])

    @property
    def device(self) -> torch.device:
        return self.patches.device

    def to(self, device: torch.device | str) -> NaFlexBatch:
        return NaFlexBatch(self.patches.to(device), self.coord.to(device), self.valid.to(device))

    def __getitem__(self, index: slice) -> NaFlexBatch:
        return NaFlexBatch(self.patches[index], self.coord[index], self.valid[index])

    def inputs(self, dtype: torch.dtype, requires_grad: bool) -> dict[str, Tensor]:
        """The dict NaFlexViT's forward takes; ``patches`` in ``dtype``, a fresh leaf (``requires_grad``)."""
        patches = self.patches.to(dtype=dtype).clone().requires_grad_(requires_grad)
        return {"patches": patches, "patch_coord": self.coord, "patch_valid": self.valid}

    def grid_sizes(self) -> Tensor:
        """``[B, 2]`` each image's grid ``(h, w)``: one more than the largest ``(y, x)`` of its valid patches."""
        masked = self.coord.masked_fill(~self.valid[..., None], -1)
        return masked.amax(dim=1) + 1

    def cells(self) -> Tensor:
        """``[B, N]`` each patch's cell in row-major order on the largest grid of the batch (padding: 0)."""
        width = int(self.grid_sizes()[:, 1].max())
        return (self.coord[..., 0] * width + self.coord[..., 1]).masked_fill(~self.valid, 0)

    def token_valid(self, num_prefix_tokens: int) -> Tensor:
        """``[B, num_prefix_tokens + N]`` True for every prefix token and every valid patch."""
        prefix = self.valid.new_ones(self.batch_size, num_prefix_tokens)
        return torch.cat([prefix, self.valid], dim=1)

    def token_maps(self, patch_rows: Tensor) -> Tensor:
        """``[B, h_max, w_max]`` the patch relevance ``[B, N]`` on each image's grid; NaN outside it and in cells
        that no valid patch fills."""
        height, width = (int(size) for size in self.grid_sizes().amax(dim=0))
        grid = patch_rows.new_full((self.batch_size, height * width), float("nan"))
        images, slots = self.valid.to(patch_rows.device).nonzero(as_tuple=True)
        grid[images, self.cells().to(patch_rows.device)[images, slots]] = patch_rows[images, slots]
        return grid.reshape(self.batch_size, height, width)

    def maps(self, token_maps: Tensor, patch_size: tuple[int, int]) -> Tensor:
        """``[B, h_max * Ph, w_max * Pw]``: each image's token map upsampled bilinearly to its own size
        ``(h * Ph, w * Pw)`` and min-max normalised to ``[0, 1]``; NaN outside the image."""
        patch_h, patch_w = patch_size
        out = token_maps.new_full(
            (self.batch_size, token_maps.shape[1] * patch_h, token_maps.shape[2] * patch_w), float("nan")
        )
        for index, (height, width) in enumerate(self.grid_sizes().tolist()):
            own = token_maps[index, :height, :width].nan_to_num(0.0)  # an unfilled cell counts as no relevance
            size = (height * patch_h, width * patch_w)
            upsampled = F.interpolate(own[None, None], size=size, mode="bilinear", align_corners=False)
            out[index, : size[0], : size[1]] = normalize_maps(upsampled[0, 0])
        return out

    def masks(self, mixings: list[AttentionMixing | AttentionReadout], num_prefix_tokens: int) -> list[Tensor]:
        """Per attention layer, ``[B, 1, n_q, n_k]`` True where both query and key are tokens of the image (a pool's
        latent queries always are): the entries padding takes no part in."""
        tokens = self.token_valid(num_prefix_tokens)
        masks = []
        for mixing in mixings:
            if isinstance(mixing, AttentionReadout):
                keys = tokens if mixing.keys is None else tokens[:, mixing.keys.to(tokens.device)]
                masks.append(keys[:, None, None, :])
            else:
                masks.append((tokens[:, :, None] & tokens[:, None, :])[:, None])
        return masks
