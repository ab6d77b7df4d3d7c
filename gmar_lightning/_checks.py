"""Argument checks shared by modules, with one-line messages that name the argument."""

from __future__ import annotations

from gmar_lightning.explanation import METHODS


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int >= 0`` (not a bool), else raise a ValueError naming ``name``.

    Examples:
        >>> check_non_negative_int("step", 3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value


def parse_methods(values: list[str] | str) -> list[str]:
    """Methods from repeated and/or comma-separated values, each one of :data:`gmar_lightning.METHODS`.

    Examples:
        >>> parse_methods(["gmar_l1,rollout", "gmar_l2"])
        ['gmar_l1', 'rollout', 'gmar_l2']
    """
    items = [values] if isinstance(values, str) else values
    methods = [name.strip() for item in items for name in item.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown:
        raise ValueError(f"`--method` must be one or more of {', '.join(METHODS)}; got {unknown or 'nothing'}.")
    return list(dict.fromkeys(methods))
