from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import RandomSampler, SequentialSampler

from gmar_lightning.demos.data import SHAPES, ShapesDataModule, ShapesDataset, TwoShapesDataset, denormalize


def test_item_shapes_dtypes_labels_and_value_range() -> None:
    dataset = ShapesDataset(12, image_size=48, num_classes=3, seed=1)
    for index in range(len(dataset)):
        image, label, mask = dataset[index]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert mask.shape == (48, 48) and mask.dtype == torch.bool
        assert isinstance(label, int) and label == index % 3
        assert image.min() >= -1.5 and image.max() <= 3.5
    assert dataset.classes == ["circle", "square", "triangle"]
    assert len(dataset) == 12


def test_items_are_deterministic_per_seed_and_index() -> None:
    first, again, other_seed = ShapesDataset(4, seed=3), ShapesDataset(4, seed=3), ShapesDataset(4, seed=4)
    for index in range(4):
        assert torch.equal(first[index][0], again[index][0])
        assert torch.equal(first[index][2], again[index][2])
        assert not torch.equal(first[index][0], other_seed[index][0])
    assert torch.equal(first[-1][0], first[3][0])
    # Same class, different index: a different image.
    assert not torch.equal(ShapesDataset(8, seed=3)[0][0], ShapesDataset(8, seed=3)[4][0])


def test_masks_cover_exactly_a_visible_object_of_sensible_size() -> None:
    dataset = ShapesDataset(64, image_size=64, num_classes=len(SHAPES), seed=0)
    for index in range(len(dataset)):
        image, _, mask = dataset[index]
        area = mask.float().mean().item()
        assert 0.01 < area < 0.4, f"item {index}: mask area {area:.3f}"
        # A band of background pixels just outside the object.
        grown = F.max_pool2d(mask[None, None].float(), 7, stride=1, padding=3)[0, 0] > 0
        band = grown & ~mask
        inside, outside = image[:, mask], image[:, band]
        # The object is one flat colour (plus pixel noise), so the mask holds no background ...
        assert inside.std(dim=1).max() < 0.3, f"item {index}: object pixels are not uniform"
        # ... and that colour stands out from the surrounding background.
        contrast = (inside.mean(dim=1) - outside.mean(dim=1)).abs().max()
        assert contrast > 0.6, f"item {index}: contrast {contrast:.2f}"


def test_every_shape_renders_differently_at_the_same_place() -> None:
    # Item k of a dataset starting at 8 - k always draws from stream 8, so only the class (k) changes.
    masks = [ShapesDataset(8, num_classes=8, seed=5, start_index=8 - k)[k][2] for k in range(8)]
    for k in range(1, 8):
        assert not torch.equal(masks[0], masks[k])


def test_labels_are_balanced() -> None:
    dataset = ShapesDataset(40, image_size=16, num_classes=4)
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]


