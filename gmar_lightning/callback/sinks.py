"""Where an evaluation's images, figures, histograms and scalars go: TensorBoard, W&B, MLflow, any logger, or files.

This is the only module that knows about logger back-ends. The callback assembles one
[`EvaluationRecord`][gmar_lightning.callback.records.EvaluationRecord] of plain data per evaluation and hands it to
every [`Sink`][gmar_lightning.callback.sinks.Sink]; after each evaluation it hands each sink the
[`HeadTrajectory`][gmar_lightning.trajectory.HeadTrajectory], which every sink writes as ``head_importance.csv`` and
``head_importance.npz`` into its run's own folder (or uploads to its run), so that head-pruning tools find it wherever
the run logged and an interrupted run keeps every finished evaluation.

Every sink writes into a folder that belongs to one run (a logger version, a W&B run, a new ``version_N``), never into
a folder that several runs share. ``wandb`` and ``mlflow`` are imported lazily, so nothing here needs them installed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from gmar_lightning._io import atomic_write_bytes, atomic_write_csv, atomic_write_text, csv_text
from gmar_lightning.callback.records import EvaluationRecord
from gmar_lightning.render import figure_to_array, figure_to_png_bytes, image_to_array, image_to_png_bytes
from gmar_lightning.trajectory import TRAJECTORY_STEM, HeadTrajectory

__all__ = [
    "DiskBudgetError",
    "FileSink",
    "LoggerSink",
    "MLFlowSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "check_disk_budget",
    "custom_scalars_layout",
    "logger_run_dir",
    "new_version_dir",
    "sinks_for_loggers",
    "write_trajectory",
]

_WANDB_STEP_KEY = "trainer/global_step"
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_EVENT_FILE_SUFFIX = ".gmar"

RESERVE_FRACTION = 0.25
"""Share of a file system's size that GMAR output leaves free for the trainer's own logs and checkpoints ..."""
RESERVE_MAX_BYTES = 64 * 2**20
"""... up to this many bytes: ``reserve = min(RESERVE_MAX_BYTES, RESERVE_FRACTION * size)``."""


class DiskBudgetError(OSError):
    """Writing GMAR output would leave less free space than the reserve; raised before anything is written."""


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_disk_budget(folder: str | os.PathLike[str], needed: int) -> None:
    """Refuse to write ``needed`` bytes into ``folder`` when that would eat into the disk's reserve.

    GMAR output is optional and Lightning's own logs and checkpoints are not: on a nearly full disk the callback's
    images must never be what makes ``log_metrics`` or a checkpoint fail. The reserve is
    ``min(RESERVE_MAX_BYTES, RESERVE_FRACTION * size of the file system)``.

    Raises:
        DiskBudgetError: If ``free - needed`` would be below the reserve (``errno`` is ``ENOSPC``).

    Examples:
        >>> import tempfile
        >>> check_disk_budget(tempfile.gettempdir(), 1)  # a byte fits anywhere with a reserve free
    """
    where = _existing_parent(Path(folder))
    usage = shutil.disk_usage(where)
    reserve = min(RESERVE_MAX_BYTES, int(usage.total * RESERVE_FRACTION))
    if usage.free - needed < reserve:
        raise DiskBudgetError(
            errno.ENOSPC,
            f"writing about {needed} bytes of GMAR output into {folder} would leave less than the {reserve} bytes "
            f"kept free for the trainer's own logs ({usage.free} bytes free); the output waits until there is room",
        )


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(_existing_parent(folder)).free


def _figure_bytes(figure: Any) -> int:
    width, height = figure.get_size_inches() * figure.dpi
    return int(width * height * 3)


def record_bytes(record: EvaluationRecord) -> int:
    """An upper estimate of what one record takes on disk: images and figures as raw RGB (their PNGs are smaller),
    histograms at 8 bytes a value, plus text and a fixed overhead per entry."""
    size = 4096 + 64 * (len(record.scalars) + len(record.captions))
    size += sum(int(image.numel()) for image in record.images.values())
    size += sum(int(image.numel()) for gallery in record.galleries.values() for image, _ in gallery)
    size += sum(_figure_bytes(figure) for figure in record.figures.values())
    size += sum(8 * int(values.numel()) + 512 for values in record.histograms.values())
    size += sum(len(text) for text in record.captions.values())
    size += sum(32 * len(columns) * (len(rows) + 1) for columns, rows in record.tables.values())
    return size


def trajectory_bytes(trajectory: HeadTrajectory) -> int:
    """An upper estimate of the NPZ and CSV of a trajectory: 8 bytes per weight and score, one CSV line per head."""
    return 4096 + int(trajectory.weights.numel()) * (16 + 160) + 64 * len(trajectory.layer_names)


class _Budget:
    """Checks the disk budget before each write of a sink, with the largest write it has measured so far as the
    estimate once there is one (the raw-size estimate is far above what compressed PNGs take)."""

    def __init__(self) -> None:
        self.measured: int | None = None

    def write(self, folder: Path, estimate: int, action: Any) -> None:
        needed = estimate if self.measured is None else min(estimate, 2 * self.measured)
        check_disk_budget(folder, needed)
        before = _free_bytes(folder)
        action()
        self.measured = max(self.measured or 0, before - _free_bytes(folder))


@runtime_checkable
class Sink(Protocol):
    """A destination for evaluation records; the callback calls it on global rank 0 only."""

    def log_evaluation(self, record: EvaluationRecord) -> None:
        """Log everything in one evaluation's record at ``record.step``."""

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        """Write (or upload) the head-importance trajectory as ``<stem>.csv`` and ``<stem>.npz``."""


