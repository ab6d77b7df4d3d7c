"""A run report: head-importance plots and one self-contained HTML page from a run's ``head_importance.npz``.

[`build_report`][gmar_lightning.report.build_report] reads the trajectory the callback wrote at the end of fit, renders
the layers x heads heatmap of the last epoch, the per-head trajectories and the specialisation summaries as PNG files,
and writes ``report.html`` with every image embedded as a base64 data URI, so the page can be mailed or archived as one
file. The page also shows the run's settings (the logger's ``hparams.yaml``), its validation accuracy (TensorBoard's
``val_acc`` or the CSV logger's ``metrics.csv``), the saliency overlays of the first evaluation next to those of the
latest, and the latest evolution figure: the ``gmar/overlay/<method>`` and ``gmar/evolution/<method>`` images of the
TensorBoard event files, or the PNG files a [`FileSink`][gmar_lightning.callback.sinks.FileSink] wrote
(``gmar/step_*/gmar_overlay_*.png``, ``gmar_evolution_*.png``).

Examples:
    >>> import tempfile, torch
    >>> from gmar_lightning.trajectory import HeadTrajectory
    >>> run_dir = tempfile.mkdtemp()
    >>> trajectory = HeadTrajectory()
    >>> trajectory.append(0, 10, torch.tensor([[0.7, 0.3], [0.5, 0.5]]), torch.ones(2, 2))
    >>> trajectory.save_npz(f"{run_dir}/head_importance.npz")
    >>> report = build_report(run_dir)
    >>> report.html_path.name, [path.name for path in report.plots]
    ('report.html', ['head_importance.png', 'trajectory.png', 'specialisation.png'])
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmar_lightning._io import atomic_write_bytes, atomic_write_text
from gmar_lightning.render import figure_to_png_bytes, head_heatmap_figure, specialisation_figure, trajectory_figure
from gmar_lightning.trajectory import TRAJECTORY_NPZ, HeadTrajectory

__all__ = ["OverlayPair", "Report", "build_report", "find_trajectory"]

OVERLAY_TAG_PREFIX = "gmar/overlay/"
# The callback logs a method's probe images two per image: ``<prefix><method>`` holds the first two, the report shows
# those, and ``<prefix><method>/images_3-4`` ... (``..._images_3-4.png`` as files) hold the others.
_LATER_PAGE = "/images_"


def _first_page(tag: str) -> bool:
    return _LATER_PAGE not in tag


_REPORT_DIR = "report"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Marks the page once every image has decoded, so a headless browser (and a test) can tell the plots rendered.
_LOADED_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = String(images.length);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0);
  document.body.dataset.imagesLoaded = String(loaded.length);
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
figure { margin: 1rem 0; } figcaption { color: #555; font-size: 0.9rem; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
th { background: #f5f5f5; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
.pair { display: flex; gap: 1rem; flex-wrap: wrap; } .pair figure { flex: 1 1 400px; margin: 0.5rem 0; }
</style>"""


@dataclass
class Report:
    """What [`build_report`][gmar_lightning.report.build_report] wrote.

    Attributes:
        html_path: The self-contained HTML page.
        plots: The PNG plots, in page order.
        overlays: Each method's overlays at the first and the latest evaluation, shown side by side.
        trajectory_path: The ``head_importance.npz`` the report was built from.
    """

    html_path: Path
    plots: list[Path]
    overlays: list[OverlayPair] = field(default_factory=list)
    trajectory_path: Path | None = None


