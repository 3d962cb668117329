"""Small argument checks shared by the configuration classes, so that each check is worded once."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any, *, none_ok: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (or None, when ``none_ok``).

    >>> check_positive_int("shard_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: `shard_size` must be a positive integer, got 0.
    """
    if value is None and none_ok:
        return
    # bool is an int subclass, but `True` for a count is a mistake (e.g. a YAML `yes`), not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        alternative = " or None" if none_ok else ""
        raise ValueError(f"`{name}` must be a positive integer{alternative}, got {value!r}.")
