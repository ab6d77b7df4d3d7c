"""How attention-head importance evolves over training: one record per evaluation and specialisation statistics.

A [`HeadTrajectory`][gmar_lightning.trajectory.HeadTrajectory] stores one ``[L, H]`` row of GMAR head weights (and the
raw gradient-norm scores they were normalised from) per evaluation, keyed by a validation counter, with the global
step and epoch as data (validations inside one gradient-accumulation window share a global step). Column ``h`` is each
layer's original head ``h``: once [`prune_heads`][gmar_lightning.heads.pruning.prune_heads] removes heads, their
entries are NaN from then on, so rows before and after a pruning stay comparable and a layer's head count is its number
of finite entries. [`specialisation`][gmar_lightning.trajectory.specialisation] and
[`rank_stability`][gmar_lightning.trajectory.rank_stability] summarise a row as "how concentrated is each layer on few
heads" and "did the head ranking change since the previous evaluation"; both are plain torch functions so they work on
any
``[L, H]`` tensor, not only on a trajectory.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gmar_lightning._checks import check_non_negative_int
from gmar_lightning._io import atomic_write_bytes, atomic_write_csv

__all__ = [
    "CSV_COLUMNS",
    "TRAJECTORY_CSV",
    "TRAJECTORY_NPZ",
    "TRAJECTORY_STEM",
    "HeadTrajectory",
    "rank_stability",
    "spearman",
    "specialisation",
]

TRAJECTORY_STEM = "head_importance"
"""Stem of a fit's trajectory files; a ``trainer.validate()`` run writes ``head_importance_validate.*``."""

TRAJECTORY_CSV = f"{TRAJECTORY_STEM}.csv"
"""File name of the long-format trajectory table (see
[`HeadTrajectory.save_csv`][gmar_lightning.trajectory.HeadTrajectory.save_csv])."""

TRAJECTORY_NPZ = f"{TRAJECTORY_STEM}.npz"
"""File name of the trajectory arrays (see
[`HeadTrajectory.save_npz`][gmar_lightning.trajectory.HeadTrajectory.save_npz])."""

CSV_COLUMNS: tuple[str, ...] = ("validation", "epoch", "step", "layer", "layer_name", "head", "weight", "score")
"""Header of [`HeadTrajectory.save_csv`][gmar_lightning.trajectory.HeadTrajectory.save_csv]: one row per (evaluation,
layer, head)."""

_STATE_KEYS: tuple[str, ...] = ("epochs", "steps", "weights", "scores", "layer_names")
# Trajectories saved before rows had a validation counter lack it: their rows are numbered 0, 1, ... in order.
_OPTIONAL_STATE_KEYS: tuple[str, ...] = ("validations",)


def _check_head_matrix(name: str, values: Tensor) -> Tensor:
    """Validate an ``[L, H]`` head tensor (NaN marks a missing head) and return it as detached float64 on the CPU."""
    if not isinstance(values, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [L, H], got {type(values).__name__}.")
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"`{name}` must have shape [L, H] with H >= 1, got {list(values.shape)}.")
    values = values.detach().to("cpu", torch.float64)
    if torch.isnan(values).all():
        raise ValueError(
            f"`{name}` is NaN for every head: the model has no attention head left (every head was removed); keep "
            "at least one head, since head importance needs heads to weigh."
        )
    if torch.isinf(values).any():
        raise ValueError(
            f"`{name}` must contain only finite values (NaN only for heads a pruned layer no longer has); check the "
            "head weights for NaN/inf."
        )
    return values


