"""Moved to [`gmar_lightning.callback.sinks`][gmar_lightning.callback.sinks]; this alias keeps ``gmar_lightning.sinks``
imports working."""

from gmar_lightning.callback.records import EvaluationRecord
from gmar_lightning.callback.sinks import (
    FileSink,
    LoggerSink,
    MLFlowSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    logger_run_dir,
    new_version_dir,
    sinks_for_loggers,
    write_trajectory,
)
from gmar_lightning.trajectory import TRAJECTORY_CSV, TRAJECTORY_NPZ

__all__ = [
    "TRAJECTORY_CSV",
    "TRAJECTORY_NPZ",
    "EvaluationRecord",
    "FileSink",
    "LoggerSink",
    "MLFlowSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "logger_run_dir",
    "new_version_dir",
    "sinks_for_loggers",
    "write_trajectory",
]
