"""GMARCallback in real Lightning fits on CPU: logging, no side effects, resume, precision, errors."""

from __future__ import annotations

import csv
import glob
import os
import warnings
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmar_lightning import GMARCallback
from gmar_lightning.capture import AttentionNotFoundError
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

# Real Lightning fits (the argument checks among them are quick).
pytestmark = pytest.mark.integration


def fit(tmp_path: Path, callbacks: list, seed: int = 0, logger=None, datamodule=None, **overrides) -> pl.Trainer:
    pl.seed_everything(seed, verbose=False)
    module = TinyViTModule()
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(module, datamodule=datamodule or tiny_data())
    return trainer


def read_events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_every_tag_for_each_evaluated_epoch_and_none_from_sanity_check(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=8, methods=("gmar_l1", "rollout"), metrics=("pointing_game", "deletion_auc"))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = fit(tmp_path, [callback], logger=logger, max_epochs=3)
    events = read_events(logger.log_dir)
    steps_per_epoch = trainer.num_training_batches
    global_steps = [steps_per_epoch * epoch for epoch in (1, 2, 3)]
    # Lightning logs fit-time validation metrics before it counts the step that ended the epoch: one less.
    expected_steps = [step - 1 for step in global_steps]

    tags = events.Tags()
    for tag in (
        "gmar/overlay/gmar_l1", "gmar/overlay/rollout", "gmar/evolution/gmar_l1", "gmar/evolution/rollout",
        "gmar/head_importance", "gmar/trajectory/layer_00", "gmar/trajectory/layer_01", "gmar/specialisation/entropy",
        "gmar/overlay/gmar_l1/images_3-4", "gmar/overlay/gmar_l1/images_7-8", "gmar/evolution/rollout/images_3-4",
    ):  # fmt: skip
        assert [event.step for event in events.Images(tag)] == expected_steps, tag
    for layer in ("00", "01"):
        assert [event.step for event in events.Histograms(f"gmar/head_weights/layer_{layer}")] == expected_steps
        for head in ("00", "03"):  # per-head histograms and probe-mean scalars are on by default
            assert len(events.Histograms(f"gmar/head_weights/layer_{layer}/head_{head}")) == 3
            assert len(events.Scalars(f"gmar/head_mean/layer_{layer}/head_{head}")) == 3
        assert [event.step for event in events.Scalars(f"gmar/entropy/layer_{layer}")] == expected_steps
        assert [event.step for event in events.Scalars(f"gmar/top_head_share/layer_{layer}")] == expected_steps
        # Rank stability needs a previous evaluation.
        assert [event.step for event in events.Scalars(f"gmar/rank_stability/layer_{layer}")] == expected_steps[1:]
    for method in ("gmar_l1", "rollout"):
        for metric in ("pointing_game", "deletion_auc"):
            assert len(events.Scalars(f"gmar/metrics/{method}/{metric}")) == 3
    assert 0 not in {event.step for tag in tags["images"] for event in events.Images(tag)}  # no sanity-check logs
    overlay = events.Images("gmar/overlay/gmar_l1")[0]
    assert overlay.width > 100 and overlay.height > 100

    assert callback.trajectory.epochs == [0, 1, 2]
    assert callback.map_history.epochs == [0, 1, 2]
    assert tuple(callback.map_history.maps["rollout"].shape) == (3, 4, 32, 32)
    assert callback.trajectory.steps == expected_steps  # the step of val_loss, as every logged value
    assert callback.trajectory.weights.shape == (3, 2, 4)
    torch.testing.assert_close(callback.trajectory.weights.sum(-1), torch.ones(3, 2))
    saved = HeadTrajectory.load_npz(Path(logger.log_dir) / "head_importance.npz")
    assert saved.epochs == [0, 1, 2] and torch.equal(saved.weights, callback.trajectory.weights)
    with open(Path(logger.log_dir) / "head_importance.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 2 * 4


def test_every_n_epochs_and_probe_fixed_at_first_validation(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=5, every_n_epochs=2)
    fit(tmp_path, [callback], logger=TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=4)
    assert callback.trajectory.epochs == [1, 3]
    expected = next(iter(tiny_data().val_dataloader()))
    assert torch.equal(callback.probe.images, expected[0][:5])
    assert torch.equal(callback.probe.labels, expected[1][:5])
    assert torch.equal(callback.probe.masks, expected[2][:5])


def final_state_and_metrics(tmp_path: Path, callbacks: list) -> tuple[dict, list[dict]]:
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = fit(tmp_path, callbacks, logger=logger, max_epochs=2, log_every_n_steps=1)
    state = {name: tensor.clone() for name, tensor in trainer.lightning_module.state_dict().items()}
    optimizer_state = trainer.optimizers[0].state_dict()["state"]
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        # The callback's own rows carry only gmar/ values; everything Lightning logged must be the same.
        rows = [{k: v for k, v in row.items() if not k.startswith("gmar")} for row in csv.DictReader(handle)]
    rows = [row for row in rows if any(value for key, value in row.items() if key not in ("epoch", "step"))]
    return {"weights": state, "optimizer": optimizer_state}, rows


def test_callback_never_changes_the_training_it_observes(tmp_path: Path) -> None:
    without, metrics_without = final_state_and_metrics(tmp_path / "without", [])
    callback = GMARCallback(num_probe=8, methods=("gmar_l1", "grad_rollout"), metrics=("insertion_auc",))
    with_callback, metrics_with = final_state_and_metrics(tmp_path / "with", [callback])
    assert len(callback.trajectory) == 2  # it really ran
    for name, tensor in without["weights"].items():
        assert torch.equal(tensor, with_callback["weights"][name]), name
    for index, state in without["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, with_callback["optimizer"][index][key]), (index, key)
    assert metrics_without == metrics_with


def test_model_flags_hooks_and_rng_unchanged_after_the_callback(tmp_path: Path) -> None:
    class Inspect(pl.Callback):
        """Runs right after GMARCallback's validation-end hook and compares the module with before it."""

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self.before = snapshot(pl_module)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                assert snapshot(pl_module) == self.before

    def snapshot(module: torch.nn.Module) -> tuple:
        return (
            [m.training for m in module.modules()],
            [getattr(m, "fused_attn", None) for m in module.modules()],
            [p.requires_grad for p in module.parameters()],
            [None if p.grad is None else p.grad.sum().item() for p in module.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()),
            torch.get_rng_state().sum().item(),
        )

    callback = GMARCallback(num_probe=4)
    fit(tmp_path, [callback, Inspect()], max_epochs=2)
    assert len(callback.trajectory) == 2


def test_resume_keeps_probe_and_continues_trajectory(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = GMARCallback(num_probe=6)
    fit(tmp_path, [first, checkpoint], max_epochs=2)
    # A resumed run with different validation data must still explain the original probe.
    second = GMARCallback(num_probe=6)
    pl.seed_everything(1, verbose=False)
    trainer = pl.Trainer(callbacks=[second], logger=False, **trainer_kwargs(tmp_path, max_epochs=4))
    other_data = tiny_data(num_val=12)
    other_data.val_dataset.seed = 99
    trainer.fit(TinyViTModule(), datamodule=other_data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(second.probe.images, first.probe.images)
    assert second.trajectory.epochs == [0, 1, 2, 3]
    assert torch.equal(second.trajectory.weights[:2], first.trajectory.weights)


def test_trainer_validate_runs_under_inference_mode(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4, methods=("gmar_l2", "grad_rollout"))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path))
    trainer.validate(TinyViTModule(), datamodule=tiny_data())
    assert len(callback.validation_trajectory) == 1 and len(callback.trajectory) == 0
    assert "gmar_validate/overlay/gmar_l2" in read_events(logger.log_dir).Tags()["images"]


def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    fit(tmp_path, [callback], precision="bf16-mixed", accumulate_grad_batches=2, max_epochs=1)
    assert len(callback.trajectory) == 1
    assert callback.trajectory.weights.dtype == torch.float32
    assert torch.isfinite(callback.trajectory.weights).all()


def test_no_logger_writes_files_with_a_notice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    callback = GMARCallback(num_probe=4, save_dir=str(tmp_path / "out"))
    with caplog.at_level("INFO"):
        fit(tmp_path, [callback], logger=False, max_epochs=1)
    assert f"writing PNG/CSV/NPZ to {tmp_path / 'out' / 'version_0'}" in caplog.text
    pngs = glob.glob(str(tmp_path / "out" / "version_0" / "**" / "*.png"), recursive=True)
    assert any("overlay" in png for png in pngs)
    assert (tmp_path / "out" / "version_0" / "scalars.csv").exists()


def test_probe_given_as_tensor_pair_and_as_indices(tmp_path: Path) -> None:
    data = tiny_data()
    images = torch.stack([data.val_dataset[i][0] for i in (3, 5)])
    labels = torch.tensor([data.val_dataset[i][1] for i in (3, 5)])
    # Two callbacks in one Trainer: each needs its own name, or both would write the same tags and files.
    pair = GMARCallback(probe=(images, labels), target="label", name="pair")
    indices = GMARCallback(probe=[3, 5], name="indices")
    fit(tmp_path, [pair, indices], max_epochs=1)
    assert torch.equal(pair.probe.images, images)
    assert torch.equal(indices.probe.images, images)
    assert torch.equal(indices.probe.masks, torch.stack([data.val_dataset[i][2] for i in (3, 5)]))


def test_num_probe_larger_than_validation_set_warns_and_uses_what_there_is(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=100)
    with pytest.warns(UserWarning, match=r"`num_probe=100`.*only 24 samples"):
        fit(tmp_path, [callback], max_epochs=1)
    assert len(callback.probe) == 24


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_probe": 0}, r"`num_probe` must be a positive integer"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be a positive integer"),
        ({"methods": ("gmar_l1", "gradcam")}, r"`methods` .*gradcam"),
        ({"metrics": ("accuracy",)}, r"`metrics`"),
        ({"target": "true"}, r"`target` must be 'pred' or 'label'"),
        ({"on_error": "ignore"}, r"`on_error`"),
        ({"mean": (0.5, 0.5, 0.5)}, r"`mean` and `std` must be given together"),
        ({"explain_options": {"method": "rollout"}}, r"`explain_options` must not contain"),
        ({"explain_options": {"residul": 0.3}}, r"`explain_options` has unknown key 'residul'; valid keys: residual"),
        ({"explain_options": {"residual": 2.0}}, r"`residual` must lie in \[0.0, 1.0\]"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        GMARCallback(**kwargs)


def test_setup_rejects_model_without_attention(tmp_path: Path) -> None:
    getter = lambda module: torch.nn.Sequential(torch.nn.Linear(2, 2))  # noqa: E731
    with pytest.raises(AttentionNotFoundError, match=r"`model` \(Sequential\)"):
        fit(tmp_path, [GMARCallback(model_getter=getter, on_error="raise")], max_epochs=1)
    # With the default on_error="warn" the same problem is one warning and the fit goes on.
    callback = GMARCallback(model_getter=getter)
    with pytest.warns(UserWarning, match=r"disabled itself after an error in `setup` \(AttentionNotFoundError"):
        trainer = fit(tmp_path, [callback], max_epochs=1)
    assert trainer.current_epoch == 1 and len(callback.trajectory) == 0


def test_setup_rejects_probe_the_model_cannot_take(tmp_path: Path) -> None:
    callback = GMARCallback(probe=torch.randn(2, 1, 32, 32), on_error="raise")
    with pytest.raises(ValueError, match=r"`probe` cannot be explained.*1 channels"):
        fit(tmp_path, [callback], max_epochs=1)


def test_runtime_error_warns_once_disables_and_keeps_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the callback wants a folder")
    callback = GMARCallback(num_probe=4, save_dir=str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, [callback], max_epochs=3)
    messages = [str(w.message) for w in caught if "GMARCallback disabled itself" in str(w.message)]
    assert len(messages) == 1 and "Traceback" in messages[0]
    assert trainer.current_epoch == 3  # training finished
    module = trainer.lightning_module
    assert all(m.fused_attn for m in module.modules() if hasattr(m, "fused_attn"))
    assert all(p.requires_grad for p in module.parameters())


def test_runtime_error_reraises_with_on_error_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the callback wants a folder")
    callback = GMARCallback(num_probe=4, save_dir=str(blocker), on_error="raise")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        fit(tmp_path, [callback], max_epochs=1)


def test_model_getter_points_at_the_vit_and_compiled_submodule_works(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyViTModule()
    module.vit = torch.compile(module.vit)
    callback = GMARCallback(num_probe=4, model_getter=lambda m: m.vit)
    trainer = pl.Trainer(callbacks=[callback], logger=False, **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.validate(module, datamodule=tiny_data())
    assert len(callback.validation_trajectory) == 1


def test_checkpoint_state_is_plain_data(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    fit(tmp_path, [callback, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"][callback.state_key]
    assert state["probe"]["images"].shape == (4, 3, 32, 32)
    assert state["trajectory"]["epochs"] == [0]
    assert state["map_history"]["epochs"] == [0] and state["map_history"]["maps"]["gmar_l1"].dtype == torch.uint8
    assert np.isfinite(np.asarray(state["trajectory"]["weights"])).all()
    assert os.path.exists(tmp_path / "ckpt" / "last.ckpt")


def test_wandb_offline_and_tensorboard_together(tmp_path: Path, offline_wandb: ModuleType) -> None:
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(save_dir=str(tmp_path / "wandb_logs"), offline=True, project="gmar-test")
    tensorboard_logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = GMARCallback(num_probe=4, methods=("gmar_l1", "attention"))
    fit(tmp_path, [callback], logger=[tensorboard_logger, wandb_logger], max_epochs=2)
    files_dir = Path(wandb_logger.experiment.dir)
    offline_wandb.finish()
    offline_wandb.teardown()  # waits until the offline transaction log is flushed

    overlays = sorted(p.name for p in (files_dir / "media" / "images" / "gmar" / "overlay").glob("*.png"))
    assert len([name for name in overlays if name.startswith("gmar_l1")]) == 2
    assert len([name for name in overlays if name.startswith("attention")]) == 2
    (transaction_log,) = files_dir.parent.glob("run-*.wandb")
    history = transaction_log.read_bytes()
    for key in ("gmar/overlay/gmar_l1", "gmar/head_weights/layer_00", "gmar/entropy/layer_01", "trainer/global_step"):
        assert key.encode() in history, key
    assert len(read_events(tensorboard_logger.log_dir).Images("gmar/overlay/gmar_l1")) == 2
    assert (Path(tensorboard_logger.log_dir) / "head_importance.npz").exists()
    # W&B's copy lives in the run's own files folder as a real file (uploaded with the run), not in the shared save_dir.
    assert (files_dir / "head_importance.npz").is_file() and not (files_dir / "head_importance.npz").is_symlink()
    assert not (tmp_path / "wandb_logs" / "head_importance.npz").exists()


def test_default_callback_logs_gmar_and_grad_rollout_and_head_weights_from_one_pass(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    assert callback.methods == ("gmar_l1", "grad_rollout") and callback.head_method == "gmar_l1"
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path))
    module = TinyViTModule()
    passes = {"forward": 0, "backward": 0}

    def forward(_module: torch.nn.Module, inputs: tuple, _output: object) -> None:
        # Validation batches run under inference mode; the explanation of the probe is the forward with gradients.
        if torch.is_grad_enabled() and inputs[0].shape[0] == 4:
            passes["forward"] += 1

    def backward(*_: object) -> None:
        passes["backward"] += 1

    module.vit.register_forward_hook(forward)
    module.vit.blocks[-1].register_full_backward_hook(backward)
    trainer.validate(module, datamodule=tiny_data())

    assert passes == {"forward": 1, "backward": 1}
    events = read_events(logger.log_dir)
    for tag in ("overlay/gmar_l1", "overlay/grad_rollout", "overlay/gmar_l1/images_3-4", "trajectory/layer_00"):
        assert len(events.Images(f"gmar_validate/{tag}")) == 1, tag
    assert len(events.Histograms("gmar_validate/head_weights/layer_01")) == 1
    assert len(callback.validation_trajectory) == 1  # GMAR's head weights are the trajectory's source
    texts = [tag for tag in events.Tags()["tensors"] if tag.endswith("/text_summary")]
    captions = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in texts}
    gmar_caption = captions["gmar_validate/overlay/gmar_l1/text_summary"]
    grad_caption = captions["gmar_validate/overlay/grad_rollout/text_summary"]
    assert "where attention carries information" in gmar_caption and "why this class" not in gmar_caption
    assert "changes with the class and with the classifier" in grad_caption


def test_trajectory_figures_mark_each_pruning_at_its_step(tmp_path: Path) -> None:
    from gmar_lightning import HeadPruning
    from gmar_lightning.callback.gmar import _pruning_steps

    callback = GMARCallback(num_probe=4, methods=("gmar_l1",))
    pruning = HeadPruning(amount=2, criterion="magnitude", epochs=[1], throughput_batch=0)
    trainer = fit(tmp_path, [callback, pruning], max_epochs=3)
    pruned_at = _pruning_steps(trainer)
    assert pruned_at == [entry["step"] for entry in pruning.history] == [trainer.num_training_batches]
    # After the first epoch's evaluation (logged one step earlier), before the second's.
    assert callback.trajectory.steps[0] < pruned_at[0] < callback.trajectory.steps[1]
