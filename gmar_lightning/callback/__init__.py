"""Everything that runs inside a Lightning fit: the callbacks, what one evaluation logs, and where it goes.

- [`gmar`][gmar_lightning.callback.gmar]: [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback], one callback
  class per file.
- [`head_pruning`][gmar_lightning.callback.head_pruning]:
  [`HeadPruning`][gmar_lightning.callback.head_pruning.HeadPruning], which removes the least important heads at
  scheduled epochs while fine-tuning goes on.
- [`records`][gmar_lightning.callback.records]: [`EvaluationRecord`][gmar_lightning.callback.records.EvaluationRecord],
  the plain data
  one evaluation logs, and how it is assembled from explanations.
- [`sinks`][gmar_lightning.callback.sinks]: the logger back-ends (TensorBoard, W&B, files).
"""

from gmar_lightning.callback.gmar import GMARCallback
from gmar_lightning.callback.head_pruning import HeadPruning

__all__ = ["GMARCallback", "HeadPruning"]
