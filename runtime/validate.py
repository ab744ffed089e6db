"""Argument checks shared by the Python API and the CLIs: one rule for every numeric argument.

Python ints and numpy integers are integers; bools (Python or numpy) are not numbers here, so
`steps=True` is refused rather than read as 1. Floats accept any real number type. Text must be
valid Unicode. Every refusal is a `UserError` naming the argument, the value and the allowed range.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from runtime.errors import ResultError, UserError, UserTypeError


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def integer(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high]."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise UserTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not low <= value <= high:
        raise UserError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def number(name: str, value, low: float, high: float) -> float:
    """`value` as a finite float in [low, high]."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise UserTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return value


def text(name: str, value, *, max_chars: int = 100_000) -> str:
    """A non-empty str of at most `max_chars` characters, valid Unicode (encodable as UTF-8:
    no lone surrogate, which is also how Python hands over the undecodable bytes of a command
    line or a file name), without NUL characters."""
    if not isinstance(value, str):
        raise UserTypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start]
        raise UserError(
            f"{name} is not valid Unicode text: {bad!r} at character {err.start} is a lone "
            "surrogate (an undecodable byte, or half of a UTF-16 pair); send UTF-8 text"
        ) from None
    if not value.strip():
        raise UserError(f"{name} is empty")
    if len(value) > max_chars:
        raise UserError(f"{name} is {len(value)} characters; at most {max_chars} are accepted")
    if "\x00" in value:
        raise UserError(f"{name} contains a NUL character")
    return value


def finite(what: str, value: np.ndarray, hint: str = "") -> np.ndarray:
    """`value` unchanged when every element is finite, else a `ResultError`."""
    if not np.isfinite(value).all():
        bad = int(np.size(value) - np.isfinite(value).sum())
        raise ResultError(
            f"{what} has {bad} NaN/inf values of {np.size(value)}" + (f"; {hint}" if hint else "")
        )
    return value
