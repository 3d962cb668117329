"""Argument checks shared by configs, the scorer and the server, so that every surface words them the same way."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive int (or None when ``optional``).

    >>> check_positive_int("max_row_length", None, optional=True)
    >>> check_positive_int("max_length", 0)
    Traceback (most recent call last):
    ...
    ValueError: `max_length` must be a positive integer, got 0.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if optional else ''}, got {value!r}.")
