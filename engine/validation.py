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