def _run_files(run_dir: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` in or below ``run_dir``, following no link out of it: a report embeds what the run
    wrote, never a file a symlink in the run folder points to elsewhere."""
    root = run_dir.resolve()
    return sorted(path for path in run_dir.rglob(pattern) if path.is_file() and path.resolve().is_relative_to(root))


def find_trajectory(source: str | os.PathLike[str]) -> Path:
    """The ``head_importance.npz`` for ``source``: the file itself, or the one in (or uniquely below) a run directory.

    Raises:
        FileNotFoundError: If nothing is found, or a directory holds several runs' files.

    Examples:
        >>> import tempfile
        >>> find_trajectory(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: `run` ... holds no head_importance.npz; pass a run directory of a fit with GMARCallback.
    """
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"`run` {str(path)!r} does not exist; pass a run directory or a {TRAJECTORY_NPZ}.")
    found = _run_files(path, TRAJECTORY_NPZ)
    if path / TRAJECTORY_NPZ in found:
        return path / TRAJECTORY_NPZ
    if not found:
        raise FileNotFoundError(
            f"`run` {str(path)!r} holds no {TRAJECTORY_NPZ}; pass a run directory of a fit with GMARCallback."
        )
    if len(found) > 1:
        runs = ", ".join(str(candidate.parent) for candidate in found[:3])
        raise FileNotFoundError(f"`run` {str(path)!r} holds {len(found)} runs ({runs}, ...); pass one of them.")
    return found[0]


def _load_trajectory(path: Path) -> HeadTrajectory:
    try:
        trajectory = HeadTrajectory.load_npz(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"`run` {str(path)!r} is not a readable {TRAJECTORY_NPZ}: {error}") from None
    if not len(trajectory):
        raise ValueError(f"`run` {str(path)!r} records no evaluation yet; let the fit run at least one validation.")
    return trajectory


@dataclass
class OverlayPair:
    """One method's overlays at the first and at the latest evaluation (the same image when there was one)."""

    name: str
    first: tuple[int, bytes]
    latest: tuple[int, bytes]


def _tensorboard_events(run_dir: Path) -> list[Any]:
    """An accumulator of every image and scalar (no sampling) for each event directory under ``run_dir``."""
    event_dirs = sorted({path.parent for path in _run_files(run_dir, "events.out.tfevents.*")})
    if not event_dirs:
        return []
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    accumulators = []
    for event_dir in event_dirs:
        # 0 = keep everything, so the first and the last step are really the first and the last.
        accumulator = EventAccumulator(str(event_dir), size_guidance={IMAGES: 0, SCALARS: 0})
        accumulator.Reload()
        accumulators.append(accumulator)
    return accumulators


def _tensorboard_overlays(events: list[Any], prefix: str = OVERLAY_TAG_PREFIX) -> list[OverlayPair]:
    """The first and the latest image of every ``<prefix><method>`` tag (``gmar/overlay/<method>`` by default)."""
    pairs = []
    for accumulator in events:
        for tag in accumulator.Tags()["images"]:
            if tag.startswith(prefix) and _first_page(tag):
                images = accumulator.Images(tag)
                first, latest = images[0], images[-1]
                pairs.append(
                    OverlayPair(
                        tag, (first.step, first.encoded_image_string), (latest.step, latest.encoded_image_string)
                    )
                )
    return pairs


def _file_overlays(run_dir: Path, output_dir: Path, kind: str = "overlay") -> list[OverlayPair]:
    """A FileSink's ``step_XXXXXX/gmar_<kind>_<method>.png`` files: the first and the latest step of each."""
    by_name: dict[str, list[tuple[int, Path]]] = {}
    for path in _run_files(run_dir, f"step_*/gmar_{kind}_*.png"):
        if path.resolve().is_relative_to(output_dir.resolve()) or path.read_bytes()[:8] != _PNG_SIGNATURE:
            continue
        if "_images_" in path.stem:  # a later page: gmar_overlay_<method>_images_3-4.png
            continue
        step = path.parent.name.removeprefix("step_")
        if step.isdigit():
            by_name.setdefault(str(path.relative_to(run_dir).parent.parent / path.name), []).append((int(step), path))
    pairs = []
    for name, found in sorted(by_name.items()):
        found.sort()
        (first_step, first), (latest_step, latest) = found[0], found[-1]
        pairs.append(OverlayPair(name, (first_step, first.read_bytes()), (latest_step, latest.read_bytes())))
    return pairs


@dataclass
class _LoggedRun:
    """What a W&B or MLflow run logged besides its files: name, validation accuracy, settings, images by tag."""

    name: str | None = None
    accuracy: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    images: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)


_WANDB_BLOCK, _WANDB_HEADER = 32768, 7


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-<id>.wandb``): LevelDB's log format after a 7-byte file header,
    in 32 KiB blocks of chunks ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last)``."""
    data = path.read_bytes()
    records, pending, position = [], b"", _WANDB_HEADER
    while position + _WANDB_HEADER <= len(data):
        left = _WANDB_BLOCK - position % _WANDB_BLOCK
        if left < _WANDB_HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _WANDB_HEADER])
        if kind == 0:  # preallocated zeros: the end of what was written
            break
        chunk = data[position + _WANDB_HEADER : position + _WANDB_HEADER + length]
        position += _WANDB_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def _wandb_run(run_dir: Path) -> _LoggedRun | None:
    """A W&B run whose ``files/`` folder is ``run_dir``, read from the ``run-<id>.wandb`` log beside it (offline runs
    keep only that); ``None`` for other folders, or where ``wandb`` is not installed to decode it."""
    logs = sorted(run_dir.parent.glob("run-*.wandb")) if run_dir.name == "files" else []
    if not logs:
        return None
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        return None
    run = _LoggedRun()
    for raw in _wandb_records(logs[0]):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # a record cut off by a crash: what came before it still counts
            break
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name = f"{record.run.display_name or record.run.run_id} (W&B run {record.run.run_id})"
        elif kind == "config":
            for item in record.config.update:
                if not item.key.startswith("_"):
                    run.settings[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "val_acc" in row:
                run.accuracy.append(float(row["val_acc"]))
            # The trainer's step the callback logged with each row; W&B's own `_step` counts rows.
            step = int(row.get("trainer/global_step", row.get("_step", 0)))
            for key, value in row.items():
                if key.endswith("/path") and isinstance(value, str) and key.startswith("gmar/"):
                    run.images.setdefault(key.removesuffix("/path"), []).append((step, run_dir / value))
    return run


def _mlflow_run(run_dir: Path) -> _LoggedRun | None:
    """An MLflow file-store run whose ``artifacts/`` folder is ``run_dir``: its name (``meta.yaml``), ``val_acc``
    history (``metrics/``) and parameters (``params/``); ``None`` for other folders."""
    root = run_dir.parent
    if run_dir.name != "artifacts" or not (root / "meta.yaml").is_file():
        return None
    run = _LoggedRun()
    import yaml

    try:
        meta = yaml.safe_load((root / "meta.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        meta = {}
    run.name = f"{meta.get('run_name') or root.name} (MLflow run {root.name})"
    metrics = root / "metrics" / "val_acc"
    if metrics.is_file():  # one "timestamp value step" line per logged value
        run.accuracy = [float(line.split()[1]) for line in metrics.read_text().splitlines() if line.strip()]
    if (root / "params").is_dir():
        run.settings = {path.name: path.read_text(encoding="utf-8") for path in sorted((root / "params").iterdir())}
    return run


def _logged_overlays(run: _LoggedRun | None, prefix: str) -> list[OverlayPair]:
    """The first and the latest image a W&B run logged under each ``<prefix><method>`` tag."""
    pairs = []
    for tag, found in sorted((run.images if run is not None else {}).items()):
        found = [(step, path) for step, path in found if path.is_file()]
        if tag.startswith(prefix) and _first_page(tag) and found:
            (first_step, first), (latest_step, latest) = found[0], found[-1]
            pairs.append(OverlayPair(tag, (first_step, first.read_bytes()), (latest_step, latest.read_bytes())))
    return pairs


def _accuracy(run_dir: Path, events: list[Any], logged: _LoggedRun | None) -> tuple[float, float] | None:
    """``(latest, best)`` validation accuracy from TensorBoard scalars, a CSV logger's ``metrics.csv`` or a W&B or
    MLflow run."""
    values: list[float] = list(logged.accuracy) if logged is not None else []
    for accumulator in events:
        if "val_acc" in accumulator.Tags()["scalars"]:
            values = [event.value for event in accumulator.Scalars("val_acc")]
    for metrics in _run_files(run_dir, "metrics.csv"):
        with metrics.open(newline="", encoding="utf-8") as handle:
            values = values or [float(row["val_acc"]) for row in csv.DictReader(handle) if row.get("val_acc")]
    return (values[-1], max(values)) if values else None


def _settings(run_dir: Path) -> dict[str, Any]:
    """The run's hyperparameters from the logger's ``hparams.yaml`` (empty when there is none)."""
    found = _run_files(run_dir, "hparams.yaml")
    if not found:
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(found[0].read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_html(caption: str, png: bytes) -> str:
    escaped = html.escape(caption)
    return f'<figure><img src="{_data_uri(png)}" alt="{escaped}"><figcaption>{escaped}</figcaption></figure>'


def _number(value: float) -> str:
    return "&ndash;" if math.isnan(value) else f"{value:.3f}"


def _layer_table(trajectory: HeadTrajectory) -> str:
    """One row per layer at the last epoch: top head, its weight, entropy, top-head share and rank stability."""
    summaries = trajectory.summaries()
    weights = trajectory.weights[-1]
    names = trajectory.layer_names or [f"layer {index}" for index in range(weights.shape[0])]
    rows = []
    for layer, name in enumerate(names):
        # NaN marks heads a pruned layer no longer has; a layer without heads has no top head.
        top_head = int(weights[layer].nan_to_num(nan=-math.inf).argmax())
        cells = [
            f"<td>{html.escape(name)}</td>",
            f'<td class="number">{"&ndash;" if weights[layer].isnan().all() else top_head}</td>',
            f'<td class="number">{_number(float(weights[layer, top_head]))}</td>',
            f'<td class="number">{_number(float(summaries["entropy"][-1, layer]))}</td>',
            f'<td class="number">{_number(float(summaries["stability"][-1, layer]))}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = (
        "<tr><th>layer</th><th>top head</th><th>its weight</th><th>normalised entropy</th><th>rank stability</th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>"


def _pruned_note(trajectory: HeadTrajectory) -> str:
    """``" (heads per layer now: [2, 0, 3])"`` when the last evaluation saw layers that lost heads, else nothing."""
    counts = (~trajectory.weights[-1].isnan()).sum(dim=-1).tolist()
    return "" if all(count == trajectory.num_heads for count in counts) else f" (heads per layer now: {counts})"


def _settings_table(settings: dict[str, Any]) -> str:
    if not settings:
        return "<p>No <code>hparams.yaml</code> in the run directory.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td><code>{html.escape(str(value))}</code></td></tr>"
        for key, value in settings.items()
    )
    return f"<table><tr><th>setting</th><th>value</th></tr>{rows}</table>"


def _comparison_html(pairs: list[OverlayPair]) -> str:
    if not pairs:
        return ""
    blocks = []
    for pair in pairs:
        (first_step, first), (latest_step, latest) = pair.first, pair.latest
        blocks.append(
            f'<h3>{html.escape(pair.name)}</h3><div class="pair">'
            + _figure_html(f"first evaluation (step {first_step})", first)
            + _figure_html(f"latest evaluation (step {latest_step})", latest)
            + "</div>"
        )
    return "<h2>Saliency: first against latest evaluation</h2>\n" + "\n".join(blocks)


def _evolution_html(pairs: list[OverlayPair]) -> str:
    if not pairs:
        return ""
    figures = "\n".join(_figure_html(f"{pair.name} at step {pair.latest[0]}", pair.latest[1]) for pair in pairs)
    return "<h2>Maps over the run (the latest evolution figure)</h2>\n" + figures


def _page(
    title: str,
    trajectory: HeadTrajectory,
    source: Path,
    plots: list[tuple[str, bytes]],
    overlays: str,
    settings: dict[str, Any],
    accuracy: tuple[float, float] | None,
) -> str:
    epochs, steps = trajectory.epochs, trajectory.steps
    facts = (
        f"{len(steps)} evaluation{'s' if len(steps) != 1 else ''} (epochs {epochs[0]} to {epochs[-1]}, steps "
        f"{steps[0]} to {steps[-1]}), "
        f"{trajectory.num_layers} attention layers x {trajectory.num_heads} heads{_pruned_note(trajectory)}, from "
        f"<code>{html.escape(str(source))}</code>."
    )
    if accuracy is not None:
        facts += f" Validation accuracy: <strong>{accuracy[0]:.3f}</strong> at the end (best {accuracy[1]:.3f})."
    figures = "\n".join(_figure_html(caption, png) for caption, png in plots)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
{_STYLE}
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{facts}</p>
{overlays}
<h2>Layers at the last evaluation (epoch {epochs[-1]}, step {steps[-1]})</h2>
{_layer_table(trajectory)}
<h2>Head importance</h2>
{figures}
<h2>Run settings</h2>
{_settings_table(settings)}
{_LOADED_SCRIPT}
</body>
</html>
"""


def build_report(
    run: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None, title: str | None = None
) -> Report:
    """Write PNG plots and a self-contained ``report.html`` for a run.

    Args:
        run: A run directory holding ``head_importance.npz`` (also in a subdirectory), or the file itself.
        output_dir: Where the files go; defaults to ``report/`` next to the ``head_importance.npz``.
        title: Page title; defaults to "GMAR report: <run directory name>".

    Returns:
        The written [`Report`][gmar_lightning.report.Report].

    Raises:
        FileNotFoundError: If no trajectory file is found.
        ValueError: If the file is unreadable or records no epoch.
    """
    trajectory_path = find_trajectory(run)
    trajectory = _load_trajectory(trajectory_path)
    run_dir = trajectory_path.parent
    output = Path(output_dir) if output_dir is not None else run_dir / _REPORT_DIR
    last_epoch = trajectory.epochs[-1]
    figures = {
        "head_importance.png": (
            f"Head weights at epoch {last_epoch} (probe mean)",
            head_heatmap_figure(
                trajectory.weights[-1],
                trajectory.layer_names or None,
                title=f"GMAR head importance, epoch {last_epoch}",
            ),
        ),
        "trajectory.png": ("Head weights over training", trajectory_figure(trajectory)),
        "specialisation.png": ("Specialisation per layer over training", specialisation_figure(trajectory)),
    }
    plots, plot_pngs = [], []
    for name, (caption, figure) in figures.items():
        png = figure_to_png_bytes(figure)
        atomic_write_bytes(output / name, png)
        plots.append(output / name)
        plot_pngs.append((caption, png))
    events = _tensorboard_events(run_dir)
    logged = _wandb_run(run_dir) or _mlflow_run(run_dir)
    overlays = (
        _tensorboard_overlays(events) + _file_overlays(run_dir, output) + _logged_overlays(logged, OVERLAY_TAG_PREFIX)
    )
    evolution = (
        _tensorboard_overlays(events, "gmar/evolution/")
        + _file_overlays(run_dir, output, "evolution")
        + _logged_overlays(logged, "gmar/evolution/")
    )
    name = logged.name if logged is not None and logged.name else run_dir.name
    if name.startswith("version_"):  # a logger's version folder says little without its run name
        name = f"{run_dir.parent.name}/{name}"
    page = _page(
        title or f"GMAR report: {name}",
        trajectory,
        trajectory_path,
        plot_pngs,
        _comparison_html(overlays) + _evolution_html(evolution),
        _settings(run_dir) or (logged.settings if logged is not None else {}),
        _accuracy(run_dir, events, logged),
    )
    html_path = output / "report.html"
    atomic_write_text(html_path, page)
    return Report(html_path=html_path, plots=plots, overlays=overlays, trajectory_path=trajectory_path)
