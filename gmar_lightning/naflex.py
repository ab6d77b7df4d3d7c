"""NaFlex batches: variable-resolution input, each image a sequence of patches padded to one length.

Two libraries spell the same batch differently:

- timm's NaFlexViT takes a dict of ``patches`` ``[B, N, P*P*C]`` (or ``[B, N, Ph, Pw, C]``), ``patch_coord``
  ``[B, N, 2]`` (the ``(y, x)`` grid cell of each patch) and ``patch_valid`` ``[B, N]`` (False: padding), as timm's
  NaFlex collator builds it.
- transformers' SigLIP 2 (``Siglip2VisionModel``, ``Siglip2ForImageClassification``) takes ``pixel_values``
  ``[B, N, P*P*C]``, ``pixel_attention_mask`` ``[B, N]`` (0: padding) and ``spatial_shapes`` ``[B, 2]`` (each image's
  grid ``(h, w)``), as ``Siglip2ImageProcessor`` builds it: an image's ``h * w`` patches come first, in row-major
  order, then the padding, and the model places patch ``i`` at cell ``(i // w, i % w)``.

Both models mask padding out of every attention (no query row, no key column) and out of their pooling; the engine
does the same with the attention it reads (docs/method.md, NaFlex batches) and places each image's map on its own
grid, ``(max y + 1, max x + 1)`` of its valid patches (SigLIP 2: its ``spatial_shapes``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmar_lightning.methods import normalize_maps
from gmar_lightning.mixing import AttentionMixing, AttentionReadout

__all__ = [
    "TIMM",
    "TRANSFORMERS",
    "NaFlexBatch",
    "NaFlexFormat",
    "call_model",
    "is_naflex_batch",
    "is_naflex_vit",
    "keys_of",
    "naflex_part",
    "pad_cat",
]

TIMM = ("patches", "patch_coord", "patch_valid")
"""timm's keys of a NaFlex batch: patches, their ``(y, x)`` cells, and which are valid."""
TRANSFORMERS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
"""transformers' keys (SigLIP 2): patches, which are valid, and each image's grid ``(h, w)``."""


@dataclass(frozen=True)
class NaFlexFormat:
    """How a model takes NaFlex batches.

    Args:
        keys: `TIMM` or `TRANSFORMERS`.
        patch_size: ``(Ph, Pw)`` pixels per patch.
        channels: Image channels per patch pixel, or ``None`` when the model does not say.
        takes_images: Whether the model also takes images ``[B, C, H, W]`` (timm's NaFlexViT patchifies them itself;
            SigLIP 2 takes patch sequences only).
    """

    keys: tuple[str, str, str]
    patch_size: tuple[int, int]
    channels: int | None
    takes_images: bool

    def describe(self) -> str:
        """The dict this format names, for messages."""
        if self.keys == TRANSFORMERS:
            return (
                "the dict of 'pixel_values' [B, N, C*P*P], 'pixel_attention_mask' [B, N] and 'spatial_shapes' [B, 2] "
                "that Siglip2ImageProcessor returns"
            )
        return "a dict of 'patches' [B, N, P*P*C], 'patch_coord' [B, N, 2] and 'patch_valid' [B, N] (timm's collator)"


def is_naflex_batch(images: object) -> bool:
    """Whether ``images`` is a NaFlex dict in either spelling: it holds a key that only NaFlex batches use."""
    return isinstance(images, Mapping) and any(key in images for key in (*TIMM[1:], *TRANSFORMERS[1:]))


def keys_of(batch: Mapping) -> tuple[str, str, str]:
    """The spelling of a NaFlex dict: `TRANSFORMERS` when it holds one of their keys, else `TIMM`."""
    return TRANSFORMERS if any(key in batch for key in TRANSFORMERS) else TIMM


def naflex_part(batch: Mapping, limit: int | None = None) -> dict[str, Tensor]:
    """The NaFlex tensors of a batch dict (its own spelling's keys; ``labels`` and others left out), each sliced to
    its first ``limit`` images."""
    return {key: batch[key][:limit] for key in keys_of(batch) if isinstance(batch.get(key), Tensor)}


