"""Argument checks shared by every module, each raising one exception type with a one-line message that names the
argument: a value out of its range or set raises ``ValueError``; an object of the wrong kind raises ``TypeError``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "check_choice",
    "check_int_in_range",
    "check_logits",
    "check_non_negative_int",
    "check_number_in_range",
    "check_positive_int",
    "one_line",
    "parse_methods",
    "strip_ansi",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int >= 0`` (not a bool), else raise a ValueError naming ``name``.

    Examples:
        >>> check_non_negative_int("step", 3)
        3
    """
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an ``int >= 1`` (or ``None`` when allowed), else raise a ValueError naming ``name``.

    Examples:
        >>> check_positive_int("chunk_size", None, allow_none=True) is None
        True
        >>> check_positive_int("steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: `steps` must be a positive integer, got 0.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return value


def check_int_in_range(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[low, high]`` (``>= low`` without ``high``), else a ValueError.

    Examples:
        >>> check_int_in_range("image_size", 8, 16)
        Traceback (most recent call last):
        ...
        ValueError: `image_size` must be an integer >= 16, got 8.
    """
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bounds}, got {value!r}.")
    return value


def check_number_in_range(name: str, value: object, low: float, high: float, *, include_high: bool = True) -> float:
    """Return ``value`` if it is a real number in ``[low, high]`` (``[low, high)`` without ``include_high``).

    Examples:
        >>> check_number_in_range("discard_ratio", 1.0, 0.0, 1.0, include_high=False)
        Traceback (most recent call last):
        ...
        ValueError: `discard_ratio` must lie in [0.0, 1.0), got 1.0.
    """
    bounds = f"[{low}, {high}{']' if include_high else ')'}"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number in {bounds}, got {type(value).__name__} {value!r}.")
    if not (low <= value <= high if include_high else low <= value < high):
        raise ValueError(f"`{name}` must lie in {bounds}, got {value!r}.")
    return float(value)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type's name when it has none, for
    quoting a library's multi-line error inside one of ours.

    Examples:
        >>> one_line(OSError("no such file\\n  (hint: check the path)"))
        'no such file (hint: check the path)'
        >>> one_line(KeyError())
        'KeyError'
    """
    return " ".join(strip_ansi(str(error)).split()) or type(error).__name__


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes, which libraries add to messages meant for a terminal.

    Examples:
        >>> strip_ansi("\x1b[1mWeightsUnpickler error:\x1b[0m Unsupported global")
        'WeightsUnpickler error: Unsupported global'
    """
    return _ANSI_ESCAPE.sub("", text)


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise a ValueError naming ``name`` and the valid choices unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_logits(model: object, output: object, batch: int) -> Tensor:
    """The ``[batch, C]`` logits of a classifier's output (a tensor, or the ``.logits`` of a transformers output),
    else a ValueError naming the model and the fix (every module that runs a classifier checks its output with this).
    """
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = list(logits.shape) if isinstance(logits, Tensor) else f"{type(output).__name__} without `.logits`"
        raise ValueError(
            f"`model` ({type(model).__name__}) must return logits [B, C] (or an output with `.logits`) in eval mode, "
            f"got {shape}; pass the module whose forward returns classification logits."
        )
    return logits


def parse_methods(values: list[str] | str) -> list[str]:
    """Methods from repeated and/or comma-separated values, each one of
    [`gmar_lightning.METHODS`][gmar_lightning.explanation.METHODS].

    Examples:
        >>> parse_methods(["gmar_l1,rollout", "gmar_l2"])
        ['gmar_l1', 'rollout', 'gmar_l2']
    """
    # Imported here so that this module imports nothing of the package and every module can use it.
    from gmar_lightning.explanation import METHODS

    items = [values] if isinstance(values, str) else values
    methods = [name.strip() for item in items for name in item.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown:
        raise ValueError(f"`--method` must be one of {', '.join(METHODS)}; got {unknown or 'nothing'}.")
    return list(dict.fromkeys(methods))