def write_trajectory(
    trajectory: HeadTrajectory, directory: str | os.PathLike[str], stem: str = TRAJECTORY_STEM
) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.npz`` into ``directory`` so that the two never disagree.

    The CSV is removed first, then the NPZ and then the CSV are written, each atomically. A process killed at any
    moment therefore leaves the old pair, the NPZ alone (old or new) or the new pair, never a CSV and an NPZ from
    different evaluations; a missing CSV is rewritten by the next call (or with
    ``HeadTrajectory.load_npz(npz).save_csv(csv)``). Hidden temporary files that a killed writer left behind are
    removed first: each run writes into its own folder, so no other writer can own them. Nothing is touched when
    the disk budget ([`check_disk_budget`][gmar_lightning.callback.sinks.check_disk_budget]) refuses the write.

    Returns:
        The two written paths, CSV first.

    Examples:
        >>> import tempfile
        >>> [path.name for path in write_trajectory(HeadTrajectory(), tempfile.mkdtemp())]
        ['head_importance.csv', 'head_importance.npz']
    """
    if not isinstance(trajectory, HeadTrajectory):
        raise TypeError(f"`trajectory` must be a HeadTrajectory, got {type(trajectory).__name__}.")
    folder = Path(directory)
    # Before anything is removed: a refused write leaves the previous pair in place.
    check_disk_budget(folder, trajectory_bytes(trajectory))
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, npz_path = folder / f"{stem}.csv", folder / f"{stem}.npz"
    for path in (csv_path, npz_path):
        # atomic_write_bytes names its temporary files ".<name>.<random>".
        for leftover in folder.glob(f".{glob.escape(path.name)}.*"):
            leftover.unlink(missing_ok=True)
    csv_path.unlink(missing_ok=True)
    trajectory.save_npz(npz_path)
    trajectory.save_csv(csv_path)
    return [csv_path, npz_path]


def _histogram_values(values: Tensor) -> np.ndarray:
    return values.detach().float().cpu().flatten().numpy()


def custom_scalars_layout(line_charts: dict[str, list[str]]) -> dict[str, dict[str, list[Any]]]:
    """The TensorBoard custom-scalars layout of line charts: category (the chart tag's parent) -> chart -> lines.

    Examples:
        >>> custom_scalars_layout({"gmar/head_mean/layer_00": ["gmar/head_mean/layer_00/head_00"]})
        {'gmar/head_mean': {'layer_00': ['Multiline', ['^gmar/head_mean/layer_00/head_00$']]}}
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for chart, tags in sorted(line_charts.items()):
        category, _, title = chart.rpartition("/")
        # Multiline entries are regular expressions; anchored, so layer_01 does not also match layer_010.
        layout.setdefault(category or chart, {})[title] = ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]
    return layout


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{value:.4f}" if isinstance(value, float) else str(value) for value in row) + " |"
              for row in rows]  # fmt: skip
    return "\n".join(lines)


