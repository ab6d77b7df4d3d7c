"""Text is drawn literally: class names with ``$`` are never read as matplotlib mathtext (``"$\\frac$"`` must not
switch GMARCallback off), and a warning always says what went wrong on its first line. Real fits and real
rasterisation with matplotlib's Agg renderer."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gmar_lightning import GMARCallback
from gmar_lightning.render import figure_to_array, overlay_grid_figure
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

DOLLARS = ["US$ 1 or CA$ 2", r"$\frac$", "$x$", "plain"]


def test_an_overlay_grid_draws_class_names_exactly_as_plain_text() -> None:
    figure = overlay_grid_figure(torch.rand(4, 3, 16, 16), torch.rand(4, 16, 16), DOLLARS, DOLLARS[::-1])
    drawn = figure_to_array(figure)
    # The same figure with matplotlib's math parsing switched off and the raw names: what literal text looks like.
    pairs = zip(DOLLARS, DOLLARS[::-1], strict=True)
    raw = iter([line for truth, pred in pairs for line in (f"true: {truth}", f"pred: {pred}")])
    for text in figure.axes[0].texts:
        text.set_text(next(raw))
        text.set_parse_math(False)
    assert np.array_equal(drawn, figure_to_array(figure))


@pytest.mark.integration
def test_dollar_class_names_keep_the_callback_on_for_the_whole_fit(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4, class_names=DOLLARS)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
    assert [str(warning.message) for warning in caught if "GMARCallback" in str(warning.message)] == []
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Images("gmar/overlay/gmar_l1")] == [2, 5]
    assert len(callback.trajectory) == 2


def raise_with_a_leading_newline(batch: object) -> object:
    raise ValueError("\nthe batch holds\n   no images")


@pytest.mark.integration
def test_a_warning_says_what_failed_on_its_first_line(tmp_path: Path) -> None:
    callback = GMARCallback(num_probe=4, unpack_batch=raise_with_a_leading_newline)
    trainer = pl.Trainer(callbacks=[callback], logger=False, **trainer_kwargs(tmp_path, max_epochs=1))
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
    (message,) = [str(warning.message) for warning in caught if "GMARCallback" in str(warning.message)]
    assert "(ValueError: the batch holds no images); training goes on" in message.splitlines()[0]
