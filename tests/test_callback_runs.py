"""GMARCallback across the Trainer set-ups users run: validate before and after fit, several evaluations per epoch,
a callback reused by a new Trainer, resumes with other methods, custom batches and loaders, fast_dev_run, no
validation, several ViTs. Every test is a real fit of a tiny ViT on CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gmar_lightning import GMARCallback, explain
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration


def make_trainer(tmp_path: Path, callbacks: list, logger=None, **overrides) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks, logger=logger if logger is not None else False, **trainer_kwargs(tmp_path, **overrides)
    )


def events(log_dir: str | Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def steps_of(accumulator: EventAccumulator, tag: str, kind: str = "Scalars") -> list[int]:
    return [event.step for event in getattr(accumulator, kind)(tag)]


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rho of two tie-free vectors, written out: Pearson correlation of their ranks."""
    ranks = [np.argsort(np.argsort(values)).astype(float) for values in (first, second)]
    centred = [rank - rank.mean() for rank in ranks]
    return float((centred[0] * centred[1]).sum() / np.sqrt((centred[0] ** 2).sum() * (centred[1] ** 2).sum()))


def gmar_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught if "GMARCallback" in str(warning.message)]


# ---------------------------------------------------------------------------------------------------------------
# items 1-3: validate runs are recorded apart and never rewrite the fit
# ---------------------------------------------------------------------------------------------------------------


def test_validate_after_fit_is_recorded_apart_and_leaves_the_fit_files_alone(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=2)
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data())
    run_dir = Path(logger.log_dir)
    fitted = {name: (run_dir / name).read_bytes() for name in ("head_importance.npz", "head_importance.csv")}

    trainer.validate(trainer.lightning_module, datamodule=tiny_data())

    assert callback.trajectory.steps == [2, 5]  # no row for an epoch that never trained
    assert {name: (run_dir / name).read_bytes() for name in fitted} == fitted
    validated = HeadTrajectory.load_npz(run_dir / "head_importance_validate.npz")
    assert validated.steps == [6] and callback.validation_trajectory.steps == [6]
    logged = events(run_dir)
    assert steps_of(logged, "gmar/overlay/gmar_l1", "Images") == [2, 5]
    assert steps_of(logged, "gmar_validate/overlay/gmar_l1", "Images") == [6]


def test_validate_of_an_early_checkpoint_explains_it_without_truncating_the_fit(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(tmp_path, [callback, every_epoch], max_epochs=3)
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data())
    fit_files = sorted((tmp_path / "gmar").glob("version_*/head_importance.npz"))
    assert len(fit_files) == 1
    fitted = fit_files[0].read_bytes()

    trainer.validate(datamodule=tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))

    assert callback.trajectory.steps == [2, 5, 8]
    assert fit_files[0].read_bytes() == fitted
    # Keyed by the checkpoint's step, and the same head weights the fit recorded for those weights and this probe.
    assert callback.validation_trajectory.steps == [3]
    torch.testing.assert_close(callback.validation_trajectory.weights[0], callback.trajectory.weights[0])


def test_baseline_validate_before_fit_then_the_fit_logs_every_epoch(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4, methods=("gmar_l1", "grad_rollout"))
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    pl.seed_everything(0, verbose=False)
    module = TinyViTModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, datamodule=tiny_data())
        trainer.fit(module, datamodule=tiny_data())
    assert gmar_warnings(caught) == []
    assert callback.validation_trajectory.steps == [0]
    assert callback.trajectory.steps == [2, 5]
    assert not callback.probe.images.is_inference()


# ---------------------------------------------------------------------------------------------------------------
# items 4 and 18: one row per evaluation, logged at the step of Lightning's validation metrics
# ---------------------------------------------------------------------------------------------------------------


def test_several_evaluations_per_epoch_each_get_a_row_and_line_up_with_val_loss(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=2, val_check_interval=0.5)
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data(num_train=64))

    assert callback.trajectory.steps == [1, 3, 5, 7]
    assert callback.trajectory.epochs == [0, 0, 1, 1]
    logged = events(logger.log_dir)
    val_steps = steps_of(logged, "val_loss")
    assert val_steps == [1, 3, 5, 7]
    assert steps_of(logged, "gmar/entropy/layer_00") == val_steps
    assert steps_of(logged, "gmar/overlay/gmar_l1", "Images") == val_steps
    # Rank stability compares each evaluation with the previous evaluation, not with the previous epoch.
    stability = logged.Scalars("gmar/rank_stability/layer_01")
    assert [event.step for event in stability] == val_steps[1:]
    weights = callback.trajectory.weights[:, 1].numpy()
    expected = [spearman(weights[row - 1], weights[row]) for row in range(1, 4)]
    assert [event.value for event in stability] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# items 5 and 11: state belongs to the run