def pad_cat(parts: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """NaFlex dicts of one spelling joined along the batch: sequences padded with zeros (padding in both spellings:
    a zero patch, mask 0 or ``patch_valid`` False, cell ``(0, 0)``) to the longest ``N`` first."""
    keys = keys_of(parts[0])
    length = max(int(part[keys[0]].shape[1]) for part in parts)
    joined = {}
    for key in parts[0]:
        tensors = []
        for part in parts:
            tensor = part[key]
            if key != "spatial_shapes" and tensor.shape[1] < length:
                pad = tensor.new_zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]))
                tensor = torch.cat([tensor, pad], dim=1)
            tensors.append(tensor)
        joined[key] = torch.cat(tensors)
    return joined


def call_model(model: nn.Module, inputs: Mapping[str, Tensor]) -> object:
    """``model``'s output for a NaFlex dict: its keys as keyword arguments when ``model.forward`` names the first
    (transformers' ``model(**processor_output)``; a user's ``forward(pixel_values, pixel_attention_mask,
    spatial_shapes)``), else the dict as the one argument (timm's ``NaFlexVit(batch)``; a user's ``forward(batch)``)."""
    first = next(iter(inputs))
    if first in inspect.signature(model.forward).parameters:
        return model(**inputs)
    return model(dict(inputs))