def specialisation(weights: Tensor) -> dict[str, Tensor]:
    """How strongly each layer concentrates its importance on few heads.

    Each layer's row is renormalised to a distribution ``p_h = w_h / sum_k w_k`` (a row of zeros counts as
    uniform). Then

    * ``entropy = -sum_h p_h log p_h / log H`` (with ``0 log 0 = 0``): 1 when all heads are equally important,
      0 when one head carries everything. A layer with a single head (``H = 1``) gets 0, since that head
      carries all the weight.
    * ``top_share = max_h p_h``: the share of the most important head, between ``1/H`` and 1.

    NaN entries are heads a layer does not have: ``H`` is then the layer's own head count, and a layer with no head
    at all gets NaN for both.

    Args:
        weights: ``[L, H]`` non-negative head weights (e.g. the batch mean of GMAR's ``head_weights``).

    Returns:
        ``{"entropy": Tensor [L], "top_share": Tensor [L]}``, float32.

    Examples:
        >>> stats = specialisation(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]]))
        >>> [round(v, 4) for v in stats["entropy"].tolist()], stats["top_share"].tolist()
        ([1.0, 0.0, 0.4056], [0.25, 1.0, 0.75])
    """
    weights = _check_head_matrix("weights", weights)
    if (weights < 0).any():
        raise ValueError("`weights` must be non-negative; pass head weights or gradient-norm scores, not logits.")
    present = ~weights.isnan()
    counts = present.sum(dim=1, keepdim=True)
    totals = weights.nansum(dim=1, keepdim=True)
    uniform = 1.0 / counts.clamp_min(1).to(torch.float64)
    probs = torch.where(totals > 0, weights / totals.clamp_min(torch.finfo(torch.float64).tiny), uniform)
    probs = probs.masked_fill(~present, 0.0)
    # `entr` is -p log p with entr(0) = 0; abs() only turns the -0.0 of a one-hot row into 0.0.
    entropy = torch.special.entr(probs).sum(dim=1).abs() / counts.squeeze(1).clamp_min(2).to(torch.float64).log()
    entropy = torch.where(counts.squeeze(1) > 1, entropy.clamp(max=1.0), torch.zeros_like(entropy))
    no_heads = counts.squeeze(1) == 0
    return {
        "entropy": entropy.masked_fill(no_heads, math.nan).float(),
        "top_share": probs.amax(dim=1).masked_fill(no_heads, math.nan).float(),
    }


def _average_ranks(values: Tensor, present: Tensor) -> Tensor:
    """1-based ranks along the last dimension among the ``present`` entries, ties sharing the mean of their ranks.

    By sorting, ``O(N log N)`` per row, so whole pixel maps (thousands of entries) rank as fast as head rows: absent
    entries become ``+inf``, which no finite value counts as below it; an entry that is ``+inf`` itself discounts them.
    """
    filled = values.masked_fill(~present, math.inf).contiguous()
    ordered = filled.sort(dim=-1).values
    below = torch.searchsorted(ordered, filled, right=False)
    equal = torch.searchsorted(ordered, filled, right=True) - below
    absent = (~present).sum(dim=-1, keepdim=True)
    equal = equal - torch.where(filled == math.inf, absent, torch.zeros_like(absent))
    return below.to(torch.float64) + (equal.to(torch.float64) + 1.0) / 2.0


def spearman(first: Tensor, second: Tensor, present: Tensor | None = None) -> Tensor:
    """Per-row Spearman rank correlation of two ``[R, N]`` tensors, over the entries ``present`` in both (default all).

    Entries are ranked within each row, ties sharing the mean of the ranks they span, and the Pearson correlation of
    the rank vectors is returned: ``rho = sum(dr_1 * dr_2) / sqrt(sum(dr_1^2) * sum(dr_2^2))`` with
    ``dr = rank - mean(rank)``. A row that is constant (on the present entries) has no ordering: NaN.

    Returns:
        ``[R]`` float64 correlations in ``[-1, 1]``, NaN where either row is constant or nothing is present.

    Examples:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.0, 5.0, 2.0], [1.0, 2.0, 3.0]]))
        tensor([0.5000,    nan], dtype=torch.float64)
    """
    present = torch.ones_like(first, dtype=torch.bool) if present is None else present
    counts = present.sum(dim=-1, keepdim=True).clamp_min(1)

    def centred_ranks(values: Tensor) -> Tensor:
        ranks = _average_ranks(values, present).masked_fill(~present, 0.0)
        return (ranks - ranks.sum(dim=-1, keepdim=True) / counts).masked_fill(~present, 0.0)

    centred_first, centred_second = centred_ranks(first), centred_ranks(second)
    denominator = (centred_first.square().sum(dim=-1) * centred_second.square().sum(dim=-1)).sqrt()
    rho = (centred_first * centred_second).sum(dim=-1) / denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(denominator > 0, rho.clamp(-1.0, 1.0), math.nan)


def _is_constant(values: Tensor, present: Tensor) -> Tensor:
    """Whether each row's present entries are all equal."""
    return values.masked_fill(~present, -math.inf).amax(dim=-1) == values.masked_fill(~present, math.inf).amin(dim=-1)


