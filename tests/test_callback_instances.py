"""GMARCallback beside other callbacks in one Trainer: Lightning's EMAWeightAveraging in either order (the weights
that were validated are explained, and training is unchanged to the bit), and several named GMARCallbacks that never
collide. Real fits of a tiny ViT on CPU; head weights are checked against tests/reference.py."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import VisionTransformer

from gmar_lightning import GMARCallback
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs
from tests.reference import reference_explain

pytestmark = pytest.mark.integration


class WeightsAt(pl.Callback):
    """Copies the ViT's weights at validation: those the first batch runs with, and those before any swap."""

    def __init__(self) -> None:
        self.validated: list[dict] = []
        self.raw: list[dict] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:  # listed first: no other callback has swapped anything in yet
            self.raw.append(copy.deepcopy(pl_module.vit.state_dict()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and batch_idx == 0:
            self.validated.append(copy.deepcopy(pl_module.vit.state_dict()))


def head_weights_of(state: dict, images: torch.Tensor) -> torch.Tensor:
    """The probe-mean GMAR (L1) head weights ``[L, H]`` of a tiny ViT holding ``state``, by tests/reference.py."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4)
    model.load_state_dict(state)
    _, weights = reference_explain(model.eval(), images, "gmar_l1", num_prefix=1, readout=[0], grid=(4, 4))
    return weights.mean(dim=0)


def final_state(trainer: pl.Trainer) -> dict:
    return {key: value.clone() for key, value in trainer.lightning_module.state_dict().items()}


def fit(tmp_path: Path, callbacks: list) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, logger=False, **trainer_kwargs(tmp_path, max_epochs=2))
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data())
    return trainer


@pytest.mark.parametrize("ema_first", [True, False])
def test_the_averaged_weights_that_were_validated_are_explained_in_either_order(
    tmp_path: Path, ema_first: bool
) -> None:
    weights, gmar, ema = WeightsAt(), GMARCallback(num_probe=4), EMAWeightAveraging(decay=0.9)
    trainer = fit(tmp_path / "with", [weights, ema, gmar] if ema_first else [weights, gmar, ema])

    assert len(gmar.trajectory) == len(weights.validated) == 2
    for row, (validated, raw) in enumerate(zip(weights.validated, weights.raw, strict=True)):
        expected = head_weights_of(validated, gmar.probe.images)
        torch.testing.assert_close(gmar.trajectory.weights[row], expected, atol=1e-5, rtol=1e-4)
        # The raw weights explain differently, so the check above tells the two apart.
        assert (head_weights_of(raw, gmar.probe.images) - expected).abs().max() > 1e-3

    # Swapping the averaged weights in and out again for the explanation leaves training bit-identical.
    without = fit(tmp_path / "without", [EMAWeightAveraging(decay=0.9)])
    for key, value in final_state(without).items():
        assert torch.equal(final_state(trainer)[key], value), key


def test_named_callbacks_keep_their_own_tags_files_and_checkpoint_state(tmp_path: Path) -> None:
    first, second = GMARCallback(num_probe=4, name="a"), GMARCallback(num_probe=4, methods=("gmar_l2",), name="b")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = pl.Trainer(callbacks=[first, second, checkpoint], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyViTModule(), datamodule=tiny_data())

    run_dir = Path(logger.log_dir)
    for callback, name in ((first, "a"), (second, "b")):
        saved = HeadTrajectory.load_npz(run_dir / f"head_importance_{name}.npz")
        assert torch.equal(saved.weights, callback.trajectory.weights)
    assert not torch.equal(first.trajectory.weights, second.trajectory.weights)  # L1 and L2 norms differ
    assert not (run_dir / "head_importance.npz").exists()
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "gmar_a/entropy/layer_00" in tags and "gmar_b/entropy/layer_00" in tags
    assert not any(tag.startswith("gmar/") for tag in tags)
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    assert sorted(key for key in states if key.startswith("GMARCallback")) == sorted(
        [first.state_key, second.state_key]
    )

    resumed_a, resumed_b = GMARCallback(num_probe=4, name="a"), GMARCallback(num_probe=4, name="b")
    resumed = pl.Trainer(callbacks=[resumed_b, resumed_a], logger=False, **trainer_kwargs(tmp_path, max_epochs=3))
    resumed.fit(TinyViTModule(), datamodule=tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed_a.trajectory.weights[:2], first.trajectory.weights)
    assert torch.equal(resumed_b.trajectory.weights[:2], second.trajectory.weights)


def test_two_callbacks_without_distinct_names_are_refused_at_setup_naming_the_argument(tmp_path: Path) -> None:
    callbacks = [GMARCallback(num_probe=4), GMARCallback(num_probe=2, on_error="raise")]
    trainer = pl.Trainer(callbacks=callbacks, logger=False, **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match=r"^Another GMARCallback in this Trainer also has no `name`.*distinct `name=`"):
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
    with pytest.raises(ValueError, match=r"`name` must be letters, digits"):
        GMARCallback(name="a/b")