class TensorBoardSink:
    """Log to TensorBoard through the callback's own event file in the logger's run folder, everything at
    ``global_step=step``.

    The event file (``events.out.tfevents.*.gmar``) sits beside Lightning's, so TensorBoard shows GMAR's tags in the
    same run, but it is written by its own ``SummaryWriter``: a failed write (a full disk) breaks that writer only,
    never the one Lightning logs its metrics through. A writer that failed is closed, and the next evaluation opens a
    new event file. Before each write the disk budget
    ([`check_disk_budget`][gmar_lightning.callback.sinks.check_disk_budget]) is checked.

    Images and figures are logged as ``add_image`` logs images (their PNGs encoded here), captions through
    ``add_text`` under the same tag (the Text tab, which shows it as ``<tag>/text_summary``), tables as Markdown text;
    empty histograms are skipped (TensorBoard rejects them). Scalars go through ``add_scalar`` exactly as
    ``TensorBoardLogger.log_metrics`` writes them. Line charts become a custom-scalars layout (the Custom Scalars
    tab): one category per chart tag's parent (``gmar/head_mean`` holds one chart per layer, one line per head),
    written again only when the set of charts changes.

    Args:
        log_dir: The run folder (``TensorBoardLogger.log_dir``).
        trajectory_dir: Where ``save_trajectory`` writes the trajectory files; defaults to ``log_dir``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], trajectory_dir: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(log_dir, str | os.PathLike):
            raise TypeError(f"`log_dir` must be a path (TensorBoardLogger.log_dir), got {type(log_dir).__name__}.")
        self.log_dir = Path(log_dir)
        self.trajectory_dir = Path(trajectory_dir) if trajectory_dir is not None else self.log_dir
        self._writer: Any = None
        self._layout: dict[str, dict[str, list[Any]]] | None = None
        self._budget = _Budget()

    def log_evaluation(self, record: EvaluationRecord) -> None:
        self._budget.write(self.log_dir, record_bytes(record), lambda: self._write(record))

    def _write(self, record: EvaluationRecord) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), filename_suffix=_EVENT_FILE_SUFFIX)
            self._layout = None  # a new file: the layout goes into it too
        writer, step = self._writer, record.step
        try:
            layout = custom_scalars_layout(record.line_charts)
            if layout and layout != self._layout:
                writer.add_custom_scalars(layout)
                self._layout = layout
            # PNGs encoded here rather than by add_image/add_figure: those filter and compress at zlib's default level,
            # several times slower than the package's encoder for files hardly smaller, and truncate pixel values.
            for tag, image in record.images.items():
                _add_png(writer, tag, image_to_png_bytes(image), step)
            for tag, figure in record.figures.items():
                _add_png(writer, tag, figure_to_png_bytes(figure), step)
            for tag, caption in record.captions.items():
                writer.add_text(tag, caption, global_step=step)
            for tag, (columns, rows) in record.tables.items():
                writer.add_text(tag, _markdown_table(columns, rows), global_step=step)
            for tag, values in record.histograms.items():
                if values.numel():
                    writer.add_histogram(tag, _histogram_values(values), global_step=step)
            for tag, value in record.scalars.items():
                writer.add_scalar(tag, float(value), global_step=step)
            writer.flush()  # the writer thread's errors (ENOSPC) surface here
        except Exception:
            self.close()
            raise

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        write_trajectory(trajectory, self.trajectory_dir, stem)

    def close(self) -> None:
        """Close the event file (errors of a writer that already failed are dropped: its file is given up)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