def is_naflex_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm NaFlexViT (its forward takes NaFlex batches)."""
    from timm.models.naflexvit import NaFlexVit

    return isinstance(model, NaFlexVit)


@dataclass(frozen=True)
class NaFlexBatch:
    """A checked NaFlex batch, in one form whichever library's keys it came with.

    Args:
        patches: ``[B, N, P*P*C]`` or ``[B, N, Ph, Pw, C]`` float patches.
        coord: ``[B, N, 2]`` integer ``(y, x)`` cells.
        valid: ``[B, N]`` bool, False for padding.
        keys: The spelling it came in and is handed to the model in: `TIMM` or `TRANSFORMERS`.
        mask_dtype: The dtype of the given ``pixel_attention_mask`` (transformers), handed back as it came.
    """

    patches: Tensor
    coord: Tensor
    valid: Tensor
    keys: tuple[str, str, str] = TIMM
    mask_dtype: torch.dtype = torch.bool

    @classmethod
    def from_dict(cls, batch: Mapping) -> NaFlexBatch:
        """Check a NaFlex dict in either spelling and keep its tensors.

        Raises:
            TypeError, ValueError: A key is missing, a tensor has the wrong shape or dtype, an image has no valid
                patch, or two valid patches of an image share a cell (SigLIP 2: its valid patches are not the first
                ``h * w`` of its ``spatial_shapes``); one line that names the fix.
        """
        if keys_of(batch) == TRANSFORMERS:
            return cls._from_transformers(batch)
        missing = [key for key in TIMM if not isinstance(batch.get(key), Tensor)]
        if missing:
            raise TypeError(
                f"`images` is a NaFlex batch without tensor(s) {', '.join(map(repr, missing))}; pass a dict of "
                "'patches' [B, N, P*P*C], 'patch_coord' [B, N, 2] and 'patch_valid' [B, N] (timm's NaFlex collator)."
            )
        patches, coord, valid = (batch[key] for key in TIMM)
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

    @classmethod
    def _from_transformers(cls, batch: Mapping) -> NaFlexBatch:
        """`from_dict` for transformers' spelling: the cells follow from ``spatial_shapes`` and the slot order."""
        missing = [key for key in TRANSFORMERS if not isinstance(batch.get(key), Tensor)]
        if missing:
            raise TypeError(
                f"`images` is a NaFlex batch without tensor(s) {', '.join(map(repr, missing))}; pass the dict of "
                "'pixel_values' [B, N, C*P*P], 'pixel_attention_mask' [B, N] and 'spatial_shapes' [B, 2] that "
                "Siglip2ImageProcessor returns (processor(images=..., return_tensors='pt'))."
            )
        patches, mask, shapes = (batch[key] for key in TRANSFORMERS)
        if not patches.is_floating_point() or patches.dim() != 3:
            raise ValueError(
                f"`images['pixel_values']` must be a float tensor [B, N, C*P*P] of patches, got {patches.dtype} "
                f"{list(patches.shape)}; build it with Siglip2ImageProcessor."
            )
        batch_size, length = patches.shape[:2]
        if batch_size == 0:
            raise ValueError("`images` is an empty NaFlex batch; pass at least one image.")
        if mask.shape != (batch_size, length) or mask.is_floating_point() or mask.is_complex():
            raise ValueError(
                f"`images['pixel_attention_mask']` must be an integer or bool tensor [{batch_size}, {length}] (0: "
                f"padding), got {mask.dtype} {list(mask.shape)}."
            )
        if shapes.shape != (batch_size, 2) or shapes.is_floating_point() or shapes.dtype == torch.bool:
            raise ValueError(
                f"`images['spatial_shapes']` must be an integer tensor [{batch_size}, 2] of each image's patch grid "
                f"(h, w), got {shapes.dtype} {list(shapes.shape)}."
            )
        shapes = shapes.long()
        sizes = shapes.prod(dim=1)
        if bool((shapes <= 0).any()) or bool((sizes > length).any()):
            raise ValueError(
                f"`images['spatial_shapes']` {shapes.tolist()} must hold grids of at least one and at most {length} "
                "patches (the sequence length N of 'pixel_values')."
            )
        slots = torch.arange(length, device=mask.device)
        expected = slots[None, :] < sizes.to(mask.device)[:, None]
        if not torch.equal(mask != 0, expected):
            index = int((mask != 0).ne(expected).any(dim=1).nonzero()[0])
            height, width = shapes[index].tolist()
            raise ValueError(
                f"`images['pixel_attention_mask']` of image {index} must mark its first {height * width} patches "
                f"(spatial_shapes [{height}, {width}]) valid and the rest padding, as Siglip2ImageProcessor builds it."
            )
        # Siglip2's position embeddings put slot i of an image of width w at (i // w, i % w), padding at (0, 0).
        widths = shapes[:, 1].to(mask.device)[:, None]
        coord = torch.stack([slots[None, :] // widths, slots[None, :] % widths], dim=-1)
        coord = coord.masked_fill(~expected[..., None], 0)
        return cls(patches, coord, expected, TRANSFORMERS, mask.dtype)

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
        return dataclasses.replace(
            self, patches=self.patches.to(device), coord=self.coord.to(device), valid=self.valid.to(device)
        )

    def __getitem__(self, index: slice) -> NaFlexBatch:
        return dataclasses.replace(self, patches=self.patches[index], coord=self.coord[index], valid=self.valid[index])

    def alone_with_padding(self) -> NaFlexBatch:
        """The first image alone, its valid patches first, then one padding slot (zeros at cell ``(0, 0)``): the
        read-out check's input, which shows whether a head reads padding."""
        own = self.valid[0]
        patches = torch.cat([self.patches[0, own], torch.zeros_like(self.patches[0, :1])])
        coord = torch.cat([self.coord[0, own], torch.zeros_like(self.coord[0, :1])])
        valid = torch.cat([own[own], torch.zeros_like(own[:1])])
        return dataclasses.replace(self, patches=patches[None], coord=coord[None], valid=valid[None])

    def inputs(self, dtype: torch.dtype, requires_grad: bool) -> dict[str, Tensor]:
        """The dict the model's forward takes, in the batch's spelling; the patches in ``dtype``, a fresh leaf
        (``requires_grad``)."""
        patches = self.patches.to(dtype=dtype).clone().requires_grad_(requires_grad)
        if self.keys == TRANSFORMERS:
            mask = self.valid.to(self.mask_dtype)
            return dict(zip(TRANSFORMERS, (patches, mask, self.grid_sizes()), strict=True))
        return dict(zip(TIMM, (patches, self.coord, self.valid), strict=True))

    def images(self, patch_size: tuple[int, int]) -> list[Tensor]:
        """Each image ``[C, h * Ph, w * Pw]`` rebuilt from its valid patches on its own grid, the inverse of both
        libraries' patchify (a patch's pixels in ``(y, x, channel)`` order); a cell no valid patch fills is 0.

        Args:
            patch_size: ``(Ph, Pw)`` pixels per patch (needed for flat ``[B, N, P*P*C]`` patches).
        """
        patch_h, patch_w = patch_size
        patches = self.patches.reshape(self.batch_size, self.length, patch_h, patch_w, -1)
        rebuilt = []
        for index, (height, width) in enumerate(self.grid_sizes().tolist()):
            own = self.valid[index]
            grid = patches.new_zeros(height, width, patch_h, patch_w, patches.shape[-1])
            cells = self.coord[index, own]
            grid[cells[:, 0], cells[:, 1]] = patches[index, own]
            rebuilt.append(grid.permute(4, 0, 2, 1, 3).reshape(-1, height * patch_h, width * patch_w))
        return rebuilt

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
