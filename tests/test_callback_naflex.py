"""GMARCallback on NaFlex validation batches with zero user code: a ``Siglip2ForImageClassification`` fine-tuned on
``Siglip2ImageProcessor`` dicts of images of two aspect ratios, and the images rebuilt from their patches in both
libraries' spellings.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("SigLIP 2 is supported on transformers 5", allow_module_level=True)
pytest.importorskip("torchvision")  # Siglip2ImageProcessor's backend

from gmar_lightning import GMARCallback, explain  # noqa: E402
from gmar_lightning.callback.records import Probe, probe_metric_scores  # noqa: E402
from gmar_lightning.render import naflex_display  # noqa: E402
from tests.lightning_helpers import trainer_kwargs  # noqa: E402
from tests.test_callback import read_events  # noqa: E402
from tests.test_hf_siglip2 import PATCH, classifier  # noqa: E402
from tests.test_naflex import images_of  # noqa: E402
from tests.test_naflex import make as naflexvit  # noqa: E402
from tests.test_naflex import naflex_batch as timm_batch  # noqa: E402

# A wide (2x4 patches) and a tall (4x2) image, padded to 10 patches.
WIDE, TALL = (8, 16), (16, 8)
LENGTH = 10


def raw_images(count: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [
        torch.randint(0, 256, (3, *(WIDE, TALL)[i % 2]), generator=generator, dtype=torch.uint8) for i in range(count)
    ]


def processed(images: list[Tensor], length: int = LENGTH) -> dict[str, Tensor]:
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=length)
    return dict(processor(images=images, do_resize=False, return_tensors="pt"))


class Siglip2Module(pl.LightningModule):
    """A user's fine-tuning module: batches are the processor's dicts with ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = classifier()

    def forward(self, batch: dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]) -> Tensor:
        batch = batch[0] if isinstance(batch, list | tuple) else batch
        return self.model(**{key: value for key, value in batch.items() if key != "labels"}).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch), batch["labels"])

    def validation_step(self, batch: dict[str, Tensor] | tuple[dict[str, Tensor], Tensor], batch_idx: int) -> None:
        labels = batch[1] if isinstance(batch, list | tuple) else batch["labels"]
        self.log("val_loss", F.cross_entropy(self(batch), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def samples(count: int) -> list[dict[str, Tensor]]:
    batch = processed(raw_images(count))
    return [{**{key: value[index] for key, value in batch.items()}, "labels": torch.tensor(index % 5)}
            for index in range(count)]  # fmt: skip


def png_size(event) -> tuple[int, int]:
    return Image.open(io.BytesIO(event.encoded_image_string)).size


def test_a_siglip2_fit_on_processor_dicts_logs_each_image_at_its_own_aspect_ratio(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=3, methods=("gmar_l1",), on_error="raise")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    module = Siglip2Module()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[callback]))
    trainer.fit(module, DataLoader(samples(6), batch_size=3), DataLoader(samples(5), batch_size=2))

    probe = callback.probe
    assert sorted(probe.images) == ["pixel_attention_mask", "pixel_values", "spatial_shapes"]
    assert probe.images["spatial_shapes"].tolist() == [[2, 4], [4, 2], [2, 4]]
    assert probe.labels.tolist() == [0, 1, 2]

    events = read_events(logger.log_dir)
    tags = events.Tags()
    # One overlay page per probe image (a page puts tiles of one size side by side), at each evaluation.
    pages = [events.Images(tag) for tag in ("gmar/overlay/gmar_l1", "gmar/overlay/gmar_l1/images_2")]
    assert [len(page) for page in pages] == [2, 2]
    (wide_width, wide_height), (tall_width, tall_height) = (png_size(page[-1]) for page in pages)
    assert tall_height > wide_height and tall_width < wide_width
    assert "gmar/overlay/gmar_l1/images_3" in tags["images"]
    assert "gmar/evolution/gmar_l1/images_2" in tags["images"]
    scalar_tags = [tag for tag in tags["scalars"] if tag.startswith("gmar/head_mean/")]
    assert len(scalar_tags) == 2 * 4  # 2 layers of 4 heads

    # The weights validated last are the fit's final ones: the logged maps are explain's on the probe dict.
    module.eval()
    expected = explain(module.model, probe.images, method="gmar_l1")
    weights = torch.tensor([[events.Scalars(f"gmar/head_mean/layer_{layer:02d}/head_{head:02d}")[-1].value
                             for head in range(4)] for layer in range(2)])  # fmt: skip
    torch.testing.assert_close(weights, expected.head_weights.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(callback.trajectory.weights[-1], expected.head_weights.mean(0), rtol=0, atol=1e-6)
    # The evolution history: the 16x16 canvases (under 64 px: not pooled), NaN outside each image's grid counted as 0,
    # quantised to 255 levels.
    history = callback.map_history.maps["gmar_l1"][-1].float() / 255
    assert history.shape == expected.maps.shape == (3, 16, 16)
    torch.testing.assert_close(history, expected.maps.nan_to_num(0.0), rtol=0, atol=0.5 / 255 + 1e-6)

    # The checkpoint holds the NaFlex probe; a resumed fit explains the same dict.
    resumed = GMARCallback(num_probe=3, methods=("gmar_l1",), on_error="raise")
    checkpoint = trainer.checkpoint_callback.best_model_path
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False, callbacks=[resumed]))
    trainer.fit(Siglip2Module(), DataLoader(samples(6), batch_size=3), DataLoader(samples(5), batch_size=2),
                ckpt_path=checkpoint)  # fmt: skip
    for key, value in probe.images.items():
        assert torch.equal(resumed.probe.images[key], value)
    assert len(resumed.trajectory) == 3