# ---------------------------------------------------------------------------------------------------------------


def test_a_callback_reused_by_a_new_trainer_starts_fresh_unless_it_resumes(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path / "a", [callback, checkpoint], max_epochs=2).fit(TinyViTModule(), datamodule=tiny_data())
    first_probe, first_weights = callback.probe.images.clone(), callback.trajectory.weights.clone()

    other_data = tiny_data()
    other_data.val_dataset.seed = 99
    logger = TensorBoardLogger(str(tmp_path), name="b")
    make_trainer(tmp_path / "b", [callback], logger=logger, max_epochs=2).fit(TinyViTModule(), datamodule=other_data)
    assert torch.equal(callback.probe.images, torch.stack([other_data.val_dataset[i][0] for i in range(4)]))
    assert callback.trajectory.steps == [2, 5]
    assert steps_of(events(logger.log_dir), "gmar/rank_stability/layer_00") == [5]  # nothing compared with run a

    resumed = make_trainer(tmp_path / "c", [callback], max_epochs=3)
    resumed.fit(TinyViTModule(), datamodule=other_data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(callback.probe.images, first_probe)
    assert callback.trajectory.steps == [2, 5, 8]
    assert torch.equal(callback.trajectory.weights[:2], first_weights)


def test_resume_with_other_methods_keeps_the_probe_and_the_history(tmp_path: Path) -> None:
    first = GMARCallback(num_probe=4, methods=("gmar_l1",))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [first, checkpoint], max_epochs=2).fit(TinyViTModule(), datamodule=tiny_data())

    second = GMARCallback(num_probe=4, methods=("gmar_l1", "rollout", "attention"), mean=(0.3,) * 3, std=(0.2,) * 3)
    trainer = make_trainer(tmp_path, [second], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyViTModule(), datamodule=tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert gmar_warnings(caught) == []
    assert torch.equal(second.probe.images, first.probe.images)
    assert second.trajectory.steps == [2, 5, 8]
    assert torch.equal(second.trajectory.weights[:2], first.trajectory.weights)


# ---------------------------------------------------------------------------------------------------------------
# items 12 and 13: custom batches and several validation loaders
# ---------------------------------------------------------------------------------------------------------------


class DictShapes(Dataset):
    """Shapes items as dicts keyed ``img``/``lbl``, a layout the default batch reader does not know."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, label, _ = self.base[index]
        return {"img": image, "lbl": label}


class StreamedDictShapes(IterableDataset):
    """The same dicts from an iterable dataset, which cannot be indexed: the probe comes from the batches."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __iter__(self):
        return iter(DictShapes(self.base)[index] for index in range(len(self.base)))


class DictViTModule(TinyViTModule):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["img"]), batch["lbl"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["img"]), batch["lbl"]))


@pytest.mark.parametrize("dataset_kind", [DictShapes, StreamedDictShapes])
def test_a_batch_the_callback_cannot_read_warns_once_and_the_fit_goes_on(tmp_path: Path, dataset_kind: type) -> None:
    data = tiny_data()
    train = DataLoader(DictShapes(data.train_dataset), batch_size=16)
    val = DataLoader(dataset_kind(data.val_dataset), batch_size=16)
    callback = GMARCallback(num_probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [callback], max_epochs=2)
        trainer.fit(DictViTModule(), train_dataloaders=train, val_dataloaders=val)
    (message,) = gmar_warnings(caught)
    assert "keys ['img', 'lbl']" in message and "unpack_batch=" in message
    assert trainer.current_epoch == 2


@pytest.mark.parametrize("dataset_kind", [DictShapes, StreamedDictShapes])
def test_unpack_batch_reads_images_and_labels_of_a_custom_batch(tmp_path: Path, dataset_kind: type) -> None:
    data = tiny_data()
    train = DataLoader(DictShapes(data.train_dataset), batch_size=16)
    val = DataLoader(dataset_kind(data.val_dataset), batch_size=16)
    callback = GMARCallback(num_probe=4, target="label", unpack_batch=lambda batch: (batch["img"], batch["lbl"]))
    make_trainer(tmp_path, [callback], max_epochs=1).fit(DictViTModule(), train_dataloaders=train, val_dataloaders=val)
    assert callback.trajectory.steps == [2]
    assert callback.probe.labels.tolist() == [data.val_dataset[i][1] for i in range(4)]