# PNG colour type (IHDR byte 25) -> channels: grey, RGB, grey and alpha, RGBA.
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _add_png(writer: Any, tag: str, png: bytes, step: int) -> None:
    """Log an encoded PNG as ``add_image`` would, into ``writer``'s event file; its size is read from its header."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])
    image = Summary.Image(height=height, width=width, colorspace=_PNG_CHANNELS[png[25]], encoded_image_string=png)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class WandbSink:
    """Log to a W&B run (``WandbLogger.experiment``) with one ``run.log`` call per evaluation.

    Like Lightning's ``WandbLogger.log_metrics``, the step travels as the ``trainer/global_step`` key (which
    ``WandbLogger`` declares as the step metric of every key) instead of ``run.log(step=...)``, whose step must
    increase strictly and would clash with Lightning's own logging. Images and figures become ``wandb.Image``
    (figures rasterised with Agg, not converted to plotly), galleries a list of captioned ``wandb.Image`` (one per
    probe image), histograms ``wandb.Histogram``, tables ``wandb.Table`` and line charts
    ``wandb.plot.line_series`` over every evaluation so far (the sink keeps their history).

    Args:
        run: The ``wandb`` run.
        trajectory_dir: Where ``save_trajectory`` writes the trajectory files; defaults to ``run.dir``, the run's
            own files folder, which W&B uploads when the run ends. Files are written there as real files (never
            links), so two runs can never share or overwrite them.
    """

    def __init__(self, run: Any, trajectory_dir: str | os.PathLike[str] | None = None) -> None:
        self.run = run
        self.trajectory_dir = Path(trajectory_dir if trajectory_dir is not None else run.dir)
        self._series: dict[str, tuple[list[int], list[float]]] = {}
        self._budget = _Budget()

    def log_evaluation(self, record: EvaluationRecord) -> None:
        # W&B keeps what it logs under the run's folder (offline: all of it) before uploading.
        self._budget.write(self.trajectory_dir, record_bytes(record), lambda: self._log(record))

    def _log(self, record: EvaluationRecord) -> None:
        import wandb

        payload: dict[str, Any] = {_WANDB_STEP_KEY: record.step}
        for tag, image in record.images.items():
            payload[tag] = wandb.Image(image_to_array(image), caption=record.captions.get(tag))
        for tag, gallery in record.galleries.items():
            payload[tag] = [wandb.Image(image_to_array(image), caption=caption) for image, caption in gallery]
        for tag, (columns, rows) in record.tables.items():
            payload[tag] = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        for chart, tags in record.line_charts.items():
            for tag in tags:
                steps, values = self._series.setdefault(tag, ([], []))
                steps.append(record.step)
                values.append(float(record.scalars[tag]))
            payload[f"{chart}/chart"] = wandb.plot.line_series(
                xs=[self._series[tag][0] for tag in tags],
                ys=[self._series[tag][1] for tag in tags],
                keys=[tag.rpartition("/")[2] for tag in tags],
                title=chart,
                xname="step",
            )
        for tag, figure in record.figures.items():
            payload[tag] = wandb.Image(figure_to_array(figure), caption=record.captions.get(tag))
        for tag, values in record.histograms.items():
            if values.numel():
                payload[tag] = wandb.Histogram(_histogram_values(values))
        payload.update({tag: float(value) for tag, value in record.scalars.items()})
        self.run.log(payload)

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        write_trajectory(trajectory, self.trajectory_dir, stem)


def _file_name(tag: str) -> str:
    return _UNSAFE_FILE_CHARACTERS.sub("_", tag.replace("/", "_")).strip("_") or "untitled"


class FileSink:
    """Write evaluations as plain files, for runs without TensorBoard or W&B.

    Layout under ``save_dir``::

        step_000123/<tag with "/" -> "_">.png   images and figures
        step_000123/histograms.npz              one array per histogram tag (keys are the tags)
        step_000123/captions.json               tag -> caption, when there are captions
        step_000123/<table tag>.csv             each table
        step_000123_1/...                       a second evaluation at the same step (gradient accumulation)
        scalars.csv                             step,epoch,tag,value; one row per scalar, appended
        head_importance.csv / .npz              the trajectory (into ``trajectory_dir``)

    Every file is written atomically, so a crash never leaves a truncated PNG or CSV behind. ``save_dir`` should
    belong to one run (see [`new_version_dir`][gmar_lightning.callback.sinks.new_version_dir]): ``scalars.csv`` is
    appended to.

    Args:
        save_dir: Root directory; created as needed.
        trajectory_dir: Where ``save_trajectory`` writes the trajectory files; defaults to ``save_dir``.
        write_scalars: Append scalars to ``scalars.csv``; ``False`` when a logger already takes them.

    Examples:
        >>> import tempfile, torch
        >>> sink = FileSink(tempfile.mkdtemp())
        >>> record = EvaluationRecord(7, 0, images={"gmar/overlay": torch.rand(3, 8, 8)}, scalars={"gmar/x": 1.0})
        >>> sink.log_evaluation(record)
        >>> sorted(path.name for path in sink.save_dir.rglob("*"))
        ['gmar_overlay.png', 'scalars.csv', 'step_000007']
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        trajectory_dir: str | os.PathLike[str] | None = None,
        write_scalars: bool = True,
    ) -> None:
        if not isinstance(save_dir, str | os.PathLike):
            raise TypeError(f"`save_dir` must be a path, got {type(save_dir).__name__}.")
        self.save_dir = Path(save_dir)
        self.trajectory_dir = Path(trajectory_dir) if trajectory_dir is not None else self.save_dir
        self.write_scalars = write_scalars
        self._budget = _Budget()
        self._written: dict[int, int] = {}  # step -> evaluations written at it

    def step_dir(self, step: int, repeat: int = 0) -> Path:
        """The directory holding the files of the ``repeat``-th evaluation (from 0) at ``step``: validations inside
        one gradient-accumulation window share a step, and each keeps its own files."""
        return self.save_dir / (f"step_{step:06d}" if repeat == 0 else f"step_{step:06d}_{repeat}")

    @property
    def last_step_dir(self) -> Path | None:
        """The directory of the latest evaluation written, if any."""
        if not self._written:
            return None
        step = next(reversed(self._written))
        return self.step_dir(step, self._written[step] - 1)

    def log_evaluation(self, record: EvaluationRecord) -> None:
        self._budget.write(self.save_dir, record_bytes(record), lambda: self._write(record))

    def _write(self, record: EvaluationRecord) -> None:
        repeat = self._written.get(record.step, 0)
        step_dir = self.step_dir(record.step, repeat)
        for tag, image in record.images.items():
            atomic_write_bytes(step_dir / f"{_file_name(tag)}.png", image_to_png_bytes(image))
        for tag, figure in record.figures.items():
            atomic_write_bytes(step_dir / f"{_file_name(tag)}.png", figure_to_png_bytes(figure))
        histograms = {tag: _histogram_values(values) for tag, values in record.histograms.items()}
        if histograms:
            buffer = io.BytesIO()
            np.savez(buffer, **histograms)
            atomic_write_bytes(step_dir / "histograms.npz", buffer.getvalue())
        if record.captions:
            atomic_write_text(step_dir / "captions.json", json.dumps(record.captions, indent=2, sort_keys=True))
        for tag, (columns, rows) in record.tables.items():
            atomic_write_csv(step_dir / f"{_file_name(tag)}.csv", columns, rows)
        if record.scalars and self.write_scalars:
            self._append_scalars(record)
        self._written.pop(record.step, None)
        self._written[record.step] = repeat + 1

    def _append_scalars(self, record: EvaluationRecord) -> None:
        # Rewriting the whole (small) file keeps the append atomic: readers see the old or the new table.
        path = self.save_dir / "scalars.csv"
        rows = [[record.step, record.epoch, tag, repr(float(value))] for tag, value in record.scalars.items()]
        previous = path.read_text(encoding="utf-8") if path.exists() else csv_text([["step", "epoch", "tag", "value"]])
        atomic_write_text(path, previous + csv_text(rows))

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        write_trajectory(trajectory, self.trajectory_dir, stem)


