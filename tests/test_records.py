"""What one evaluation logs: the EvaluationRecord's checks and the probe metric scores looked up by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmar_lightning.callback.records import METRICS, EvaluationRecord, Probe, probe_metric_scores
from gmar_lightning.explanation import Explanation
from gmar_lightning.render import figure_to_array, layer_trajectory_figure


def test_evaluation_record_rejects_malformed_data() -> None:
    with pytest.raises(ValueError, match="`step` must be a non-negative integer"):
        EvaluationRecord(step=-1, epoch=0)
    with pytest.raises(ValueError, match=r"`images\['x'\]` must be a \[3, H, W\] or \[1, H, W\] tensor"):
        EvaluationRecord(step=0, epoch=0, images={"x": torch.rand(1, 3, 8, 8)})
    with pytest.raises(TypeError, match=r"`figures\['x'\]` must be a matplotlib Figure"):
        EvaluationRecord(step=0, epoch=0, figures={"x": torch.rand(3, 8, 8)})  # type: ignore[dict-item]


def _explanation(maps: torch.Tensor) -> Explanation:
    batch = maps.shape[0]
    return Explanation("rollout", maps[:, ::4, ::4], maps, torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 2))


def test_probe_metric_scores_skip_mask_metrics_without_masks() -> None:
    # A model that prefers class 0 exactly when the left half is bright: deletion of a left-first map hurts it.
    class LeftHalf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logit = 4 * x[..., :4].mean(dim=(1, 2, 3)) - 2
            return torch.stack([logit, torch.zeros_like(logit)], dim=1)

    images = torch.ones(2, 1, 8, 8)
    maps = torch.zeros(2, 8, 8)
    maps[:, :, :4] = 1.0
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :, :4] = True
    names = list(METRICS)
    without_masks = probe_metric_scores(LeftHalf(), Probe(images), _explanation(maps), names)
    assert sorted(without_masks) == ["deletion_auc", "insertion_auc"]
    with_masks = probe_metric_scores(LeftHalf(), Probe(images, masks=masks), _explanation(maps), names)
    assert sorted(with_masks) == sorted(names)
    assert with_masks["pointing_game"] == 1.0 and with_masks["energy_pointing_game"] == pytest.approx(1.0)


def test_evaluation_record_pages_maps_and_marks_prunings_on_each_layers_trajectory() -> None:
    from gmar_lightning.callback.records import evaluation_record
    from gmar_lightning.trajectory import HeadTrajectory

    generator = torch.Generator().manual_seed(0)
    probe = Probe(torch.rand(5, 3, 16, 16, generator=generator), torch.tensor([0, 1, 0, 1, 0]))
    weights = torch.rand(5, 2, 3, generator=generator).softmax(dim=-1)
    maps = torch.rand(5, 16, 16, generator=generator)
    gmar = Explanation("gmar_l1", maps[:, ::4, ::4], maps, torch.zeros(5, dtype=torch.long), torch.randn(5, 2),
                       weights, weights)  # fmt: skip
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    for step in (9, 19):
        trajectory.append(step // 10, step, weights.mean(dim=0), weights.mean(dim=0))
    record = evaluation_record(step=19, epoch=1, probe=probe, explanations={"gmar_l1": gmar}, trajectory=trajectory,
                               head_method="gmar_l1", pruned_at=[10])  # fmt: skip
    assert {tag for tag in record.images if tag.startswith("gmar/overlay/")} == {
        "gmar/overlay/gmar_l1", "gmar/overlay/gmar_l1/images_3-4", "gmar/overlay/gmar_l1/images_5",
    }  # fmt: skip
    assert "where attention carries information" in record.captions["gmar/overlay/gmar_l1"]
    for layer in (0, 1):
        figure = layer_trajectory_figure(trajectory, layer, pruned_at=[10])
        axes = figure.axes[0]
        marks = [line for line in axes.get_lines() if line.get_label() == "heads pruned"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [10, 10]
        assert "heads pruned" in [text.get_text() for text in axes.get_legend().get_texts()]
        # The record logs that figure's pixels.
        logged = record.images[f"gmar/trajectory/layer_{layer:02d}"]
        assert logged.dtype == torch.uint8 and (logged.permute(1, 2, 0).numpy() == figure_to_array(figure)).all()
