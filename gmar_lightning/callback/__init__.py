"""Everything that runs inside a Lightning fit: the callbacks, what one evaluation logs, and where it goes.

- :mod:`~gmar_lightning.callback.gmar`: :class:`GMARCallback`, one callback class per file.
- :mod:`~gmar_lightning.callback.records`: :class:`~gmar_lightning.callback.records.EvaluationRecord`, the plain data
  one evaluation logs, and how it is assembled from explanations.
- :mod:`~gmar_lightning.callback.sinks`: the logger back-ends (TensorBoard, W&B, files).
"""

from gmar_lightning.callback.gmar import GMARCallback

__all__ = ["GMARCallback"]
