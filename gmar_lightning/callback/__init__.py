"""Everything that runs inside a Lightning fit: the callbacks, what one evaluation logs, and where it goes.

- [`gmar`][gmar_lightning.callback.gmar]: [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback], one callback
  class per file.
- [`records`][gmar_lightning.callback.records]: [`EvaluationRecord`][gmar_lightning.callback.records.EvaluationRecord],
  the plain data
  one evaluation logs, and how it is assembled from explanations.
- [`sinks`][gmar_lightning.callback.sinks]: the logger back-ends (TensorBoard, W&B, files).
"""

from gmar_lightning.callback.gmar import GMARCallback

__all__ = ["GMARCallback"]