class LoggerSink:
    """Any other Lightning logger (CSV, Comet, Neptune, your own): scalars through ``logger.log_metrics``, the rest
    as files in the logger's run folder.

    Scalars land wherever the logger puts its metrics (``metrics.csv`` for ``CSVLogger``), at ``record.step``;
    images, figures, histograms and the trajectory go to ``<run_dir>/gmar/step_XXXXXX/`` and ``<run_dir>``.

    Args:
        logger: The Lightning logger.
        run_dir: The logger's own run folder (see [`logger_run_dir`][gmar_lightning.callback.sinks.logger_run_dir]).
    """

    def __init__(self, logger: Logger, run_dir: str | os.PathLike[str]) -> None:
        self.logger = logger
        self.files = FileSink(Path(run_dir) / "gmar", trajectory_dir=run_dir, write_scalars=False)

    def log_evaluation(self, record: EvaluationRecord) -> None:
        if record.scalars:
            self.logger.log_metrics({tag: float(value) for tag, value in record.scalars.items()}, step=record.step)
        self.files.log_evaluation(record)

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        self.files.save_trajectory(trajectory, stem)


class MLFlowSink:
    """An MLflow run (``MLFlowLogger``): scalars through ``logger.log_metrics``, files as the run's artifacts.

    Nothing is written into the tracking store's folders directly (MLflow reads every folder there as an
    experiment): images, figures and histograms are staged in a temporary folder and uploaded with
    ``log_artifacts`` under ``gmar/step_XXXXXX/``; the trajectory files go to the artifact root.

    Args:
        logger: The ``MLFlowLogger``.
    """

    def __init__(self, logger: MLFlowLogger) -> None:
        self.logger = logger
        self._written: dict[int, int] = {}  # step -> evaluations uploaded at it

    def log_evaluation(self, record: EvaluationRecord) -> None:
        if record.scalars:
            self.logger.log_metrics({tag: float(value) for tag, value in record.scalars.items()}, step=record.step)
        with tempfile.TemporaryDirectory(prefix="gmar_mlflow_") as staging:
            files = FileSink(staging, write_scalars=False)
            files.log_evaluation(record)
            repeat = self._written.get(record.step, 0)
            step_dir = files.last_step_dir
            if step_dir is not None and step_dir.is_dir():
                name = files.step_dir(record.step, repeat).name
                self.logger.experiment.log_artifacts(self.logger.run_id, str(step_dir), f"gmar/{name}")
            self._written[record.step] = repeat + 1

    def save_trajectory(self, trajectory: HeadTrajectory, stem: str = TRAJECTORY_STEM) -> None:
        with tempfile.TemporaryDirectory(prefix="gmar_mlflow_") as staging:
            for path in write_trajectory(trajectory, staging, stem):
                self.logger.experiment.log_artifact(self.logger.run_id, str(path))


