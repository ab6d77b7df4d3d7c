"""HeadPruning on real fits: with GMARCallback under TensorBoard, optimizer state sliced, resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmar_lightning import GMARCallback, HeadPruning
from gmar_lightning.cli import main
from gmar_lightning.demos.model import ViTClassifier
from gmar_lightning.heads import pruning_events
from gmar_lightning.report import build_report
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration

HEAD_DIM = 8  # TinyViTModule: embed_dim 32, 4 heads


def head_counts(module: pl.LightningModule) -> list[int]:
    return [block.attn.num_heads for block in module.vit.blocks]


def test_pruning_with_gmar_callback_under_tensorboard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyViTModule()
    gmar = GMARCallback(num_probe=8, per_head_histograms=True)
    pruning = HeadPruning(amount=3, criterion="gmar", epochs=[1, 2], gmar_last_n=1, throughput_batch=4)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=logger, callbacks=[gmar, pruning]))
    trainer.fit(module, datamodule=tiny_data())

    assert sum(head_counts(module)) == 8 - 3 - 3 and min(head_counts(module)) >= 1
    assert [entry["epoch"] for entry in pruning.history] == [1, 2]
    first = pruning.history[0]
    # GMAR picked the heads with the smallest weight at epoch 0 (gmar_last_n=1), never a layer's last head.
    weights = gmar.trajectory.weights[0]
    removed = [(int(name.split(".")[1]), head) for name, heads in first["removed"].items() for head in heads]
    kept = [(layer, head) for layer in range(2) for head in range(4) if (layer, head) not in removed]
    assert max(weights[layer, head] for layer, head in removed) <= min(weights[layer, head] for layer, head in kept)
    assert first["parameters"] == first["parameters_before"] - 3 * (4 * 32 * HEAD_DIM + 3 * HEAD_DIM)
    assert first["speedup"] > 0 and first["asked"] == 3
    assert json.loads((Path(logger.log_dir) / "head_pruning.json").read_text()) == pruning.history

    # The trajectory follows the shrinking model: removed heads are NaN from the epoch after their removal on.
    trajectory = HeadTrajectory.load_npz(Path(logger.log_dir) / "head_importance.npz")
    assert trajectory.epochs == [0, 1, 2]
    assert not trajectory.weights[0].isnan().any()
    assert (~trajectory.weights[1].isnan()).sum() == 5 and (~trajectory.weights[2].isnan()).sum() == 2
    assert torch.allclose(trajectory.weights[2].nansum(-1), torch.ones(2))
    # The trajectory alone tells where heads left, for marking its plots: between the rows around each pruning.
    events = pruning_events(trajectory)
    assert [(event.row, event.step_before, event.step_after) for event in events] == [
        (1, trajectory.steps[0], trajectory.steps[1]),
        (2, trajectory.steps[1], trajectory.steps[2]),
    ]
    for event, entry in zip(events, pruning.history, strict=True):
        assert {f"blocks.{layer}.attn": heads for layer, heads in event.removed.items()} == entry["removed"]

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()
    # A point at the start of the fit, then one per pruning at its step.
    heads = [(event.step, event.value) for event in events.Scalars("head_pruning/heads")]
    steps = [entry["step"] for entry in pruning.history]
    assert heads == [(0, 8.0), (steps[0], 5.0), (steps[1], 2.0)] and 0 < steps[0] < steps[1]
    # Each pruning lies between the validation of the model before it and the one after it, on val_loss's axis.
    validations = [event.step for event in events.Scalars("val_loss")]
    assert validations[0] < steps[0] < validations[1] < steps[1] < validations[2]
    parameters = [event.value for event in events.Scalars("head_pruning/parameters")]
    assert parameters[0] > parameters[1] > parameters[2] == pruning.history[1]["parameters"]
    removed = [(event.step, event.value) for event in events.Scalars("head_pruning/removed_heads")]
    assert removed == [(steps[0], 3.0), (steps[1], 3.0)]
    # Every pruning event names its removed heads, as text at its step.
    texts = {
        event.step: event.tensor_proto.string_val[0].decode()
        for event in events.Tensors("head_pruning/removed/text_summary")
    }
    assert sorted(texts) == steps
    for entry in pruning.history:
        for layer, removed_heads in entry["removed"].items():
            assert f"| {entry['step']} | {entry['epoch']} | {layer} | {removed_heads} |" in texts[entry["step"]]
    # The only speed figure is the interleaved before/after ratio; no raw throughput that machine load moves.
    speed_tags = [tag for tag in events.Tags()["scalars"] if "throughput" in tag or "speed" in tag]
    assert speed_tags == ["head_pruning/speedup"]
    assert [event.value for event in events.Scalars("head_pruning/speedup")] == pytest.approx(
        [entry["speedup"] for entry in pruning.history]
    )
    for layer in range(2):
        # The last evaluation saw the pruned model: 8 probe images x the heads the layer has left, no NaN.
        histogram = events.Histograms(f"gmar/head_weights/layer_{layer:02d}")[-1]
        assert histogram.histogram_value.num == 8 * head_counts(module)[layer]
        assert math.isfinite(histogram.histogram_value.sum)
        per_head = events.Tags()["histograms"]
        present = [f"gmar/head_weights/layer_{layer:02d}/head_{h:02d}" for h in range(4)]
        assert all(tag in per_head for tag in present)  # earlier evaluations had every head
    report = build_report(logger.log_dir)
    assert "heads per layer now" in report.html_path.read_text()


class OptimizerStateRecorder(Callback):
    """Copies the AdamW state of block 0's qkv and proj weights at the start of every epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        attention = pl_module.vit.blocks[0].attn
        self.states.append(
            {
                name: {key: value.clone() for key, value in optimizer.state[parameter].items()}
                for name, parameter in (("qkv", attention.qkv.weight), ("proj", attention.proj.weight))
                if parameter in optimizer.state
            }
        )


