"""Moved to [`gmar_lightning.callback.records`][gmar_lightning.callback.records]; this alias keeps
``gmar_lightning.records`` imports working."""

from gmar_lightning.callback.records import METRICS, Probe, evaluation_record, probe_metric_scores

__all__ = ["METRICS", "Probe", "evaluation_record", "probe_metric_scores"]
