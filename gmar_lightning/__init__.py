"""gmar-lightning: GMAR explanations and attention-head importance for Vision Transformers while they train.

The public names are loaded on first use (PEP 562), so importing ``gmar_lightning.cli`` can still set process-wide
settings (``OMP_WAIT_POLICY``) before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GMARCallback": "gmar_lightning.callback.gmar",
    "HeadPruning": "gmar_lightning.callback.head_pruning",
    "AttentionAdapter": "gmar_lightning.capture",
    "attention_adapter": "gmar_lightning.capture",
    "register_attention_adapter": "gmar_lightning.capture",
    "unregister_attention_adapter": "gmar_lightning.capture",
    "explain": "gmar_lightning.engine",
    "explain_many": "gmar_lightning.engine",
    "ExplainOptions": "gmar_lightning.options",
    "Explanation": "gmar_lightning.explanation",
    "GMAR_METHODS": "gmar_lightning.explanation",
    "METHODS": "gmar_lightning.explanation",
    "TokenLayout": "gmar_lightning.tokens",
}

__all__ = [
    "GMAR_METHODS",
    "METHODS",
    "AttentionAdapter",
    "ExplainOptions",
    "Explanation",
    "GMARCallback",
    "HeadPruning",
    "TokenLayout",
    "__version__",
    "attention_adapter",
    "explain",
    "explain_many",
    "register_attention_adapter",
    "unregister_attention_adapter",
]

if TYPE_CHECKING:
    from gmar_lightning.callback.gmar import GMARCallback
    from gmar_lightning.callback.head_pruning import HeadPruning
    from gmar_lightning.capture import (
        AttentionAdapter,
        attention_adapter,
        register_attention_adapter,
        unregister_attention_adapter,
    )
    from gmar_lightning.engine import explain, explain_many
    from gmar_lightning.explanation import GMAR_METHODS, METHODS, Explanation
    from gmar_lightning.options import ExplainOptions
    from gmar_lightning.tokens import TokenLayout


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gmar_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