def test_adam_moments_are_sliced_not_reset_in_a_real_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyViTModule()
    before, after = OptimizerStateRecorder(), OptimizerStateRecorder()
    pruning = HeadPruning(amount=2, criterion="magnitude", epochs=[1], min_heads_per_layer=0, throughput_batch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, callbacks=[before, pruning, after]))
    trainer.fit(module, datamodule=tiny_data())

    removed = pruning.history[0]["removed"].get("blocks.0.attn", [])
    assert removed, "the test needs block 0 to lose heads"
    kept = [head for head in range(4) if head not in removed]
    channels = [head * HEAD_DIM + i for head in kept for i in range(HEAD_DIM)]
    rows = torch.tensor([part * 32 + channel for part in range(3) for channel in channels])
    columns = torch.tensor(channels)
    old, new = before.states[1], after.states[1]
    for key in ("exp_avg", "exp_avg_sq"):
        assert new["qkv"][key].shape[0] == 3 * len(kept) * HEAD_DIM
        assert torch.equal(new["qkv"][key], old["qkv"][key][rows])
        assert torch.equal(new["proj"][key], old["proj"][key][:, columns])
        assert new["qkv"][key].abs().sum() > 0  # moments of a real fit, not zeros
    assert torch.equal(new["qkv"]["step"], old["qkv"]["step"])
    # The optimizer trains exactly the model's parameters after the pruning.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}


class StartState(Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {key: value.clone() for key, value in pl_module.state_dict().items()}
        self.exp_avg = trainer.optimizers[0].state[pl_module.vit.blocks[1].attn.qkv.weight]["exp_avg"].clone()


def test_prune_then_resume_from_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    pruning = HeadPruning(amount=3, criterion="random", epochs=[1], throughput_batch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, callbacks=[pruning, checkpoint]))
    module = TinyViTModule()
    trainer.fit(module, datamodule=tiny_data())
    pruned_counts = head_counts(module)
    assert sum(pruned_counts) == 5
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)

    torch.manual_seed(1)
    fresh = TinyViTModule()
    assert head_counts(fresh) == [4, 4]
    start = StartState()
    resumed_pruning = HeadPruning(amount=3, criterion="random", epochs=[1], throughput_batch=0)
    resumed = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, callbacks=[resumed_pruning, start]))
    resumed.fit(fresh, datamodule=tiny_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))

    assert head_counts(fresh) == pruned_counts  # pruned to match on load, not pruned again at epoch 1
    assert resumed_pruning.history == pruning.history
    assert all(torch.equal(start.weights[key], value) for key, value in saved["state_dict"].items())
    qkv_index = list(dict(fresh.named_parameters())).index("vit.blocks.1.attn.qkv.weight")
    assert torch.equal(start.exp_avg, saved["optimizer_states"][0]["state"][qkv_index]["exp_avg"])
    assert resumed.current_epoch == 3


def test_a_pruned_vit_classifier_checkpoint_loads_and_explains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ViTClassifier(
        num_classes=4, img_size=32, model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    pruning = HeadPruning(amount=0.5, criterion="magnitude", epochs=[1], throughput_batch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=False, callbacks=[pruning, checkpoint]))
    trainer.fit(module, datamodule=tiny_data())
    path = tmp_path / "checkpoints" / "last.ckpt"
    loaded = ViTClassifier.load_from_checkpoint(path)
    assert [b.attn.num_heads for b in loaded.model.blocks] == [b.attn.num_heads for b in module.model.blocks]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), module.eval()(images))
    # The command line rebuilds the model from the checkpoint's settings and prunes it before loading.
    output = tmp_path / "explained"
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image_dir / "red.png")
    assert main(["explain", str(image_dir), "--checkpoint", str(path), "--output", str(output), "--device", "cpu"]) == 0
    with np.load(output / "maps.npz") as arrays:
        weights = arrays["head_weights_gmar_l1"]
    assert np.isnan(weights).sum() == 4 and np.allclose(np.nansum(weights, axis=-1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"amount": 1.5},
            r"`amount` must be a fraction in \(0, 1\) of the original heads or a whole number of heads >= 1",
        ),
        ({"amount": 0}, r"`amount` must be a fraction in \(0, 1\)"),
        ({"criterion": "entropy"}, "`criterion` must be one of gmar, michel, magnitude, random or a callable"),
        ({"epochs": "1"}, "`epochs` must be a list of epoch numbers >= 0 or a callable"),
        ({"gmar_last_n": 0}, "`gmar_last_n` must be an integer >= 1"),
        ({"min_heads_per_layer": -1}, "`min_heads_per_layer` must be an integer >= 0"),
        ({"criterion": "magnitude", "gmar_name": "ema"}, "`gmar_name` names the GMARCallback that ranks heads"),
    ],
)
def test_bad_arguments_fail_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        HeadPruning(**kwargs)
    assert "\n" not in str(raised.value)


def test_setup_refuses_gmar_without_a_gmar_callback_and_stochastic_weight_averaging(tmp_path: Path) -> None:
    module = TinyViTModule()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, callbacks=[HeadPruning()]))
    with pytest.raises(ValueError, match="`criterion='gmar'` needs a GMARCallback with a GMAR method"):
        trainer.fit(module, datamodule=tiny_data())
    swa = StochasticWeightAveraging(swa_lrs=1e-3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, callbacks=[swa, HeadPruning(criterion="magnitude")]))
    with pytest.raises(ValueError, match="HeadPruning cannot slice StochasticWeightAveraging's copy") as raised:
        trainer.fit(module, datamodule=tiny_data())
    assert "\n" not in str(raised.value) and trainer.global_step == 0
