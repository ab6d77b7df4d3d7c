"""Regenerate the documentation figures from a real run of the main job.

Runs the demo (the default small ViT on the shapes data, logging its default ``gmar_l1`` and ``grad_rollout``), then
saves into ``docs/images/``: the first overlay page of each method, the evolution, head-importance and per-layer
trajectory figures exactly as the callback logged them to TensorBoard, the report's trajectory and specialisation
figures of the run, the head-pruning ablation curves, and screenshots of the TensorBoard web UI at its default card
size taken with headless Chromium (skipped with a notice when no Chromium is installed). For each screenshot it prints
every image card's on-screen scale and the height its 10 pt text has on screen::

    python docs/scripts/make_figures.py              # the full main job, a few CPU minutes
    python docs/scripts/make_figures.py --epochs 3   # quicker, less trained figures
    python docs/scripts/make_figures.py --epochs 4 --max-train-images 600 --no-ablation   # quicker still
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY))  # the shared browser helpers live with the tests

from gmar_lightning.demos.config import DemoConfig  # noqa: E402
from gmar_lightning.demos.job import TENSORBOARD_SAMPLES, run_demo  # noqa: E402
from gmar_lightning.render import figure_to_png_bytes, specialisation_figure, trajectory_figure  # noqa: E402
from gmar_lightning.trajectory import HeadTrajectory  # noqa: E402
from tests.browser import find_browser, image_cards, screenshot, tensorboard  # noqa: E402

LOGGED_IMAGES = {
    "gmar/overlay/gmar_l1": "overlay_gmar_l1.png",
    "gmar/overlay/grad_rollout": "overlay_grad_rollout.png",
    "gmar/evolution/gmar_l1": "evolution_gmar_l1.png",
    "gmar/head_importance": "head_importance.png",
    "gmar/trajectory/layer_00": "trajectory_layer_00.png",
}
# TensorBoard views to photograph: file name -> URL query and fragment (view and tag filter).
SCREENSHOTS = {
    "tensorboard_time_series.png": f"tagFilter={urllib.parse.quote('gmar/overlay')}#timeseries",
    "tensorboard_evolution.png": f"tagFilter={urllib.parse.quote('gmar/evolution')}#timeseries",
    "tensorboard_figures.png": f"tagFilter={urllib.parse.quote('gmar/(trajectory|head_imp)')}#timeseries",
    "tensorboard_specialisation.png": f"tagFilter={urllib.parse.quote('gmar/specialisation')}#timeseries",
    "tensorboard_images.png": f"#images&tagFilter={urllib.parse.quote('gmar/overlay')}",
    "tensorboard_custom_scalars.png": "#custom_scalars",
    "tensorboard_histograms.png": f"#histograms&tagFilter={urllib.parse.quote('gmar/head_weights/layer_00')}",
}
CAPTION_PIXELS = 10 / 72 * 100  # the figures' smallest text, 10 pt at 100 dpi, in logged pixels


def save_logged_images(run_dir: Path, output: Path) -> list[Path]:
    """The latest image of each tag in `LOGGED_IMAGES`, as the callback logged it."""
    events = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0})
    events.Reload()
    written = []
    for tag, name in LOGGED_IMAGES.items():
        (output / name).write_bytes(events.Images(tag)[-1].encoded_image_string)
        written.append(output / name)
    return written


def save_report_figures(run_dir: Path, output: Path) -> list[Path]:
    """The run's whole trajectory and specialisation figures, as ``gmar-lightning report`` draws them."""
    trajectory = HeadTrajectory.load_npz(run_dir / "head_importance.npz")
    figures = {"trajectory.png": trajectory_figure(trajectory), "specialisation.png": specialisation_figure(trajectory)}
    for name, figure in figures.items():
        (output / name).write_bytes(figure_to_png_bytes(figure))
    return [output / name for name in figures]


def save_ablation_plot(run_dir: Path, output: Path, work: Path) -> Path:
    """Run examples/head_pruning.py on the run and keep its plot."""
    spec = importlib.util.spec_from_file_location("head_pruning", REPOSITORY / "examples" / "head_pruning.py")
    assert spec is not None and spec.loader is not None
    head_pruning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_pruning)
    result = head_pruning.main([str(run_dir), "--output", str(work / "pruning")])
    return Path(shutil.copy(result["plot_path"], output / "ablation.png"))


def save_screenshots(log_dir: Path, output: Path, work: Path) -> list[Path]:
    """Screenshots of TensorBoard's views at a 1400 x 1000 window, served with the flags the demo prints."""
    browser = find_browser()
    if browser is None:
        print("No Chromium found: skipping the TensorBoard screenshots (apt-get install chromium).")
        return []
    written = []
    with tensorboard(log_dir, *TENSORBOARD_SAMPLES.split()) as base_url:
        for index, (name, view) in enumerate(SCREENSHOTS.items()):
            url = f"{base_url}/?darkMode=false{'&' if not view.startswith('#') else ''}{view}"
            # A fresh profile per view: TensorBoard keeps the last tag filter in the browser's storage.
            written.append(screenshot(browser, url, output / name, work / f"chrome_{index}"))
            if "#timeseries" in view:
                for card in image_cards(browser, url, work / f"measure_{index}"):
                    scale = card["scale"] or 0.0
                    print(f"{name}: {card['tag']} logged {card['logged']} in a {card['box']} box, scale {scale:.2f}, "
                          f"10 pt text {CAPTION_PIXELS * scale:.1f} px tall on screen")  # fmt: skip
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Regenerate docs/images from a real run of the main job.")
    parser.add_argument("--epochs", type=int, default=DemoConfig().epochs, help="training epochs of the run")
    parser.add_argument(
        "--max-train-images", type=int, default=None, help="train on fewer images (default: all of the demo's)"
    )
    parser.add_argument(
        "--no-ablation", action="store_true", help="keep ablation.png (the head-pruning example takes the longest)"
    )
    parser.add_argument("--output", default=str(REPOSITORY / "docs" / "images"), help="where the PNGs go")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gmar_figures_") as temporary:
        work = Path(temporary)
        config = DemoConfig(
            log_dir=str(work / "runs"), epochs=args.epochs, max_train_images=args.max_train_images, progress_bar=False
        )
        result = run_demo(config)
        run_dir = Path(result["log_dir"])
        written = save_logged_images(run_dir, output)
        written.extend(save_report_figures(run_dir, output))
        if not args.no_ablation:
            written.append(save_ablation_plot(run_dir, output, work))
        written.extend(save_screenshots(run_dir.parent, output, work))
    print(f"val_acc {result['val_acc']:.3f}; wrote {', '.join(path.name for path in written)} to {output}")
    return written


if __name__ == "__main__":
    main()
