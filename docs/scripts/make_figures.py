"""Regenerate the documentation figures from a real run of the main job.

Runs the demo (the default small ViT on the shapes data, with ``gmar_l1`` and ``rollout``), then saves into
``docs/images/``: the overlay grids, head-importance heatmap and trajectory exactly as the callback logged them to
TensorBoard, the report's specialisation plot, the head-pruning ablation curves, and screenshots of the TensorBoard
web UI taken with headless Chromium (skipped with a notice when no Chromium is installed)::

    python docs/scripts/make_figures.py              # the full main job, a few CPU minutes
    python docs/scripts/make_figures.py --epochs 3   # quicker, less trained figures
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from gmar_lightning.demos.job import DemoConfig, run_demo
from gmar_lightning.report import build_report

REPOSITORY = Path(__file__).resolve().parents[2]
LOGGED_IMAGES = {
    "gmar/overlay/gmar_l1": "overlay_gmar_l1.png",
    "gmar/overlay/rollout": "overlay_rollout.png",
    "gmar/head_importance": "head_importance.png",
    "gmar/trajectory": "trajectory.png",
}
# TensorBoard dashboards to photograph: file name -> URL fragment (dashboard and tag filter).
SCREENSHOTS = {
    "tensorboard_images.png": "images&tagFilter=gmar%2Foverlay",
    "tensorboard_scalars.png": "scalars&tagFilter=gmar%2Fentropy",
    "tensorboard_histograms.png": "histograms&tagFilter=gmar%2Fhead_weights",
}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def save_logged_images(run_dir: Path, output: Path) -> list[Path]:
    """The latest image of each tag in :data:`LOGGED_IMAGES`, as the callback logged it."""
    events = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0})
    events.Reload()
    written = []
    for tag, name in LOGGED_IMAGES.items():
        (output / name).write_bytes(events.Images(tag)[-1].encoded_image_string)
        written.append(output / name)
    return written


def save_ablation_plot(run_dir: Path, output: Path, work: Path) -> Path:
    """Run examples/head_pruning.py on the run and keep its plot."""
    spec = importlib.util.spec_from_file_location("head_pruning", REPOSITORY / "examples" / "head_pruning.py")
    assert spec is not None and spec.loader is not None
    head_pruning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_pruning)
    result = head_pruning.main([str(run_dir), "--output", str(work / "pruning")])
    return Path(shutil.copy(result["plot_path"], output / "ablation.png"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if b"gmar/" in response.read():
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not serve the gmar tags at {url} within {timeout_s} s.")


def save_screenshots(log_dir: Path, output: Path, work: Path) -> list[Path]:
    """Screenshots of TensorBoard's image, scalar and histogram dashboards, taken with headless Chromium."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        print("No Chromium found: skipping the TensorBoard screenshots (apt-get install chromium).")
        return []
    port = _free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1"]
    with (work / "tensorboard.log").open("w") as log:
        server = subprocess.Popen([*command, "--port", str(port), "--load_fast", "false"], stdout=log, stderr=log)
    written = []
    try:
        _wait_for(f"http://127.0.0.1:{port}/data/plugin/images/tags")
        for name, fragment in SCREENSHOTS.items():
            flags = [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={work / 'chrome'}",
                "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=15000",
                f"--screenshot={output / name}",
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}/?darkMode=false#{fragment}"
            subprocess.run([browser, *flags, url], check=True, capture_output=True, timeout=120)
            written.append(output / name)
    finally:
        server.terminate()
        server.wait(timeout=15)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Regenerate docs/images from a real run of the main job.")
    parser.add_argument("--epochs", type=int, default=DemoConfig().epochs, help="training epochs of the run")
    parser.add_argument("--output", default=str(REPOSITORY / "docs" / "images"), help="where the PNGs go")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gmar_figures_") as temporary:
        work = Path(temporary)
        config = DemoConfig(
            log_dir=str(work / "runs"), epochs=args.epochs, methods=["gmar_l1", "rollout"], progress_bar=False
        )
        result = run_demo(config)
        run_dir = Path(result["log_dir"])
        written = save_logged_images(run_dir, output)
        report = build_report(run_dir, output_dir=work / "report")
        written.append(Path(shutil.copy(report.plots[-1], output / "specialisation.png")))
        written.append(save_ablation_plot(run_dir, output, work))
        written.extend(save_screenshots(run_dir.parent, output, work))
    print(f"val_acc {result['val_acc']:.3f}; wrote {', '.join(path.name for path in written)} to {output}")
    return written


if __name__ == "__main__":
    main()