class TwoLoaderModule(TinyViTModule):
    def validation_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


def test_probe_indices_with_a_dict_of_validation_loaders(tmp_path: Path) -> None:
    first, second = tiny_data(), tiny_data()
    second.val_dataset.seed = 5
    loaders = {"clean": first.val_dataloader(), "shifted": second.val_dataloader()}
    callback = GMARCallback(probe=[1, 3], on_error="raise")
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(TwoLoaderModule(), train_dataloaders=first.train_dataloader(), val_dataloaders=loaders)
    assert torch.equal(callback.probe.images, torch.stack([first.val_dataset[i][0] for i in (1, 3)]))
    assert callback.trajectory.steps == [2]


# ---------------------------------------------------------------------------------------------------------------
# items 14, 19, 20: set-ups where nothing can be explained say so once, typos fail at construction
# ---------------------------------------------------------------------------------------------------------------


def test_fast_dev_run_skips_quietly_with_one_line(tmp_path: Path, rank_zero_notices: list[str]) -> None:
    callback = GMARCallback(num_probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], fast_dev_run=True).fit(TinyViTModule(), datamodule=tiny_data())
    assert gmar_warnings(caught) == []
    assert [notice for notice in rank_zero_notices if "GMARCallback" in notice] == [
        "GMARCallback: skipped because `fast_dev_run` is on (it runs no real validation)."
    ]
    assert len(callback.trajectory) == 0 and not list(tmp_path.rglob("head_importance*"))


def test_no_validation_says_once_that_nothing_will_be_explained(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], limit_val_batches=0, max_epochs=2).fit(
            TinyViTModule(), datamodule=tiny_data()
        )
    assert gmar_warnings(caught) == [
        "GMARCallback: `limit_val_batches=0` turns validation off, so nothing will be explained."
    ]


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"residul": 0.3}, r"`explain_options` has unknown key 'residul'; valid keys: residual, "),
        ({"chunk": 4}, r"unknown key 'chunk'"),
        ({"residual": 2.0}, r"`residual` must lie in \[0.0, 1.0\], got 2.0"),
    ],
)
def test_explain_options_typos_fail_at_construction(options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        GMARCallback(explain_options=options)


# ---------------------------------------------------------------------------------------------------------------
# item 16: several ViTs in one module
# ---------------------------------------------------------------------------------------------------------------


class TeacherStudent(TinyViTModule):
    def __init__(self) -> None:
        super().__init__()
        self.teacher = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)


def test_several_vits_warn_naming_them_and_model_getter_chooses(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4)
    with pytest.warns(UserWarning, match=r"several ViTs \(`vit`, `teacher`\).*`model_getter=lambda module: module\."):
        make_trainer(tmp_path, [callback], max_epochs=1).fit(TeacherStudent(), datamodule=tiny_data())
    assert callback.trajectory.weights.shape[1:] == (2, 4)  # the first one, `vit`

    chosen = GMARCallback(num_probe=4, model_getter=lambda module: module.teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [chosen], max_epochs=1).fit(TeacherStudent(), datamodule=tiny_data())
    assert gmar_warnings(caught) == []
    assert chosen.trajectory.weights.shape[1:] == (3, 2)


# ---------------------------------------------------------------------------------------------------------------
# item 15: a ViT backbone with a separate head
# ---------------------------------------------------------------------------------------------------------------


class BackboneWithHead(TinyViTModule):
    """A headless ViT (``num_classes=0``, 32 features) under a separate 4-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(images))


def test_backbone_with_a_separate_head_is_explained_through_the_modules_forward(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4, on_error="raise", metrics=("deletion_auc",))
    module = BackboneWithHead()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(module, datamodule=tiny_data())
    assert callback.trajectory.weights.shape == (1, 2, 4)  # the backbone's 2 layers of 4 heads
    # The head weights are those of the LightningModule's own classes (its forward adds the head), not of feature
    # indices of the backbone's 32-wide output.
    expected = explain(module, callback.probe.images, vit=module.vit).head_weights.mean(0)
    torch.testing.assert_close(callback.trajectory.weights[-1], expected, rtol=1e-4, atol=1e-5)

    getter = GMARCallback(num_probe=4, on_error="raise", model_getter=lambda m: torch.nn.Sequential(m.vit, m.head))
    make_trainer(tmp_path, [getter], max_epochs=1).fit(BackboneWithHead(), datamodule=tiny_data())
    assert getter.trajectory.weights.shape == (1, 2, 4)
