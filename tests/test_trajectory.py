"""Head-importance trajectory: recording, persistence and specialisation statistics."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gmar_lightning.trajectory import CSV_COLUMNS, HeadTrajectory, rank_stability, specialisation

LAYER_NAMES = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]


def filled_trajectory(epochs: int = 3, layers: int = 3, heads: int = 4) -> HeadTrajectory:
    generator = torch.Generator().manual_seed(0)
    trajectory = HeadTrajectory(layer_names=LAYER_NAMES[:layers])
    for epoch in range(epochs):
        scores = torch.rand(layers, heads, generator=generator) * 5
        trajectory.append(epoch, 100 * (epoch + 1), scores / scores.sum(dim=1, keepdim=True), scores)
    return trajectory


def test_append_keys_each_row_by_a_validation_counter_and_never_replaces_a_row() -> None:
    trajectory = HeadTrajectory(layer_names=LAYER_NAMES[:2])
    first, second, third, fourth = (torch.full((2, 3), value) for value in (0.1, 0.2, 0.3, 0.4))
    trajectory.append(0, 10, first, first * 10)
    trajectory.append(2, 30, second, second * 10)
    trajectory.append(2, 30, third, third * 10)  # a second validation in one gradient-accumulation window
    trajectory.append(2, 35, fourth, fourth * 10, validation=7)

    assert trajectory.validations == [0, 1, 2, 7]
    assert trajectory.epochs == [0, 2, 2, 2]
    assert trajectory.steps == [10, 30, 30, 35]
    assert torch.equal(trajectory.weights, torch.stack([first, second, third, fourth]))
    assert torch.equal(trajectory.scores, torch.stack([first, second, third, fourth]) * 10)
    assert trajectory.next_validation == 8
    for epoch, step, key in ((1, 40, None), (2, 20, None), (2, 40, 7)):
        with pytest.raises(ValueError, match=r"contradicts the recorded rows"):
            trajectory.append(epoch, step, first, first, validation=key)
    assert len(trajectory) == 4


def test_keep_saved_rows_restores_rows_up_to_the_checkpoint_step_of_the_same_history() -> None:
    saved = filled_trajectory(epochs=4)  # steps 100, 200, 300, 400
    resumed = HeadTrajectory.from_state_dict(saved.state_dict())
    resumed.load_state_dict({**saved.state_dict(), **{key: value[:2] for key, value in saved.state_dict().items()
                                                      if key != "layer_names"}})  # fmt: skip
    assert resumed.keep_saved_rows(saved, up_to_step=300) == 1
    assert resumed.validations == [0, 1, 2] and resumed.steps == [100, 200, 300]
    assert torch.equal(resumed.weights, saved.weights[:3])
    assert resumed.keep_saved_rows(saved, up_to_step=300) == 0  # nothing twice

    other = filled_trajectory(epochs=4)
    other.weights[0] += 1.0  # another run's history: nothing of it is taken
    fresh = HeadTrajectory.from_state_dict({key: value[:1] if key != "layer_names" else value
                                            for key, value in saved.state_dict().items()})  # fmt: skip
    assert fresh.keep_saved_rows(other, up_to_step=400) == 0 and len(fresh) == 1


def test_append_averages_per_image_weights_over_the_batch() -> None:
    trajectory = HeadTrajectory()
    per_image = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [B=2, L=1, H=2]
    trajectory.append(0, 1, per_image, per_image * 2)
    assert trajectory.weights.tolist() == [[[0.5, 0.5]]]
    assert trajectory.scores.tolist() == [[[1.0, 1.0]]]


@pytest.mark.parametrize(
    ("epoch", "weights", "message"),
    [
        (-1, torch.ones(3, 4), "`epoch` must be a non-negative integer"),
        (5, torch.ones(2, 4), "`weights` must have shape [3, 4]"),
        (5, torch.ones(4), "`weights` must have shape [L, H]"),
        (5, torch.full((3, 4), math.inf), "`weights` must contain only finite values"),
        (5, torch.full((3, 4), math.nan), "`weights` is NaN for every head: the model has no attention head left"),
    ],
)
def test_append_rejects_bad_rows_and_leaves_the_trajectory_unchanged(
    epoch: int, weights: torch.Tensor, message: str
) -> None:
    trajectory = filled_trajectory()
    before = trajectory.state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        trajectory.append(epoch, 7, weights, torch.ones_like(weights))
    after = trajectory.state_dict()
    assert after["epochs"] == before["epochs"]
    assert torch.equal(after["weights"], before["weights"])


def test_layer_names_must_match_the_number_of_layers() -> None:
    trajectory = HeadTrajectory(layer_names=LAYER_NAMES)
    with pytest.raises(ValueError, match="`layer_names` must name each of the 2 layers"):
        trajectory.append(0, 0, torch.ones(2, 4), torch.ones(2, 4))


def test_empty_trajectory_has_consistent_shapes_and_statistics() -> None:
    trajectory = HeadTrajectory()
    assert len(trajectory) == 0
    assert tuple(trajectory.weights.shape) == (0, 0, 0)
    assert {name: tuple(values.shape) for name, values in trajectory.summaries().items()} == {
        "entropy": (0, 0),
        "top_share": (0, 0),
        "stability": (0, 0),
    }
    restored = HeadTrajectory.from_state_dict(trajectory.state_dict())
    assert len(restored) == 0 and tuple(restored.scores.shape) == (0, 0, 0)


def test_state_dict_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    trajectory = filled_trajectory()
    torch.save({"callback": trajectory.state_dict()}, tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callback"]

    restored = HeadTrajectory()
    restored.load_state_dict(state)
    assert restored.epochs == trajectory.epochs
    assert restored.steps == trajectory.steps
    assert restored.layer_names == trajectory.layer_names
    assert torch.equal(restored.weights, trajectory.weights)
    assert torch.equal(restored.scores, trajectory.scores)
    assert restored.validations == trajectory.validations == [0, 1, 2]
    # The state is a copy: changing the trajectory in place must not change a state dict already handed out.
    handed_out = trajectory.state_dict()
    saved_weights = handed_out["weights"].clone()
    trajectory.weights[0] = 0.0
    assert torch.equal(handed_out["weights"], saved_weights)


def test_from_state_dict_names_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"`state` lacks the keys \['scores'\]"):
        HeadTrajectory.from_state_dict({"epochs": [], "steps": [], "weights": torch.zeros(0, 0, 0), "layer_names": []})


def test_npz_round_trip_is_exact(tmp_path: Path) -> None:
    trajectory = filled_trajectory()
    path = tmp_path / "head_importance.npz"
    trajectory.save_npz(path)
    restored = HeadTrajectory.load_npz(path)
    assert restored.epochs == trajectory.epochs
    assert restored.steps == trajectory.steps
    assert restored.layer_names == LAYER_NAMES
    assert torch.equal(restored.weights, trajectory.weights)
    assert torch.equal(restored.scores, trajectory.scores)
    with np.load(path, allow_pickle=False) as arrays:  # readable without pickle by any numpy tool
        assert arrays["weights"].shape == (3, 3, 4)


def test_npz_round_trip_of_an_empty_trajectory(tmp_path: Path) -> None:
    HeadTrajectory().save_npz(tmp_path / "empty.npz")
    restored = HeadTrajectory.load_npz(tmp_path / "empty.npz")
    assert len(restored) == 0 and restored.layer_names == [] and tuple(restored.weights.shape) == (0, 0, 0)


def test_csv_is_long_format_and_reads_back_exactly(tmp_path: Path) -> None:
    trajectory = filled_trajectory(epochs=2, layers=3, heads=4)
    path = tmp_path / "head_importance.csv"
    trajectory.save_csv(path)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 2 * 3 * 4
    for row in rows:
        epoch, layer, head = int(row["epoch"]), int(row["layer"]), int(row["head"])
        assert int(row["step"]) == 100 * (epoch + 1)
        assert row["layer_name"] == LAYER_NAMES[layer]
        assert np.float32(row["weight"]) == trajectory.weights[epoch, layer, head].item()
        assert np.float32(row["score"]) == trajectory.scores[epoch, layer, head].item()


def test_saving_is_atomic_and_overwrites_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "run" / "gmar"  # missing directories are created
    filled_trajectory(epochs=1).save_csv(target / "head_importance.csv")
    filled_trajectory(epochs=1).save_npz(target / "head_importance.npz")
    bigger = filled_trajectory(epochs=3)
    bigger.save_csv(target / "head_importance.csv")
    bigger.save_npz(target / "head_importance.npz")

    assert sorted(path.name for path in target.iterdir()) == ["head_importance.csv", "head_importance.npz"]
    assert len(HeadTrajectory.load_npz(target / "head_importance.npz")) == 3
    assert len((target / "head_importance.csv").read_text().splitlines()) == 1 + 3 * 3 * 4


def test_specialisation_on_hand_made_weights() -> None:
    weights = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all heads equal
            [0.0, 0.0, 7.0, 0.0],  # one head carries everything
            [1.0, 1.0, 0.0, 0.0],  # two equal heads out of four: entropy log 2 / log 4
            [0.0, 0.0, 0.0, 0.0],  # no signal at all counts as uniform
        ]
    )
    stats = specialisation(weights)
    assert stats["entropy"].tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0], abs=1e-6)
    assert stats["top_share"].tolist() == pytest.approx([0.25, 1.0, 0.5, 0.25])
    assert stats["entropy"].dtype == torch.float32


def test_specialisation_single_head_layers_carry_everything() -> None:
    stats = specialisation(torch.tensor([[3.0], [0.5]]))
    assert stats["entropy"].tolist() == [0.0, 0.0]
    assert stats["top_share"].tolist() == [1.0, 1.0]


def test_specialisation_rejects_negative_weights() -> None:
    with pytest.raises(ValueError, match="`weights` must be non-negative"):
        specialisation(torch.tensor([[0.5, -0.5]]))


def test_rank_stability_on_known_permutations() -> None:
    base = torch.tensor([0.1, 0.4, 0.2, 0.3])
    previous = base.expand(3, 4)
    current = torch.stack(
        [
            base * 10,  # same ordering, different scale
            -base + 1,  # reversed ordering
            base[[1, 0, 2, 3]],  # two heads swapped: ranks (1,4,2,3) vs (4,1,2,3)
        ]
    )
    rho = rank_stability(previous, current)
    # Swap case by hand: d = (3, 3, 0, 0), rho = 1 - 6 * 18 / (4 * 15) = -0.8.
    assert rho.tolist() == pytest.approx([1.0, -1.0, -0.8])


def test_rank_stability_uses_average_ranks_for_ties() -> None:
    # Ranks with ties: (1.5, 1.5, 3, 4) against (1, 2, 3, 4) -> Pearson of ranks = 0.9486833.
    rho = rank_stability(torch.tensor([[0.2, 0.2, 0.3, 0.4]]), torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert rho.item() == pytest.approx(3 / math.sqrt(10), abs=1e-6)


def test_rank_stability_of_constant_rows() -> None:
    previous = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    current = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    assert rank_stability(previous, current).tolist() == [1.0, 0.0, 0.0]
    assert rank_stability(torch.ones(2, 1), torch.rand(2, 1)).tolist() == [1.0, 1.0]


def test_rank_stability_requires_matching_shapes() -> None:
    with pytest.raises(ValueError, match="`previous` and `current` must have the same"):
        rank_stability(torch.ones(2, 4), torch.ones(3, 4))


def test_summaries_follow_the_statistics_row_by_row() -> None:
    trajectory = filled_trajectory(epochs=3)
    summaries = trajectory.summaries()
    assert all(tuple(values.shape) == (3, 3) for values in summaries.values())
    assert torch.isnan(summaries["stability"][0]).all()
    for row in range(3):
        stats = specialisation(trajectory.weights[row])
        assert torch.equal(summaries["entropy"][row], stats["entropy"])
        assert torch.equal(summaries["top_share"][row], stats["top_share"])
    assert torch.equal(summaries["stability"][2], rank_stability(trajectory.weights[1], trajectory.weights[2]))


# ---------------------------------------------------------------------------------------------------------------
# Layers that lost heads: NaN marks a missing head
# ---------------------------------------------------------------------------------------------------------------

NAN = math.nan


def test_specialisation_counts_only_the_heads_a_layer_has() -> None:
    with_missing = torch.tensor([[0.6, NAN, 0.2, 0.2], [NAN, 1.0, NAN, NAN], [NAN, NAN, NAN, NAN]])
    stats = specialisation(with_missing)
    three_heads = specialisation(torch.tensor([[0.6, 0.2, 0.2]]))
    p = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    assert stats["entropy"][0] == pytest.approx(float(-(p * p.log()).sum() / math.log(3)), abs=1e-6)
    assert stats["entropy"][0] == three_heads["entropy"][0] and stats["top_share"][0] == three_heads["top_share"][0]
    assert stats["entropy"][1] == 0.0 and stats["top_share"][1] == 1.0  # one head carries everything
    assert math.isnan(stats["entropy"][2]) and math.isnan(stats["top_share"][2])  # no head at all


def test_rank_stability_compares_the_heads_both_rows_have() -> None:
    previous = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    current = torch.tensor([[0.9, NAN, 0.3, 0.1], [NAN, 0.5, NAN, 0.5], [NAN, NAN, NAN, NAN]])
    rho = rank_stability(previous, current)
    # Layer 0 over heads 0, 2, 3: ranks (1, 2, 3) before and (3, 2, 1) after.
    assert rho[0] == pytest.approx(-1.0)
    assert rho[1] == 0.0  # heads 1 and 3: ordered before, tied after
    assert math.isnan(rho[2])


def test_a_trajectory_records_rows_before_and_after_a_pruning(tmp_path: Path) -> None:
    trajectory = HeadTrajectory(layer_names=LAYER_NAMES[:2])
    trajectory.append(0, 10, torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]), torch.ones(2, 3))
    pruned = torch.tensor([[NAN, 0.3, 0.7], [1.0, NAN, NAN]])
    trajectory.append(1, 20, pruned, pruned)
    summaries = trajectory.summaries()
    assert summaries["stability"][1].tolist() == [1.0, 1.0]
    trajectory.save_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 + 3 and not any(row["weight"] == "nan" for row in rows)
    trajectory.save_npz(tmp_path / "t.npz")
    loaded = HeadTrajectory.load_npz(tmp_path / "t.npz")
    assert torch.equal(loaded.weights.isnan(), trajectory.weights.isnan())
    assert torch.equal(loaded.weights.nan_to_num(-1), trajectory.weights.nan_to_num(-1))
    with pytest.raises(ValueError, match="`weights` must contain only finite values"):
        trajectory.append(2, 30, torch.tensor([[math.inf, 0.3, 0.7], [1.0, NAN, NAN]]), torch.ones(2, 3))


def test_name_layers_checks_the_count_and_keeps_names_fixed() -> None:
    trajectory = HeadTrajectory()
    trajectory.append(0, 10, torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"`layer_names` must name each of the 2 layers, got 3 names"):
        trajectory.name_layers(["a", "b", "c"])
    assert trajectory.layer_names == []
    trajectory.name_layers(["blocks.0.attn", "blocks.1.attn"])
    trajectory.name_layers(["blocks.0.attn", "blocks.1.attn"])  # the same names again are fine
    with pytest.raises(ValueError, match=r"differ from the trajectory's layer names"):
        trajectory.name_layers(["x", "y"])
    assert trajectory.layer_names == ["blocks.0.attn", "blocks.1.attn"]