def test_denormalize_recovers_the_unit_range() -> None:
    image = ShapesDataset(1, image_size=16)[0][0]
    shown = denormalize(image)
    assert shown.min() >= 0.0 and shown.max() <= 1.0
    mean, std = torch.tensor(ShapesDataset.mean).view(3, 1, 1), torch.tensor(ShapesDataset.std).view(3, 1, 1)
    torch.testing.assert_close((shown - mean) / std, image)
    assert denormalize(image[None]).shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": 0}, "`n`"),
        ({"n": 4, "image_size": 15}, "`image_size`"),
        ({"n": 4, "num_classes": 1}, "`num_classes`"),
        ({"n": 4, "num_classes": len(SHAPES) + 1}, "`num_classes`"),
        ({"n": 4, "seed": -1}, "`seed`"),
        ({"n": 4, "start_index": -1}, "`start_index`"),
        ({"n": 2.5}, "`n`"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ShapesDataset(**kwargs)  # type: ignore[arg-type]


def test_out_of_range_index_raises_index_error() -> None:
    with pytest.raises(IndexError, match="`index`"):
        ShapesDataset(3, image_size=16)[3]


def test_datamodule_splits_are_disjoint_and_batches_are_triples() -> None:
    datamodule = ShapesDataModule(num_train=24, num_val=12, image_size=16, num_classes=3, batch_size=5, seed=2)
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    assert isinstance(train.sampler, RandomSampler) and isinstance(val.sampler, SequentialSampler)
    assert datamodule.classes == ["circle", "square", "triangle"]

    train_images = torch.cat([images for images, _, _ in train])
    val_batches = list(val)
    val_images = torch.cat([images for images, _, _ in val_batches])
    assert len(train_images) == 24 and len(val_images) == 12
    distances = torch.cdist(val_images.flatten(1), train_images.flatten(1))
    assert distances.min() > 0

    images, labels, masks = val_batches[0]
    assert images.shape == (5, 3, 16, 16) and labels.dtype == torch.int64 and masks.dtype == torch.bool
    assert labels.tolist() == [0, 1, 2, 0, 1]
    # Validation continues the training split's index range under the same seed.
    assert torch.equal(images[0], ShapesDataset(1, 16, 3, seed=2, start_index=24)[0][0])


def test_cached_datamodule_serves_the_same_items() -> None:
    settings = {"num_train": 6, "num_val": 4, "image_size": 16, "num_classes": 3, "seed": 5}
    rendered, fresh = ShapesDataModule(**settings, cache=True), ShapesDataModule(**settings)
    assert rendered.classes == fresh.classes == ["circle", "square", "triangle"]
    for cached_split, fresh_split in (
        (rendered.train_dataset, fresh.train_dataset),
        (rendered.val_dataset, fresh.val_dataset),
    ):
        assert len(cached_split) == len(fresh_split)
        for index in range(len(fresh_split)):
            (image, label, mask), (expected_image, expected_label, expected_mask) = (
                cached_split[index],
                fresh_split[index],
            )
            assert torch.equal(image, expected_image) and label == expected_label and torch.equal(mask, expected_mask)


@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"batch_size": 0}, "`batch_size`"), ({"num_workers": -1}, "`num_workers`")]
)
def test_datamodule_rejects_bad_arguments(kwargs: dict[str, int], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ShapesDataModule(**kwargs)


def test_two_shapes_items_hold_two_different_disjoint_objects_with_exact_masks() -> None:
    dataset = TwoShapesDataset(18, image_size=64, num_classes=4, seed=2)
    pairs = set()
    for index in range(len(dataset)):
        image, labels, masks = dataset[index]
        assert image.shape == (3, 64, 64) and labels.dtype == torch.int64 and masks.shape == (2, 64, 64)
        assert labels[0] != labels[1]
        pairs.add(tuple(labels.tolist()))
        assert not (masks[0] & masks[1]).any()
        for mask in masks:
            assert 0.005 < mask.float().mean().item() < 0.15
            grown = F.max_pool2d(mask[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0
            band = grown & ~mask & ~masks.any(dim=0)
            contrast = (image[:, mask].mean(dim=1) - image[:, band].mean(dim=1)).abs().max()
            assert contrast > 0.6, f"item {index}: contrast {contrast:.2f}"
    # Every unordered pair of the 4 classes, each equally often.
    assert pairs == {(a, b) for a in range(4) for b in range(a + 1, 4)}


def test_two_shapes_items_are_deterministic_and_draw_their_own_layout() -> None:
    first, again = TwoShapesDataset(6, seed=4), TwoShapesDataset(6, seed=4)
    for index in range(6):
        assert torch.equal(first[index][0], again[index][0]) and torch.equal(first[index][2], again[index][2])
    assert not torch.equal(first[0][0], TwoShapesDataset(6, seed=5)[0][0])
    # Which class sits in which half varies: the first label's object is not always left or top.
    centres = [
        dataset_masks.float().nonzero().float().mean(dim=0) for dataset_masks in (first[i][2][0] for i in range(6))
    ]
    assert len({(bool(c[0] < 32), bool(c[1] < 32)) for c in centres}) > 1
    with pytest.raises(IndexError, match="`index`"):
        first[6]
