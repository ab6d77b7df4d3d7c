"""Argument checks shared by modules, with one-line messages that name the argument."""

from __future__ import annotations


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int >= 0`` (not a bool), else raise a ValueError naming ``name``.

    Examples:
        >>> check_non_negative_int("step", 3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value
