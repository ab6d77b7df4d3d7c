"""gmar-lightning: GMAR explanations and attention-head importance for Vision Transformers while they train."""

from gmar_lightning.callback import GMARCallback
from gmar_lightning.capture import AttentionAdapter, register_attention_adapter, unregister_attention_adapter
from gmar_lightning.engine import explain
from gmar_lightning.explanation import GMAR_METHODS, METHODS, Explanation
from gmar_lightning.tokens import TokenLayout

__version__ = "0.1.0"

__all__ = [
    "GMAR_METHODS",
    "METHODS",
    "AttentionAdapter",
    "Explanation",
    "GMARCallback",
    "TokenLayout",
    "__version__",
    "explain",
    "register_attention_adapter",
    "unregister_attention_adapter",
]
