"""Sizes as messages and `probescope info` write them."""

from __future__ import annotations


def bytes_text(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a number of at least 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
