"""The result of one explanation call: a plain dataclass of tensors, no behaviour beyond moving them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from gmar_lightning.methods import METHOD_TABLE
from gmar_lightning.options import ExplainOptions

METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
"""Every method [`gmar_lightning.explain`][gmar_lightning.engine.explain] accepts: the names of
[`METHOD_TABLE`][gmar_lightning.methods.METHOD_TABLE]."""

GMAR_METHODS: tuple[str, ...] = tuple(name for name, method in METHOD_TABLE.items() if method.weighs_heads)
"""The methods that weight heads by gradient norms and so produce head weights and scores."""


@dataclass
class Explanation:
    """Saliency maps and head importance for one batch, as returned by
    [`gmar_lightning.explain`][gmar_lightning.engine.explain].

    All tensors are float32 (targets int64) on the device the model ran on; call `cpu` to move them.

    Attributes:
        method: The method that produced the maps, one of [`METHODS`][gmar_lightning.explanation.METHODS].
        token_maps: ``[B, h, w]`` raw relevance of the patch tokens: the read-out row(s) of the rolled-out matrix
            restricted to patch columns, reshaped to the patch grid and not rescaled.
        maps: ``[B, H_img, W_img]`` token maps bilinearly upsampled to the input size and min-max normalised per
            image to ``[0, 1]`` (an image whose map is constant gets all zeros).
        targets: ``[B]`` the class explained for each image.
        logits: ``[B, C]`` the model's logits for the batch (computed in float32, eval mode).
        head_weights: ``[B, L, H]`` normalised head weights ``w_{l,h}`` (GMAR methods; ``None`` otherwise). Column ``h``
            is each layer's original head ``h``; in a model whose layers lost heads
            ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]) the missing heads are NaN, so a layer's weights
            sum to 1 over the finite entries and ``(~head_weights[0].isnan()).sum(-1)`` is its head count.
        head_scores: ``[B, L, H]`` raw head scores ``s_{l,h}``, the L1 or L2 norm of each head's gradient
            (GMAR methods; ``None`` otherwise), NaN for missing heads likewise.
        layer_names: Qualified module names of the attention layers, in forward order (``L`` entries).
        options: The options the maps were computed with (``token_layout`` as given: ``None`` when inferred).
        grid_sizes: ``[B, 2]`` int64 each image's own patch grid ``(h, w)`` for a NaFlex batch (images of different
            sizes in one padded sequence), else ``None``. ``token_maps`` are then ``[B, h_max, w_max]`` and ``maps``
            ``[B, h_max * P, w_max * P]``, each image's map in its top-left ``(h, w)`` (``(h * P, w * P)``) corner,
            NaN outside it (and in grid cells that no valid patch fills); ``maps`` are normalised per image over its
            own area (docs/method.md, NaFlex batches).

    Examples:
        >>> e = Explanation("rollout", torch.ones(1, 2, 2), torch.zeros(1, 8, 8), torch.tensor([3]), torch.zeros(1, 5))
        >>> e.batch_size, e.grid_size, e.predictions.tolist()
        (1, (2, 2), [0])
    """

    method: str
    token_maps: Tensor
    maps: Tensor
    targets: Tensor
    logits: Tensor
    head_weights: Tensor | None = None
    head_scores: Tensor | None = None
    layer_names: list[str] = field(default_factory=list)
    options: ExplainOptions = field(default_factory=ExplainOptions)
    grid_sizes: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of explained images."""
        return int(self.token_maps.shape[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of the token maps (of a NaFlex batch: the largest; see ``grid_sizes``)."""
        return int(self.token_maps.shape[-2]), int(self.token_maps.shape[-1])

    @property
    def predictions(self) -> Tensor:
        """``[B]`` the predicted class of each image (argmax of the logits)."""
        return self.logits.argmax(dim=-1)

    def to(self, device: torch.device | str) -> Explanation:
        """Return a copy with every tensor moved to ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("token_maps", "maps", "targets", "logits", "head_weights", "head_scores", "grid_sizes")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    def cpu(self) -> Explanation:
        """Return a copy with every tensor on the CPU."""
        return self.to("cpu")
