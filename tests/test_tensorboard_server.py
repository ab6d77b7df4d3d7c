"""A real TensorBoard server shows what GMARCallback logged: image, histogram and scalar tags, and the image itself."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from gmar_lightning import GMARCallback
from gmar_lightning.demos.data import ShapesDataModule
from gmar_lightning.demos.model import ViTClassifier

SERVER_TIMEOUT_S = 90.0
IMAGE_TAG = "gmar/overlay/gmar_l1"
HISTOGRAM_TAG = "gmar/head_weights/layer_00"
SCALAR_TAG = "gmar/entropy/layer_00"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


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
        max_epochs=2,
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
    """``tensorboard --logdir`` on a free local port; yields its base URL and always stops it."""
    port = _free_port()
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1",
        "--port", str(port), "--load_fast", "false", "--reload_interval", "1",
    ]  # fmt: skip
    # Output goes to a file, not a pipe: an unread pipe could fill up and stall the server.
    server_log = log_dir / "tensorboard_server.log"
    with server_log.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _poll_tags(base_url: str, plugin: str, tag: str) -> dict[str, Any]:
    """The plugin's ``/tags`` index once it lists ``tag`` for some run; fails after :data:`SERVER_TIMEOUT_S`."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            index = json.loads(_get(f"{base_url}/data/plugin/{plugin}/tags"))
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as error:
            last = error  # not up yet, or still loading the event files
        else:
            if any(tag in tags for tags in index.values()):
                return index
            last = index
        time.sleep(0.5)
    pytest.fail(f"TensorBoard never listed {tag!r} under {plugin} within {SERVER_TIMEOUT_S} s; last answer: {last}")


def test_tensorboard_serves_the_gmar_tags(server: str) -> None:
    images = _poll_tags(server, "images", IMAGE_TAG)
    histograms = _poll_tags(server, "histograms", HISTOGRAM_TAG)
    scalars = _poll_tags(server, "scalars", SCALAR_TAG)

    (run,) = [name for name, tags in images.items() if IMAGE_TAG in tags]
    assert {"gmar/head_importance", "gmar/trajectory"} <= set(images[run])
    assert "gmar/head_weights/layer_01" in histograms[run]
    assert {"gmar/top_head_share/layer_01", "gmar/rank_stability/layer_00", "val_acc"} <= set(scalars[run])

    query = urllib.parse.urlencode({"run": run, "tag": IMAGE_TAG})
    entries = json.loads(_get(f"{server}/data/plugin/images/images?{query}"))
    assert len(entries) == 2  # one overlay grid per epoch
    image = _get(f"{server}/data/plugin/images/individualImage?{entries[-1]['query']}")
    assert image[:8] == b"\x89PNG\r\n\x1a\n"

    series = json.loads(
        _get(f"{server}/data/plugin/scalars/scalars?{urllib.parse.urlencode({'run': run, 'tag': SCALAR_TAG})}")
    )
    assert len(series) == 2 and all(0.0 <= value <= 1.0 for _, _, value in series)