def rank_stability(previous: Tensor, current: Tensor) -> Tensor:
    """Spearman rank correlation of the head ordering of each layer between two evaluations.

    Heads are ranked within each layer (ties get the average of the ranks they span) and the Pearson correlation
    of the two rank vectors is returned: ``rho = sum(dr_prev * dr_cur) / sqrt(sum(dr_prev^2) * sum(dr_cur^2))``
    with ``dr = rank - mean(rank)``. 1 means the same ordering, -1 the reversed one. A constant row has no
    ordering: two constant rows count as unchanged (1.0); a constant row against a non-constant one as
    uncorrelated (0.0). So a single-head layer is always 1.0. Only heads present (not NaN) in both rows are
    compared, so a layer that lost heads in between is ranked over the heads it kept; with none in common it is NaN.

    Args:
        previous: ``[L, H]`` head weights at the earlier evaluation.
        current: ``[L, H]`` head weights at the later evaluation.

    Returns:
        ``Tensor [L]`` of correlations in ``[-1, 1]``, float32.

    Examples:
        >>> previous = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [1.0, 1, 1, 1]])
        >>> current = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.4, 0.3, 0.2, 0.1], [0.2, 0.1, 0.4, 0.3], [2.0, 2, 2, 2]])
        >>> rank_stability(previous, current).tolist()
        [1.0, -1.0, 0.6000000238418579, 1.0]
    """
    previous = _check_head_matrix("previous", previous)
    current = _check_head_matrix("current", current)
    if previous.shape != current.shape:
        raise ValueError(
            f"`previous` and `current` must have the same [L, H] shape, got {list(previous.shape)} and "
            f"{list(current.shape)}."
        )
    present = ~previous.isnan() & ~current.isnan()
    rho = spearman(previous, current, present)
    # A constant row has no ordering: two constant rows count as unchanged, one constant row as uncorrelated.
    constant_previous, constant_current = _is_constant(previous, present), _is_constant(current, present)
    rho = torch.where(constant_previous & constant_current, 1.0, torch.where(rho.isnan(), 0.0, rho))
    return rho.masked_fill(~present.any(dim=1), math.nan).float()