def logger_run_dir(logger: Logger, default_root_dir: str | os.PathLike[str]) -> Path:
    """The folder that belongs to ``logger``'s current run.

    ``logger.log_dir`` where the logger has one (TensorBoard, CSV), the W&B run's files folder, and otherwise
    ``<save_dir or default_root_dir>/<name>/<version>``, the folder Lightning's ``ModelCheckpoint`` uses.

    Examples:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> root = tempfile.mkdtemp()
        >>> logger_run_dir(CSVLogger(root, name="run"), root).relative_to(root).as_posix()
        'run/version_0'
    """
    if isinstance(logger, WandbLogger):
        return Path(logger.experiment.dir)
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, str | os.PathLike):
        return Path(log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or default_root_dir) / str(logger.name) / version


def new_version_dir(root: str | os.PathLike[str]) -> Path:
    """Create and return the next free ``<root>/version_N``, claimed atomically so concurrent runs never share it.

    Examples:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> [new_version_dir(root).name for _ in range(2)]
        ['version_0', 'version_1']
    """
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(path.name[8:]) for path in folder.glob("version_*") if path.name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        candidate = folder / f"version_{version}"
        try:
            candidate.mkdir()
        except FileExistsError:
            version += 1
            continue
        return candidate


def sinks_for_loggers(
    loggers: Sequence[Any],
    save_dir: str | os.PathLike[str] | None = None,
    default_root_dir: str | os.PathLike[str] | None = None,
) -> list[Sink]:
    """Pick a sink for each of the trainer's loggers, each writing into its own run's folder.

    * ``TensorBoardLogger`` -> [`TensorBoardSink`][gmar_lightning.callback.sinks.TensorBoardSink], trajectory files in
      ``logger.log_dir``.
    * ``WandbLogger`` -> [`WandbSink`][gmar_lightning.callback.sinks.WandbSink], trajectory files in the run's files
      folder (uploaded with the run).
    * ``MLFlowLogger`` -> [`MLFlowSink`][gmar_lightning.callback.sinks.MLFlowSink]: scalars as metrics, files as the
      run's artifacts.
    * Any other logger -> [`LoggerSink`][gmar_lightning.callback.sinks.LoggerSink]: scalars through
      ``logger.log_metrics``, files in the logger's run folder
      ([`logger_run_dir`][gmar_lightning.callback.sinks.logger_run_dir]).
    * No logger at all: a [`FileSink`][gmar_lightning.callback.sinks.FileSink] in a new
      ``<default_root_dir>/gmar/version_N``, with a one-time notice saying where the files go.
    * An explicit ``save_dir`` always adds a [`FileSink`][gmar_lightning.callback.sinks.FileSink] in a new
      ``<save_dir>/version_N``.

    On global ranks other than 0 the list is empty, so the sinks never write twice.

    Args:
        loggers: ``trainer.loggers``.
        save_dir: Root for extra plain PNG/CSV/NPZ output; ``None`` for none (but see "no logger" above).
        default_root_dir: ``trainer.default_root_dir``: the root of run folders that no logger names.

    Returns:
        The sinks, in logger order, the file sink last.

    Examples:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> [type(sink).__name__ for sink in sinks_for_loggers([TensorBoardLogger(tempfile.mkdtemp())])]
        ['TensorBoardSink']
    """
    if isinstance(loggers, str) or not isinstance(loggers, Sequence):
        raise TypeError(
            f"`loggers` must be a list of Lightning loggers (trainer.loggers), got {type(loggers).__name__}."
        )
    if rank_zero_only.rank != 0:
        return []
    root = Path(default_root_dir) if default_root_dir is not None else Path.cwd()
    sinks: list[Sink] = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger.log_dir))
        elif isinstance(logger, WandbLogger):
            sinks.append(WandbSink(logger.experiment))
        elif isinstance(logger, MLFlowLogger):
            sinks.append(MLFlowSink(logger))
        else:
            sinks.append(LoggerSink(logger, logger_run_dir(logger, root)))
    if save_dir is None and not sinks:
        save_dir = root / "gmar"
    if save_dir is not None:
        file_sink = FileSink(new_version_dir(save_dir))
        if not sinks:
            rank_zero_info(f"GMARCallback: no logger; writing PNG/CSV/NPZ to {file_sink.save_dir}")
        sinks.append(file_sink)
    return sinks
