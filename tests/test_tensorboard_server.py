"""A real TensorBoard server shows what GMARCallback logged, and headless Chromium shows it at the default card size.

The server runs with the flags the demo prints (`--samples_per_plugin images=1000`), so every evaluation's images are
served; the browser test opens the Time Series and Images views, saves screenshots and checks in the rendered page that
the evolution figure and the per-head charts are there.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from gmar_lightning import GMARCallback
from gmar_lightning.demos.data import ShapesDataModule
from gmar_lightning.demos.job import TENSORBOARD_SAMPLES
from gmar_lightning.demos.model import ViTClassifier
from tests.browser import SERVER_TIMEOUT_S, find_browser, get, image_cards, rendered_dom, screenshot, tensorboard

IMAGE_TAG = "gmar/overlay/gmar_l1"
EVOLUTION_TAG = "gmar/evolution/gmar_l1"
HISTOGRAM_TAG = "gmar/head_weights/layer_00"
SCALAR_TAG = "gmar/entropy/layer_00"
EPOCHS = 3

# One worker runs the server and browser tests, apart from the other multi-process tests (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("processes")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real fit logging through TensorBoardLogger."""
    root = tmp_path_factory.mktemp("tb")
    module = ViTClassifier(
        "vit_tiny_patch16_224",
        num_classes=4,
        img_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4},
    )
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        logger=TensorBoardLogger(str(root), name="run"),
        callbacks=[GMARCallback(num_probe=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=ShapesDataModule(num_train=32, num_val=16, image_size=32, batch_size=16))
    return root


@pytest.fixture(scope="module")
def server(log_dir: Path) -> Iterator[str]:
    with tensorboard(log_dir, *TENSORBOARD_SAMPLES.split()) as base_url:
        yield base_url


def _tags(base_url: str, plugin: str) -> dict[str, Any]:
    return json.loads(get(f"{base_url}/data/plugin/{plugin}/tags"))


def _served(url: str) -> list[Any]:
    """The entries TensorBoard serves at ``url`` once it has read all ``EPOCHS`` evaluations (or the last answer after
    ``SERVER_TIMEOUT_S``): it reads event files in the background and serves the tags as soon as it meets them, so
    the last evaluation's scalars, written after its images, may not be read yet when the images are served."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while len(entries := json.loads(get(url))) < EPOCHS and time.monotonic() < deadline:
        time.sleep(0.5)
    return entries


def test_tensorboard_serves_the_gmar_tags(server: str) -> None:
    images, histograms, scalars = (_tags(server, plugin) for plugin in ("images", "histograms", "scalars"))
    (run,) = [name for name, tags in images.items() if IMAGE_TAG in tags]
    assert {EVOLUTION_TAG, "gmar/head_importance", "gmar/trajectory/layer_00", "gmar/specialisation/entropy"} <= set(
        images[run]
    )
    assert {HISTOGRAM_TAG, "gmar/head_weights/layer_01", "gmar/head_weights/layer_01/head_03"} <= set(histograms[run])
    assert {"gmar/top_head_share/layer_01", "gmar/rank_stability/layer_00", "gmar/head_mean/layer_01/head_02"} <= set(
        scalars[run]
    )
    assert "val_acc" in scalars[run]

    for tag in (IMAGE_TAG, EVOLUTION_TAG):
        entries = _served(f"{server}/data/plugin/images/images?{urllib.parse.urlencode({'run': run, 'tag': tag})}")
        assert [entry["step"] for entry in entries] == sorted(entry["step"] for entry in entries)
        assert len(entries) == EPOCHS  # every evaluation is served
        image = get(f"{server}/data/plugin/images/individualImage?{entries[-1]['query']}")
        assert image[:8] == b"\x89PNG\r\n\x1a\n"

    series = _served(f"{server}/data/plugin/scalars/scalars?{urllib.parse.urlencode({'run': run, 'tag': SCALAR_TAG})}")
    assert len(series) == EPOCHS and all(0.0 <= value <= 1.0 for _, _, value in series)

    # The per-layer charts: one chart per layer, one line per head.
    layout = json.loads(get(f"{server}/data/plugin/custom_scalars/layout"))
    heads = {category["title"]: category["chart"] for category in layout["category"]}["gmar/head_mean"]
    assert [chart["title"] for chart in heads] == ["layer_00", "layer_01"]
    assert heads[1]["multiline"]["tag"] == [f"^gmar/head_mean/layer_01/head_0{head}$" for head in range(4)]


def _assert_drawn(path: Path) -> None:
    with Image.open(path) as shot:
        assert shot.size == (1400, 1000)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # more than a blank page with a header


@pytest.mark.integration
def test_time_series_and_images_views_in_chromium(server: str, tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found; apt-get install chromium")
    profiles = iter(tmp_path / f"profile_{index}" for index in range(40))  # a fresh one per page: TensorBoard keeps
    # the last tag filter in the browser's storage

    def time_series(tag_filter: str) -> str:
        return f"{server}/?darkMode=false&tagFilter={urllib.parse.quote(tag_filter)}#timeseries"

    def assert_cards(tag_filter: str, expected: set[str], image: bool = False) -> None:
        # Time Series renders only the cards in view, so each group of cards gets its own filtered page. Headless
        # Chromium sometimes serialises the page before the cards (or an image card's image) are drawn on a busy
        # machine: up to 5 tries.
        for _ in range(5):
            dom = rendered_dom(browser, time_series(tag_filter), next(profiles))
            titles = set(re.findall(r"gmar/[a-z_]+(?:/[a-z0-9_]+)*", dom))
            drawn = not image or re.search(r"<img[^>]+src=\"data/plugin/timeseries/imageData", dom)
            if expected <= titles and drawn:
                return
        pytest.fail(f"TensorBoard's Time Series never showed {sorted(expected)} for the filter {tag_filter!r}")

    assert_cards("gmar/evolution", {EVOLUTION_TAG}, image=True)  # the card shows its image, not an empty frame
    assert_cards(HISTOGRAM_TAG, {HISTOGRAM_TAG, *(f"{HISTOGRAM_TAG}/head_0{head}" for head in range(4))})
    assert_cards("gmar/head_mean/layer_00", {f"gmar/head_mean/layer_00/head_0{head}" for head in range(4)})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    _assert_drawn(
        screenshot(browser, time_series("gmar/(evolution|overlay)"), shots / "time_series.png", next(profiles))
    )
    images_view = f"{server}/?darkMode=false#images&tagFilter={urllib.parse.quote('gmar/(evolution|overlay)')}"
    _assert_drawn(screenshot(browser, images_view, shots / "images.png", next(profiles)))


# test_render checks that every text in the logged pages is at least 10 pt at 100 dpi, i.e. 13.9 logged pixels.
CAPTION_PIXELS = 10 / 72 * 100


@pytest.mark.integration
def test_image_cards_are_readable_unexpanded_at_the_default_card_size(server: str, tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found; apt-get install chromium")
    profiles = iter(tmp_path / f"profile_{index}" for index in range(20))
    # Time Series lays out only the cards in view: one filtered page per kind of figure.
    for tag_filter, expected in (
        ("gmar/overlay/gmar_l1", {IMAGE_TAG, f"{IMAGE_TAG}/images_3-4"}),
        ("gmar/evolution/gmar_l1", {EVOLUTION_TAG, f"{EVOLUTION_TAG}/images_3-4"}),
        ("gmar/(trajectory|specialisation)", {"gmar/trajectory/layer_00", "gmar/specialisation/entropy"}),
    ):
        url = f"{server}/?darkMode=false&tagFilter={urllib.parse.quote(tag_filter)}#timeseries"
        cards = []
        for _ in range(5):  # a busy machine may measure before the cards' images are in
            cards = image_cards(browser, url, next(profiles))
            if expected <= {card["tag"] for card in cards} and all(card["scale"] for card in cards):
                break
        assert expected <= {card["tag"] for card in cards}, cards
        for card in cards:
            # Captions, headings, colour-bar and legend labels are at least 9 screen pixels tall.
            assert card["scale"] * CAPTION_PIXELS >= 9, card