@dataclass(eq=False)
class HeadTrajectory:
    """GMAR head weights and scores of every attention layer, one row per evaluation.

    Rows are keyed by a validation counter (``validations``, strictly increasing), and carry the global step and the
    epoch as data: validations inside one gradient-accumulation window share a global step, and several evaluations
    per epoch (``val_check_interval < 1``) share an epoch, yet each is its own row. Rows are only ever appended (or,
    with [`keep_saved_rows`][gmar_lightning.trajectory.HeadTrajectory.keep_saved_rows], restored from a file), never
    replaced.

    Attributes:
        epochs: ``E`` epoch numbers, one per row (non-decreasing; repeated when an epoch has several evaluations).
        steps: ``E`` global steps at which each row was recorded (non-decreasing; repeated when validations share a
            step).
        weights: ``[E, L, H]`` normalised head weights (``[0, 0, 0]`` before anything is known).
        scores: ``[E, L, H]`` raw head scores (gradient norms).
        layer_names: ``L`` attention-layer names, or empty when unknown.
        validations: ``E`` validation counters, the rows' keys (strictly increasing; ``0, 1, ...`` when not given).

    Examples:
        >>> trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
        >>> trajectory.append(0, 10, torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([[1.0, 1.0], [9.0, 1.0]]))
        >>> trajectory.append(1, 20, torch.tensor([[0.4, 0.6], [1.0, 0.0]]), torch.tensor([[2.0, 3.0], [4.0, 0.0]]))
        >>> trajectory.append(1, 25, torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([[3.0, 7.0], [4.0, 0.0]]))
        >>> trajectory.append(1, 25, torch.tensor([[0.2, 0.8], [1.0, 0.0]]), torch.tensor([[2.0, 8.0], [4.0, 0.0]]))
        >>> trajectory.validations, trajectory.epochs, trajectory.steps, tuple(trajectory.weights.shape)
        ([0, 1, 2, 3], [0, 1, 1, 1], [10, 20, 25, 25], (4, 2, 2))
        >>> HeadTrajectory.from_state_dict(trajectory.state_dict()).weights.equal(trajectory.weights)
        True
    """

    epochs: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    weights: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))
    scores: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))
    layer_names: list[str] = field(default_factory=list)
    validations: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.epochs = [check_non_negative_int("epochs", int(epoch)) for epoch in self.epochs]
        self.steps = [check_non_negative_int("steps", int(step)) for step in self.steps]
        self.validations = [check_non_negative_int("validations", int(key)) for key in self.validations]
        if not self.validations:
            self.validations = list(range(len(self.steps)))
        self.layer_names = [str(name) for name in self.layer_names]
        for name in ("weights", "scores"):
            values = getattr(self, name)
            if not isinstance(values, Tensor) or values.ndim != 3:
                raise ValueError(
                    f"`{name}` must be a tensor of shape [E, L, H], got {getattr(values, 'shape', values)}."
                )
            setattr(self, name, values.detach().to("cpu", torch.float32))
        if self.weights.shape != self.scores.shape:
            raise ValueError(
                f"`weights` and `scores` must have the same [E, L, H] shape, got {list(self.weights.shape)} and "
                f"{list(self.scores.shape)}."
            )
        num_epochs = self.weights.shape[0]
        if len(self.epochs) != num_epochs or len(self.steps) != num_epochs or len(self.validations) != num_epochs:
            raise ValueError(
                f"`epochs`, `steps` and `validations` must each have one entry per row of `weights` ({num_epochs}), "
                f"got {len(self.epochs)}, {len(self.steps)} and {len(self.validations)}."
            )
        if len(set(self.validations)) != num_epochs or self.validations != sorted(self.validations):
            raise ValueError(f"`validations` must be strictly increasing, got {self.validations}.")
        if self.steps != sorted(self.steps):
            raise ValueError(f"`steps` must be non-decreasing, got {self.steps}.")
        if self.epochs != sorted(self.epochs):
            raise ValueError(f"`epochs` must be non-decreasing, got {self.epochs}.")
        self._check_layer_names(self.weights.shape[1])

    def name_layers(self, names: Sequence[str]) -> None:
        """Name the ``L`` attention layers, once; names given again must be the same.

        Raises:
            ValueError: If the count does not match the recorded layers, or the trajectory already has other names.
        """
        names = [str(name) for name in names]
        if self.layer_names and names != self.layer_names:
            raise ValueError(
                f"`names` {names} differ from the trajectory's layer names {self.layer_names}; start a new "
                "HeadTrajectory for a different model."
            )
        if len(self):
            self._check_layer_names(self.weights.shape[1], names)
        self.layer_names = names

    def _check_layer_names(self, num_layers: int, names: Sequence[str] | None = None) -> None:
        names = self.layer_names if names is None else names
        if names and num_layers and len(names) != num_layers:
            raise ValueError(f"`layer_names` must name each of the {num_layers} layers, got {len(names)} names.")

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def num_layers(self) -> int:
        """``L``, the number of attention layers (0 before the first row when no names were given)."""
        return int(self.weights.shape[1]) or len(self.layer_names)

    @property
    def num_heads(self) -> int:
        """``H``, the number of heads per layer (0 before the first row)."""
        return int(self.weights.shape[2])

    @property
    def next_validation(self) -> int:
        """The key the next appended row gets by default: one more than the last row's (0 for an empty trajectory)."""
        return self.validations[-1] + 1 if self.validations else 0

    def append(self, epoch: int, step: int, weights: Tensor, scores: Tensor, validation: int | None = None) -> None:
        """Record the head weights and scores of one evaluation as a new last row.

        Args:
            epoch: The epoch the evaluation belongs to (at least the last row's).
            step: The global step it was computed at (at least the last row's; equal for validations that share a
                step).
            weights: ``[L, H]`` head weights, or ``[B, L, H]`` per-image weights, which are averaged over the batch.
            scores: ``[L, H]`` or ``[B, L, H]`` raw head scores, averaged likewise.
            validation: The row's key, larger than every recorded key; default
                [`next_validation`][gmar_lightning.trajectory.HeadTrajectory.next_validation].

        Raises:
            ValueError: If the row is malformed or would come before a recorded row (nothing is changed then).
        """
        epoch = check_non_negative_int("epoch", epoch)
        step = check_non_negative_int("step", step)
        key = self.next_validation if validation is None else check_non_negative_int("validation", validation)
        weights = _check_head_matrix("weights", _batch_mean("weights", weights)).float()
        scores = _check_head_matrix("scores", _batch_mean("scores", scores)).float()
        if weights.shape != scores.shape:
            raise ValueError(
                f"`weights` and `scores` must have the same [L, H] shape, got {list(weights.shape)} and "
                f"{list(scores.shape)}."
            )
        if len(self) and weights.shape != self.weights.shape[1:]:
            raise ValueError(
                f"`weights` must have shape {list(self.weights.shape[1:])} like the recorded rows, got "
                f"{list(weights.shape)}; start a new HeadTrajectory for a different model."
            )
        self._check_layer_names(weights.shape[0])
        if len(self) and (key <= self.validations[-1] or step < self.steps[-1] or epoch < self.epochs[-1]):
            raise ValueError(
                f"`validation` {key}, `epoch` {epoch} at step {step} contradicts the recorded rows (validations "
                f"{self.validations}, epochs {self.epochs} at steps {self.steps}): rows are appended in order; start a "
                "new HeadTrajectory for a different run."
            )
        if not len(self):
            self.weights = weights.new_zeros((0, *weights.shape))
            self.scores = scores.new_zeros((0, *scores.shape))
        self.validations.append(key)
        self.epochs.append(epoch)
        self.steps.append(step)
        self.weights = torch.cat([self.weights, weights[None]])
        self.scores = torch.cat([self.scores, scores[None]])

    def keep_saved_rows(self, saved: HeadTrajectory, up_to_step: int) -> int:
        """Add the rows of ``saved`` (this run's trajectory as a file last held it) that this one lacks.

        A run resumed from a checkpoint holds the rows the checkpoint saved; a run killed after that checkpoint may
        have written more rows before it died. Those at or below ``up_to_step`` (the last step the checkpoint covers)
        describe evaluations the resumed run will not repeat, so they are kept; rows above it are evaluations the
        resumed run repeats. ``saved`` counts only when it is the same history: every key both hold must have the
        same epoch, step and weights, and the layers must match.

        Args:
            saved: The trajectory read back from this run's file.
            up_to_step: The last row step the checkpoint covers (in the rows' own step convention).

        Returns:
            How many rows were added (0 when ``saved`` is another run's history).
        """
        ours = dict(zip(self.validations, range(len(self)), strict=True))
        theirs = dict(zip(saved.validations, range(len(saved)), strict=True))
        if not len(saved) or (len(self) and saved.weights.shape[1:] != self.weights.shape[1:]):
            return 0
        if self.layer_names and saved.layer_names and self.layer_names != saved.layer_names:
            return 0
        for key in ours.keys() & theirs.keys():
            mine, other = ours[key], theirs[key]
            if (self.epochs[mine], self.steps[mine]) != (saved.epochs[other], saved.steps[other]) or not torch.equal(
                self.weights[mine], saved.weights[other]
            ):
                return 0
        added = [key for key in sorted(theirs.keys() - ours.keys()) if saved.steps[theirs[key]] <= up_to_step]
        if not added:
            return 0
        # Each merged row, in key order, as (trajectory, row index) of where it comes from.
        rows = sorted([(key, self, row) for key, row in ours.items()] + [(key, saved, theirs[key]) for key in added],
                      key=lambda item: item[0])  # fmt: skip
        merged = HeadTrajectory(
            epochs=[source.epochs[row] for _, source, row in rows],
            steps=[source.steps[row] for _, source, row in rows],
            weights=torch.stack([source.weights[row] for _, source, row in rows]),
            scores=torch.stack([source.scores[row] for _, source, row in rows]),
            layer_names=self.layer_names or saved.layer_names,
            validations=[key for key, _, _ in rows],
        )
        self.load_state_dict(merged.state_dict())
        return len(added)

    def summaries(self) -> dict[str, Tensor]:
        """Specialisation statistics of every evaluation.

        Returns:
            ``{"entropy", "top_share", "stability"}``, each ``Tensor [E, L]`` float32: the
            [`specialisation`][gmar_lightning.trajectory.specialisation] statistics of every row and the
            [`rank_stability`][gmar_lightning.trajectory.rank_stability] of each row against the previous evaluation
            (NaN for the first row, which has nothing to compare with).

        Examples:
            >>> trajectory = HeadTrajectory()
            >>> trajectory.append(0, 1, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
            >>> trajectory.append(1, 2, torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1.0]]))
            >>> {name: values.tolist() for name, values in trajectory.summaries().items()}
            {'entropy': [[0.0], [1.0]], 'top_share': [[1.0], [0.5]], 'stability': [[nan], [0.0]]}
        """
        num_epochs, num_layers = self.weights.shape[:2]
        entropy = torch.zeros(num_epochs, num_layers)
        top_share = torch.zeros(num_epochs, num_layers)
        stability = torch.full((num_epochs, num_layers), math.nan)
        for row in range(num_epochs):
            stats = specialisation(self.weights[row])
            entropy[row], top_share[row] = stats["entropy"], stats["top_share"]
            if row:
                stability[row] = rank_stability(self.weights[row - 1], self.weights[row])
        return {"entropy": entropy, "top_share": top_share, "stability": stability}

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and CPU tensors, safe for ``torch.load(weights_only=True)`` and Lightning checkpoints."""
        return {
            "epochs": list(self.epochs),
            "steps": list(self.steps),
            "weights": self.weights.clone(),
            "scores": self.scores.clone(),
            "layer_names": list(self.layer_names),
            "validations": list(self.validations),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HeadTrajectory:
        """Rebuild a trajectory from `state_dict` output."""
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict from HeadTrajectory.state_dict(), got {type(state).__name__}.")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"`state` lacks the keys {missing}; pass the dict returned by HeadTrajectory.state_dict()."
            )
        return cls(**{key: state[key] for key in _STATE_KEYS + _OPTIONAL_STATE_KEYS if key in state})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this trajectory's contents with `state_dict` output, in place."""
        loaded = self.from_state_dict(state)
        self.epochs, self.steps, self.layer_names = loaded.epochs, loaded.steps, loaded.layer_names
        self.weights, self.scores, self.validations = loaded.weights, loaded.scores, loaded.validations

    def save_npz(self, path: str | Path) -> None:
        """Write the trajectory atomically as ``.npz`` (arrays ``validations``, ``epochs``, ``steps``, ``weights``,
        ``scores``, ``layer_names``), readable without pickle; `load_npz` reads it back."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            validations=np.asarray(self.validations, dtype=np.int64),
            epochs=np.asarray(self.epochs, dtype=np.int64),
            steps=np.asarray(self.steps, dtype=np.int64),
            weights=self.weights.numpy(),
            scores=self.scores.numpy(),
            layer_names=np.asarray(self.layer_names, dtype=np.str_),
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load_npz(cls, path: str | Path) -> HeadTrajectory:
        """Read a file written by `save_npz`.

        Raises:
            ValueError: If the file is empty, truncated or not such a file, in one line.
        """
        try:
            with np.load(path, allow_pickle=False) as arrays:
                missing = [key for key in _STATE_KEYS if key not in arrays.files]
                if missing:
                    raise ValueError(f"`path` {path} lacks the arrays {missing}; pass a file written by save_npz().")
                return cls(
                    epochs=arrays["epochs"].tolist(),
                    steps=arrays["steps"].tolist(),
                    weights=torch.from_numpy(arrays["weights"].astype(np.float32)),
                    scores=torch.from_numpy(arrays["scores"].astype(np.float32)),
                    layer_names=arrays["layer_names"].tolist(),
                    validations=arrays["validations"].tolist() if "validations" in arrays.files else [],
                )
        except (EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(
                f"`path` {path} is empty or truncated ({type(error).__name__}: {error}); pass a complete file written "
                "by save_npz()."
            ) from None

    def save_csv(self, path: str | Path) -> None:
        """Write the trajectory atomically as long-format CSV with the columns
        [`CSV_COLUMNS`][gmar_lightning.trajectory.CSV_COLUMNS].

        ``validation`` is the row's key, ``layer`` the 0-based layer index, ``layer_name`` its module name (empty when
        unknown), ``head`` the original head index; heads a pruned layer no longer has (NaN) get no row. Floats carry
        nine significant digits, enough to read the float32 values back exactly.
        """
        num_layers, num_heads = self.weights.shape[1:]
        weights, scores = self.weights.tolist(), self.scores.tolist()

        def rows() -> Iterator[list[object]]:
            for row, (key, epoch, step) in enumerate(zip(self.validations, self.epochs, self.steps, strict=True)):
                for layer in range(num_layers):
                    layer_name = self.layer_names[layer] if self.layer_names else ""
                    for head in range(num_heads):
                        weight, score = weights[row][layer][head], scores[row][layer][head]
                        if not math.isnan(weight):
                            yield [key, epoch, step, layer, layer_name, head, f"{weight:.9g}", f"{score:.9g}"]

        atomic_write_csv(path, CSV_COLUMNS, rows())


def _batch_mean(name: str, values: Tensor) -> Tensor:
    if isinstance(values, Tensor) and values.ndim == 3:
        if values.shape[0] == 0:
            raise ValueError(f"`{name}` has an empty batch dimension; pass [L, H] or a non-empty [B, L, H] tensor.")
        return values.detach().to(torch.float64).mean(dim=0)
    return values