class Batches(IterableDataset):
    """(NaFlex dict, labels) batches as timm's NaFlex loader yields them, padded to a different length each."""

    def __iter__(self):
        images = raw_images(4)
        yield processed(images[:2], length=10), torch.tensor([0, 1])
        yield processed(images[2:], length=12), torch.tensor([2, 3])


def test_a_probe_from_iterable_batches_of_two_lengths_is_padded_to_one(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=3, methods=("gmar_l1",), on_error="raise")
    module = Siglip2Module()
    pl.Trainer(**trainer_kwargs(tmp_path, logger=False, callbacks=[callback])).validate(
        module, DataLoader(Batches(), batch_size=None)
    )
    probe = callback.probe.images
    alone = processed(raw_images(4)[2:3], length=12)
    assert probe["pixel_values"].shape[:2] == (3, 12) and not probe["pixel_values"].is_inference()
    assert probe["pixel_attention_mask"].tolist() == [[1] * 8 + [0] * 4] * 3
    assert torch.equal(probe["pixel_values"][2], alone["pixel_values"][0])
    assert callback.probe.labels.tolist() == [0, 1, 2]
    expected = explain(module.model.eval(), processed(raw_images(4)[:3], length=12), method="gmar_l1")
    torch.testing.assert_close(callback.validation_trajectory.weights[-1], expected.head_weights.mean(0), rtol=0,
                               atol=1e-6)  # fmt: skip


class NaFlexViTModule(pl.LightningModule):
    """A timm NaFlexViT validated on (dict, labels) pairs, as timm's NaFlex loader yields them."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = naflexvit("map")

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.vit(batch)

    def validation_step(self, batch: list, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


class TimmBatches(IterableDataset):
    def __iter__(self):
        images = images_of([(16, 24), (24, 16), (24, 32)])
        yield timm_batch(images[:2], length=6), torch.tensor([0, 1])
        yield timm_batch(images[2:], length=12), torch.tensor([2])


def test_a_naflexvit_validated_on_timm_pairs_is_explained_on_its_probe(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=3, methods=("gmar_l1",), on_error="raise")
    module = NaFlexViTModule()
    pl.Trainer(**trainer_kwargs(tmp_path, logger=False, callbacks=[callback])).validate(
        module, DataLoader(TimmBatches(), batch_size=None)
    )
    expected_batch = timm_batch(images_of([(16, 24), (24, 16), (24, 32)]), length=12)
    for key, value in expected_batch.items():
        assert torch.equal(callback.probe.images[key], value), key
    expected = explain(module.vit.eval(), expected_batch, method="gmar_l1")
    torch.testing.assert_close(callback.validation_trajectory.weights[-1], expected.head_weights.mean(0), rtol=0,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("spelling", ["transformers", "timm"])
def test_naflex_display_rebuilds_each_image_from_its_patches(spelling: str) -> None:
    if spelling == "transformers":
        raw = raw_images(2)
        batch = processed(raw)
        # The processor rescales to [0, 1] and normalises with mean 0.5, std 0.5.
        expected = [image.float() / 255 for image in raw]
        shown = naflex_display(batch, (PATCH, PATCH), mean=[0.5] * 3, std=[0.5] * 3)
    else:
        generator = torch.Generator().manual_seed(3)
        expected = [torch.rand(3, 16, 32, generator=generator), torch.rand(3, 24, 8, generator=generator)]
        shown = naflex_display(timm_batch(expected, length=9), (8, 8), mean=[0.0] * 3, std=[1.0] * 3)
    assert [tuple(image.shape) for image in shown] == [(1, *image.shape) for image in expected]
    for image, own in zip(shown, expected, strict=True):
        torch.testing.assert_close(image[0], own, rtol=0, atol=1e-6)


def test_metrics_on_a_naflex_probe_are_refused_in_one_line() -> None:
    probe = Probe(processed(raw_images(2)))
    with pytest.raises(ValueError, match=r"^`metrics` \['deletion_auc'\] .*NaFlex batch: pass metrics=\(\)\.$"):
        probe_metric_scores(classifier(), probe, None, ["deletion_auc"])  # type: ignore[arg-type]
