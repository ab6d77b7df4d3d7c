"""Logger sinks against the real back-ends: TensorBoard event files, an offline W&B run and plain files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gmar_lightning.callback.records import EvaluationRecord
from gmar_lightning.callback.sinks import (
    FileSink,
    LoggerSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    sinks_for_loggers,
)
from gmar_lightning.render import head_heatmap_figure, trajectory_figure
from gmar_lightning.trajectory import HeadTrajectory

OVERLAY_TAG = "gmar/overlay/gmar_l1"
FIGURE_TAG = "gmar/head_importance"
HISTOGRAM_TAG = "gmar/head_weights/layer_00"
SCALAR_TAG = "gmar/entropy/layer_00"
CAPTION = "true: cat, pred: dog (61%)"
GALLERY_TAG = "gmar/probe/gmar_l1"
TABLE_TAG = "gmar/head_weights_table"
CHART_TAG = "gmar/head_mean/layer_00"
HEAD_TAGS = ("gmar/head_mean/layer_00/head_00", "gmar/head_mean/layer_00/head_01")


def make_trajectory() -> HeadTrajectory:
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    trajectory.append(0, 10, torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([[1.0, 1.0], [9.0, 1.0]]))
    trajectory.append(1, 20, torch.tensor([[0.4, 0.6], [0.7, 0.3]]), torch.tensor([[2.0, 3.0], [7.0, 3.0]]))
    return trajectory


def make_record(step: int = 12, epoch: int = 1, scalar: float = 0.75) -> EvaluationRecord:
    return EvaluationRecord(
        step=step,
        epoch=epoch,
        images={OVERLAY_TAG: torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(step))},
        figures={
            FIGURE_TAG: head_heatmap_figure(torch.rand(2, 2)),
            "gmar/trajectory": trajectory_figure(make_trajectory()),
        },
        histograms={HISTOGRAM_TAG: torch.tensor([0.1, 0.2, 0.3, 0.4])},
        scalars={SCALAR_TAG: scalar, HEAD_TAGS[0]: 0.25 + scalar / 10, HEAD_TAGS[1]: 0.75 - scalar / 10},
        captions={OVERLAY_TAG: CAPTION},
        galleries={GALLERY_TAG: [(torch.rand(3, 8, 8), CAPTION), (torch.rand(3, 8, 8), "true: dog, pred: dog (97%)")]},
        tables={TABLE_TAG: (["layer", "head", "weight"], [[0, 0, 0.25], [0, 1, 0.75]])},
        line_charts={CHART_TAG: list(HEAD_TAGS)},
    )


def assert_trajectory_files(directory: Path) -> None:
    restored = HeadTrajectory.load_npz(directory / "head_importance.npz")
    assert torch.equal(restored.weights, make_trajectory().weights)
    header = "validation,epoch,step,layer,layer_name,head,weight,score\n"
    assert (directory / "head_importance.csv").read_text().startswith(header)


def test_tensorboard_sink_writes_every_kind_at_the_step(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    assert isinstance(sink, Sink)
    sink.log_evaluation(make_record(step=12))
    sink.log_evaluation(make_record(step=40, scalar=0.5))
    sink.save_trajectory(make_trajectory())
    sink.close()

    events = event_accumulator.EventAccumulator(
        str(tmp_path),
        size_guidance={
            event_accumulator.IMAGES: 0,
            event_accumulator.HISTOGRAMS: 0,
            event_accumulator.SCALARS: 0,
            event_accumulator.TENSORS: 0,
        },
    ).Reload()
    tags = events.Tags()
    assert {OVERLAY_TAG, FIGURE_TAG, "gmar/trajectory"} <= set(tags["images"])
    assert [image.step for image in events.Images(OVERLAY_TAG)] == [12, 40]
    overlay = Image.open(io.BytesIO(events.Images(OVERLAY_TAG)[0].encoded_image_string))
    assert overlay.size == (30, 20)
    # The logged pixels are the record's, each rounded to the nearest of 256 levels.
    expected = (make_record(step=12).images[OVERLAY_TAG] * 255).round().byte().permute(1, 2, 0).numpy()
    assert (np.asarray(overlay.convert("RGB")) == expected).all()
    assert [image.step for image in events.Images(FIGURE_TAG)] == [12, 40]
    figure = events.Images(FIGURE_TAG)[0]
    logged = Image.open(io.BytesIO(figure.encoded_image_string))
    assert (figure.width, figure.height) == logged.size  # the header of the PNG it holds
    assert [histogram.step for histogram in events.Histograms(HISTOGRAM_TAG)] == [12, 40]
    assert events.Histograms(HISTOGRAM_TAG)[0].histogram_value.num == 4
    assert [(scalar.step, scalar.value) for scalar in events.Scalars(SCALAR_TAG)] == [(12, 0.75), (40, 0.5)]
    captions = events.Tensors(f"{OVERLAY_TAG}/text_summary")
    assert [(caption.step, caption.tensor_proto.string_val) for caption in captions] == [
        (12, [CAPTION.encode()]),
        (40, [CAPTION.encode()]),
    ]
    # One custom-scalars chart for the layer, one line per head, written once although logged twice.
    (layout_event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "gmar/head_mean"
    assert [(chart.title, list(chart.multiline.tag)) for chart in category.chart] == [
        ("layer_00", [f"^{HEAD_TAGS[0]}$", f"^{HEAD_TAGS[1]}$"])
    ]
    assert [scalar.value for scalar in events.Scalars(HEAD_TAGS[1])] == pytest.approx([0.675, 0.7])
    (table, _) = events.Tensors(f"{TABLE_TAG}/text_summary")
    assert table.tensor_proto.string_val[0].decode().splitlines()[2] == "| 0 | 0 | 0.2500 |"
    assert_trajectory_files(tmp_path)


def test_file_sink_writes_valid_files_atomically(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "gmar")
    sink.log_evaluation(make_record(step=12, scalar=0.75))
    sink.log_evaluation(make_record(step=123, epoch=2, scalar=0.5))
    sink.save_trajectory(make_trajectory())

    step_dir = tmp_path / "gmar" / "step_000123"
    assert sorted(path.name for path in step_dir.iterdir()) == [
        "captions.json",
        "gmar_head_importance.png",
        "gmar_head_weights_table.csv",
        "gmar_overlay_gmar_l1.png",
        "gmar_trajectory.png",
        "histograms.npz",
    ]
    assert (step_dir / "gmar_head_weights_table.csv").read_text() == "layer,head,weight\n0,0,0.25\n0,1,0.75\n"
    with Image.open(step_dir / "gmar_overlay_gmar_l1.png") as overlay:
        assert overlay.format == "PNG" and overlay.size == (30, 20) and overlay.mode == "RGB"
    with Image.open(step_dir / "gmar_head_importance.png") as figure:
        figure.verify()
    with np.load(step_dir / "histograms.npz") as histograms:
        assert histograms[HISTOGRAM_TAG].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert json.loads((step_dir / "captions.json").read_text()) == {OVERLAY_TAG: CAPTION}
    with (tmp_path / "gmar" / "scalars.csv").open(newline="") as handle:
        assert list(csv.reader(handle)) == [
            ["step", "epoch", "tag", "value"],
            ["12", "1", SCALAR_TAG, "0.75"],
            ["12", "1", HEAD_TAGS[0], "0.325"],
            ["12", "1", HEAD_TAGS[1], "0.675"],
            ["123", "2", SCALAR_TAG, "0.5"],
            ["123", "2", HEAD_TAGS[0], "0.3"],
            ["123", "2", HEAD_TAGS[1], "0.7"],
        ]
    assert_trajectory_files(tmp_path / "gmar")
    leftovers = [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


def test_sinks_for_a_tensorboard_logger(tmp_path: Path, rank_zero_notices: list[str]) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    (sink,) = sinks_for_loggers([logger], default_root_dir=tmp_path)
    assert isinstance(sink, TensorBoardSink) and sink.log_dir == Path(logger.log_dir)
    sink.save_trajectory(make_trajectory())
    assert_trajectory_files(Path(logger.log_dir))
    assert rank_zero_notices == []


def test_sinks_for_a_csv_logger_log_scalars_through_it_and_files_in_its_run(
    tmp_path: Path, rank_zero_notices: list[str]
) -> None:
    logger = CSVLogger(tmp_path)
    (sink,) = sinks_for_loggers([logger], default_root_dir=tmp_path)
    assert isinstance(sink, LoggerSink)
    sink.log_evaluation(make_record(step=12, scalar=0.25))
    sink.save_trajectory(make_trajectory())
    logger.save()
    run_dir = Path(logger.log_dir)
    assert_trajectory_files(run_dir)  # next to metrics.csv, where head-pruning tools look
    assert (run_dir / "gmar" / "step_000012" / "gmar_overlay_gmar_l1.png").is_file()
    with (run_dir / "metrics.csv").open(newline="") as handle:
        assert [(row["step"], row[SCALAR_TAG]) for row in csv.DictReader(handle)] == [("12", "0.25")]
    assert not (run_dir / "gmar" / "scalars.csv").exists()  # the logger has them
    assert rank_zero_notices == []


def test_sinks_without_any_logger_get_a_new_version_folder_per_run(
    tmp_path: Path, rank_zero_notices: list[str]
) -> None:
    first, second = (sinks_for_loggers([], default_root_dir=tmp_path)[0] for _ in range(2))
    assert isinstance(first, FileSink) and isinstance(second, FileSink)
    assert (first.save_dir, second.save_dir) == (tmp_path / "gmar" / "version_0", tmp_path / "gmar" / "version_1")
    assert rank_zero_notices[0] == f"GMARCallback: no logger; writing PNG/CSV/NPZ to {first.save_dir}"
    (explicit,) = sinks_for_loggers([], save_dir=tmp_path / "mine")
    assert explicit.save_dir == tmp_path / "mine" / "version_0"


def test_sinks_serve_several_loggers_and_an_explicit_save_dir(tmp_path: Path) -> None:
    loggers = [CSVLogger(tmp_path), TensorBoardLogger(tmp_path / "tb")]
    sinks = sinks_for_loggers(loggers, save_dir=tmp_path / "files", default_root_dir=tmp_path)
    assert [type(sink) for sink in sinks] == [LoggerSink, TensorBoardSink, FileSink]
    assert sinks[2].save_dir == tmp_path / "files" / "version_0"


def test_sinks_are_empty_on_other_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert sinks_for_loggers([TensorBoardLogger(tmp_path)], save_dir=tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_sinks_for_loggers_rejects_a_single_logger(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="`loggers` must be a list of Lightning loggers"):
        sinks_for_loggers(CSVLogger(tmp_path))  # type: ignore[arg-type]


def test_wandb_sink_logs_one_call_per_evaluation_with_native_media(
    tmp_path: Path, offline_wandb: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="gmar-test")
    (sink,) = sinks_for_loggers([logger], default_root_dir=tmp_path)
    assert isinstance(sink, WandbSink)
    run = logger.experiment
    calls: list[dict] = []
    real_log = run.log
    monkeypatch.setattr(
        run, "log", lambda payload, *args, **kwargs: (calls.append(payload), real_log(payload, *args, **kwargs))
    )
    sink.log_evaluation(make_record(step=12))
    sink.log_evaluation(make_record(step=40, scalar=0.5))
    sink.save_trajectory(make_trajectory())
    files_dir = Path(run.dir)
    offline_wandb.finish()
    offline_wandb.teardown()  # waits until the offline transaction log is flushed

    # Everything of one evaluation in one call, at the trainer's step.
    assert [payload["trainer/global_step"] for payload in calls] == [12, 40]
    assert {GALLERY_TAG, TABLE_TAG, f"{CHART_TAG}/chart", OVERLAY_TAG, HISTOGRAM_TAG} <= set(calls[0])
    assert [image._caption for image in calls[0][GALLERY_TAG]] == [CAPTION, "true: dog, pred: dog (97%)"]
    assert calls[0][TABLE_TAG].data == [[0, 0, 0.25], [0, 1, 0.75]]
    # The line series holds every evaluation so far, one line per head.
    series = calls[1][f"{CHART_TAG}/chart"].table
    assert sorted(series.data) == sorted([[12, "head_00", 0.325], [40, "head_00", 0.3], [12, "head_01", 0.675],
                                          [40, "head_01", 0.7]])  # fmt: skip
    assert_trajectory_files(files_dir)  # the run's own folder, uploaded with it
    assert not any(path.is_symlink() for path in files_dir.iterdir())
    assert not (tmp_path / "head_importance.npz").exists()  # never the save_dir that every run shares
    images = sorted(path.relative_to(files_dir / "media" / "images").as_posix() for path in files_dir.rglob("*.png"))
    assert sorted({name.rsplit("_", 2)[0] for name in images}) == [
        "gmar/head_importance",
        "gmar/overlay/gmar_l1",
        "gmar/probe/gmar_l1",
        "gmar/trajectory",
    ]
    assert len([name for name in images if name.startswith(GALLERY_TAG)]) == 4  # 2 images x 2 evaluations
    # wandb 0.31 keeps offline history only in the binary transaction log (no wandb-summary.json is written);
    # its protobuf records carry keys and JSON values as plain bytes.
    (transaction_log,) = files_dir.parent.glob("run-*.wandb")
    history = transaction_log.read_bytes()
    for expected in (OVERLAY_TAG, FIGURE_TAG, HISTOGRAM_TAG, SCALAR_TAG, "trainer/global_step", CAPTION, '"histogram"',
                     TABLE_TAG, f"{CHART_TAG}/chart", HEAD_TAGS[0]):  # fmt: skip
        assert expected.encode() in history, expected
