"""HeadPruning in the configurations users run: YAML amounts, dict loaders, schedules, EMA, old checkpoints, resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from gmar_lightning import GMARCallback, HeadPruning
from gmar_lightning.demos.data import ShapesDataModule
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration

HEAD_DIM = 8  # TinyViTModule: embed_dim 32, 4 heads per layer, 2 layers


def head_counts(module: pl.LightningModule) -> list[int]:
    return [block.attn.num_heads for block in module.vit.blocks]


def fit(tmp_path: Path, callbacks: list, max_epochs: int = 2, module: pl.LightningModule | None = None, **kwargs):
    torch.manual_seed(0)
    module = module or TinyViTModule()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **{"logger": False, **kwargs})
    )
    trainer.fit(module, datamodule=tiny_data())
    return trainer, module


@pytest.mark.parametrize("amount", ["2", "2.0"])
def test_a_whole_amount_from_a_lightning_cli_yaml_config_prunes_that_many_heads(tmp_path: Path, amount: str) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from gmar_lightning.demos.model import ViTClassifier

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 2\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: gmar_lightning.HeadPruning\n"
        f"      init_args: {{amount: {amount}, criterion: magnitude, epochs: [1], throughput_batch: 0}}\n"
        "model: {num_classes: 4, img_size: 32, model_kwargs: {patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}}\n"
        "data: {num_train: 32, num_val: 16, image_size: 32, batch_size: 16}\n"
    )
    cli = LightningCLI(
        ViTClassifier,
        ShapesDataModule,
        args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
        save_config_kwargs={"overwrite": True},
    )
    pruning = next(c for c in cli.trainer.callbacks if isinstance(c, HeadPruning))
    assert sum(len(heads) for heads in pruning.history[0]["removed"].values()) == 2
    assert sum(block.attn.num_heads for block in cli.model.model.blocks) == 6


class TwoLoaderData(pl.LightningDataModule):
    """The shapes data with a dict of two validation loaders, as multi-dataset validation gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.data = tiny_data()

    def setup(self, stage: str) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.data.train_dataloader()

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {"shapes": self.data.val_dataloader(), "again": self.data.val_dataloader()}


class TwoLoaderModule(TinyViTModule):
    def validation_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


def test_michel_reads_the_first_loader_of_a_dict_of_validation_loaders(tmp_path: Path) -> None:
    pruning = HeadPruning(amount=2, criterion="michel", epochs=[1], michel_batches=1, throughput_batch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, callbacks=[pruning]))
    torch.manual_seed(0)
    module = TwoLoaderModule()
    trainer.fit(module, datamodule=TwoLoaderData())
    assert sum(head_counts(module)) == 6


@pytest.mark.parametrize(
    ("epochs", "every_n_epochs", "check_val", "advice"),
    [([1], 2, 1, "epochs=[2]"), ([2, 3], 2, 1, "epochs=[2, 4]"), ([2], 1, 3, "epochs=[3]")],
)
def test_a_gmar_schedule_without_an_evaluation_before_a_pruning_is_refused_at_setup(
    tmp_path: Path, epochs: list[int], every_n_epochs: int, check_val: int, advice: str
) -> None:
    gmar = GMARCallback(num_probe=4, every_n_epochs=every_n_epochs)
    pruning = HeadPruning(amount=2, criterion="gmar", epochs=epochs, throughput_batch=0)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, logger=False, callbacks=[gmar, pruning], check_val_every_n_epoch=check_val)
    )
    with pytest.raises(ValueError, match="no GMAR evaluation") as raised:
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
    message = str(raised.value)
    assert f"use e.g. `{advice}`" in message and advice != f"epochs={epochs}"
    assert "\n" not in message and trainer.global_step == 0  # refused before any training


def test_a_schedule_that_follows_the_gmar_evaluations_prunes(tmp_path: Path) -> None:
    gmar = GMARCallback(num_probe=4, every_n_epochs=2)
    pruning = HeadPruning(amount=2, criterion="gmar", epochs=[2], throughput_batch=0)
    _, module = fit(tmp_path, [gmar, pruning], max_epochs=3)
    assert sum(head_counts(module)) == 6 and pruning.history[0]["epoch"] == 2


