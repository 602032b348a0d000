"""Argument checks at the public boundary: each raises with a sentence naming the argument."""

from __future__ import annotations

from typing import Any


def positive_int(label: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ValueError naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return value


def at_least(label: str, value: Any, least: int) -> int:
    """``value`` if it is an int >= ``least`` (not a bool), else ValueError naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{label} must be an integer >= {least}, got {value!r}")
    return value


def fraction(label: str, value: Any) -> float:
    """``value`` as a float if it is a number in (0, 1] (not a bool), else ValueError naming
    ``label``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{label} must be a number in (0, 1], got {value!r}")
    return float(value)