def test_gmar_name_picks_whose_head_weights_rank_the_heads_and_several_unnamed_are_refused(tmp_path: Path) -> None:
    def callbacks(**pruning: object) -> list[Callback]:
        return [
            # Different probes, so that the two rank the heads differently and the choice shows.
            GMARCallback(num_probe=2, methods=("gmar_l1",), name="l1"),
            GMARCallback(num_probe=8, methods=("gmar_l2",), name="l2"),
            HeadPruning(amount=2, criterion="gmar", epochs=[1], throughput_batch=0, gmar_last_n=1, **pruning),
        ]

    refusals = [({}, r"finds 2 GMARCallbacks .*HeadPruning\(gmar_name="), ({"gmar_name": "l3"}, "names no GMARCall")]
    for pruning, message in refusals:
        with pytest.raises(ValueError, match=message) as raised:
            fit(tmp_path / "refused", callbacks(**pruning))
        assert "\n" not in str(raised.value)
    chosen = callbacks(gmar_name="l2")
    fit(tmp_path / "named", chosen)
    first = {name: callback.trajectory for name, callback in zip(("l1", "l2"), chosen, strict=False)}

    def lowest_two(trajectory: object) -> set[tuple[str, int]]:
        weights = trajectory.weights[0]  # the epoch-0 evaluation, the only one before the pruning at epoch 1
        order = torch.argsort(weights.flatten())[:2].tolist()
        heads = weights.shape[1]
        return {(trajectory.layer_names[index // heads], index % heads) for index in order}

    removed = {(layer, head) for layer, heads in chosen[2].history[0]["removed"].items() for head in heads}
    assert lowest_two(first["l1"]) != lowest_two(first["l2"])
    assert removed == lowest_two(first["l2"])


class BreaksUnderExplanation(TinyViTModule):
    """A forward that fails from epoch 1 on when run in eval mode with gradients: only GMAR's explanation does that
    (validation runs without gradients, training in train mode), so the GMARCallback switches itself off then."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.current_epoch >= 1 and not self.training and torch.is_grad_enabled():
            raise RuntimeError("the explained model broke")
        return super().forward(images)


def test_gmar_refuses_a_stale_ranking_after_the_gmar_callback_switched_itself_off(tmp_path: Path) -> None:
    gmar = GMARCallback(num_probe=4, model_getter=lambda module: module)
    pruning = HeadPruning(amount=2, criterion="gmar", epochs=[2], throughput_batch=0)
    with (
        pytest.warns(UserWarning, match="GMARCallback disabled itself"),
        pytest.raises(ValueError, match="GMARCallback switched itself off") as raised,
    ):
        fit(tmp_path, [gmar, pruning], max_epochs=3, module=BreaksUnderExplanation())
    assert "\n" not in str(raised.value) and not pruning.history and len(gmar.trajectory) == 1


@pytest.mark.parametrize("amount", [100, 0.99])
def test_fewer_heads_than_asked_are_removed_with_a_warning(tmp_path: Path, amount: float) -> None:
    pruning = HeadPruning(amount=amount, criterion="magnitude", epochs=[1], throughput_batch=0)
    with pytest.warns(UserWarning, match=r"asks for (100|8) heads but `min_heads_per_layer=1` leaves only 6"):
        _, module = fit(tmp_path, [pruning])
    assert head_counts(module) == [1, 1] and pruning.history[0]["asked"] == (100 if amount == 100 else 8)


def test_a_minimum_that_keeps_every_head_is_refused_at_setup(tmp_path: Path) -> None:
    pruning = HeadPruning(amount=2, criterion="magnitude", min_heads_per_layer=5)
    with pytest.raises(ValueError, match=r"`min_heads_per_layer=5` keeps every head .*use at most 3") as raised:
        fit(tmp_path, [pruning])
    assert "\n" not in str(raised.value)


def test_removing_every_head_is_refused_in_one_line(tmp_path: Path) -> None:
    fixed = HeadPruning(amount=8, criterion="magnitude", min_heads_per_layer=0)
    with pytest.raises(ValueError, match=r"`amount=8` removes every one of the model's 8 heads, .*; use at most 7"):
        fit(tmp_path, [fixed])
    # A scheduled amount is known only at its epoch: the fit stops there with one line, not a GMAR error later.
    scheduled = HeadPruning(amount=lambda epoch: 8, criterion="magnitude", min_heads_per_layer=0, throughput_batch=0)
    gmar = GMARCallback(num_probe=4, on_error="raise")
    with pytest.raises(ValueError, match=r"asks for 8 heads, every head the model has left \(8\)") as raised:
        fit(tmp_path, [gmar, scheduled])
    assert "\n" not in str(raised.value)


class NegativeEpoch(TinyViTModule):
    """Logs -epoch, so that ModelCheckpoint's "best" (mode max) is the first epoch's, saved before the pruning."""

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("neg_epoch", -float(self.current_epoch))


def test_a_checkpoint_saved_before_the_pruning_is_refused_with_the_way_to_load_it(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="neg_epoch", mode="max", save_top_k=1)
    pruning = HeadPruning(amount=2, criterion="magnitude", epochs=[1], throughput_batch=0)
    trainer, module = fit(tmp_path, [pruning, checkpoint], module=NegativeEpoch())
    best = checkpoint.best_model_path
    assert "epoch=0" in best and sum(head_counts(module)) == 6
    with pytest.raises(
        ValueError, match=r"has every head of layer .* saved before the pruning; load it into a .*load_from_checkpoint"
    ) as raised:
        trainer.validate(module, datamodule=tiny_data(), ckpt_path="best", verbose=False)
    assert "\n" not in str(raised.value)
    # The way the message names works: the checkpoint in a freshly built model, validated by the same Trainer.
    fresh = NegativeEpoch.load_from_checkpoint(best)
    assert head_counts(fresh) == [4, 4]
    (metrics,) = trainer.validate(fresh, datamodule=tiny_data(), verbose=False)
    assert "val_loss" in metrics


def test_head_pruning_json_is_written_in_every_run_folder_also_of_a_resumed_run(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    pruning = HeadPruning(amount=2, criterion="magnitude", epochs=[1], throughput_batch=0)
    loggers = [TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")]
    fit(tmp_path, [pruning, checkpoint], logger=loggers)
    for logger in loggers:
        assert json.loads((Path(logger.log_dir) / "head_pruning.json").read_text()) == pruning.history
    # Resumed into a new log folder, with no pruning left to do: the folder still gets the run's history.
    resumed = HeadPruning(amount=2, criterion="magnitude", epochs=[1], throughput_batch=0)
    logger = TensorBoardLogger(str(tmp_path), name="resumed")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=logger, callbacks=[resumed]))
    trainer.fit(TinyViTModule(), datamodule=tiny_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert json.loads((Path(logger.log_dir) / "head_pruning.json").read_text()) == pruning.history == resumed.history


class AverageRecorder(Callback):
    """Copies the EMA copy's block-0 attention weights at the start of every epoch."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema = ema
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        attention = self.ema._average_model.module.vit.blocks[0].attn
        self.states.append({"qkv": attention.qkv.weight.detach().clone(), "proj": attention.proj.weight.clone()})


def test_the_ema_copy_loses_the_same_heads_with_its_averages_kept(tmp_path: Path) -> None:
    ema = EMAWeightAveraging(decay=0.9)
    before, after = AverageRecorder(ema), AverageRecorder(ema)
    pruning = HeadPruning(amount=3, criterion="magnitude", epochs=[1], min_heads_per_layer=0, throughput_batch=0)
    _, module = fit(tmp_path, [ema, before, pruning, after], max_epochs=3)
    average = ema._average_model.module
    assert [block.attn.num_heads for block in average.vit.blocks] == head_counts(module)
    removed = pruning.history[0]["removed"].get("blocks.0.attn", [])
    assert removed, "the test needs block 0 to lose heads"
    channels = [head * HEAD_DIM + i for head in range(4) if head not in removed for i in range(HEAD_DIM)]
    rows = torch.tensor([part * 32 + channel for part in range(3) for channel in channels])
    old, new = before.states[1], after.states[1]
    assert torch.equal(new["qkv"], old["qkv"][rows]) and torch.equal(new["proj"], old["proj"][:, channels])
    # Lightning copies the averaged weights into the model at the end of the fit: they are the pruned EMA's.
    assert torch.equal(module.vit.blocks[0].attn.qkv.weight, average.vit.blocks[0].attn.qkv.weight)


def test_every_logger_gets_the_start_point_and_each_pruning_with_its_heads(
    tmp_path: Path, offline_wandb: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to its file store
    wandb_logger = WandbLogger(save_dir=str(tmp_path / "wandb_logs"), offline=True, project="gmar-test")
    mlflow_logger = MLFlowLogger(experiment_name="gmar-test", save_dir=str(tmp_path / "mlruns"))
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    pruning = HeadPruning(amount=2, criterion="magnitude", epochs=[1, 2], throughput_batch=2)
    fit(tmp_path, [pruning], max_epochs=3, logger=[wandb_logger, mlflow_logger, csv_logger])
    steps = [entry["step"] for entry in pruning.history]
    history = json.dumps(pruning.history, indent=2) + "\n"

    # CSV: the scalars at the start and at each pruning's step, the history beside them.
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["head_pruning/heads"]]
    assert [(int(row["step"]), float(row["head_pruning/heads"])) for row in rows] == [
        (0, 8),
        (steps[0], 6),
        (steps[1], 4),
    ]
    assert [row["head_pruning/removed_heads"] for row in rows] == ["", "2.0", "2.0"]
    assert all(row["head_pruning/speedup"] for row in rows[1:]) and not any("throughput" in key for key in rows[0])
    assert (Path(csv_logger.log_dir) / "head_pruning.json").read_text() == history

    # MLflow: the same points as metrics, the history as an artifact.
    client = MlflowClient(mlflow_logger._tracking_uri)
    heads = [(m.step, m.value) for m in client.get_metric_history(mlflow_logger.run_id, "head_pruning/heads")]
    assert heads == [(0, 8.0), (steps[0], 6.0), (steps[1], 4.0)]
    local = client.download_artifacts(mlflow_logger.run_id, "head_pruning.json", str(tmp_path / "download"))
    assert Path(local).read_text() == history

    # W&B: the removed heads of every pruning so far as a table, the history in the run's files.
    files_dir = Path(wandb_logger.experiment.dir)
    offline_wandb.finish()
    offline_wandb.teardown()  # waits until the offline transaction log is flushed
    assert (files_dir / "head_pruning.json").read_text() == history
    tables = [json.loads(path.read_text()) for path in (files_dir / "media" / "table" / "head_pruning").glob("*.json")]
    assert len(tables) == 2  # one per pruning, each with every pruning so far
    table = max(tables, key=lambda logged: len(logged["data"]))
    assert table["columns"] == ["step", "epoch", "layer", "heads"]
    expected = [
        [e["step"], e["epoch"], layer, str(heads)] for e in pruning.history for layer, heads in e["removed"].items()
    ]
    assert table["data"] == expected


class AverageAtStart(Callback):
    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema = ema

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {key: value.clone() for key, value in self.ema._average_model.module.state_dict().items()}


@pytest.mark.parametrize("ema_first", [True, False])
def test_a_pruned_run_with_ema_resumes_with_its_pruned_average(tmp_path: Path, ema_first: bool) -> None:
    def callbacks() -> tuple[EMAWeightAveraging, list[Callback]]:
        ema = EMAWeightAveraging(decay=0.9)
        pruning = HeadPruning(amount=3, criterion="magnitude", epochs=[1], throughput_batch=0)
        return ema, [ema, pruning] if ema_first else [pruning, ema]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    _, first = callbacks()
    _, module = fit(tmp_path, [*first, checkpoint])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ema, second = callbacks()
    start = AverageAtStart(ema)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, callbacks=[*second, start]))
    fresh = TinyViTModule()
    trainer.fit(fresh, datamodule=tiny_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    # Lightning stores the average as the checkpoint's state_dict; the fresh copy was pruned to take it.
    assert start.state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(start.state[key], value) for key, value in saved["state_dict"].items())
    assert head_counts(fresh) == head_counts(module) and trainer.current_epoch == 3
