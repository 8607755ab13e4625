"""Argument checks shared by every public class and function of the library.

One rule: a value of the wrong type raises `TypeError`, a value of the right
type outside its range raises `ValueError`; both name the owner (the class or
function called), the argument and the value received. Integer-like numpy
scalars are accepted wherever a Python int is, real numpy scalars wherever a
float is; `bool` is never taken for a number.

Examples:

    >>> import numpy as np
    >>> check_int("units", np.int64(8), "SparseDense")
    8
    >>> check_int("units", 0, "SparseDense")
    Traceback (most recent call last):
    ...
    ValueError: `SparseDense` got an invalid `units`. Expected an int >= 1. Received: units=0
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = [
    "check_bool",
    "check_choice",
    "check_density",
    "check_epsilon",
    "check_float",
    "check_int",
    "check_seed",
    "check_size",
    "check_type",
]


def _message(owner, name, expected, value):
    return f"`{owner}` got an invalid `{name}`. Expected {expected}. Received: {name}={value!r}"


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for Python and numpy reals (ints included), False for bools."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value, owner: str, minimum: int | None = 1, maximum=None) -> int:
    """`value` as a Python int within `[minimum, maximum]` (None: unbounded)."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an int >= {minimum}"
    elif maximum is not None:
        expected = f"an int <= {maximum}"
    else:
        expected = "an int"
    if not is_int(value):
        raise TypeError(_message(owner, name, expected, value))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(_message(owner, name, expected, int(value)))
    return int(value)


def check_size(name: str, value, owner: str) -> int:
    """`value` as a positive Python int (a number of units, experts, clusters)."""
    return check_int(name, value, owner, minimum=1)


def check_float(name: str, value, owner: str, expected: str, valid=None) -> float:
    """`value` as a Python float: `TypeError` unless a real number, `ValueError`
    unless `valid(value)` (NaN is refused). `expected` completes "Expected ...",
    e.g. "a float > 0"."""
    if not is_real(value):
        raise TypeError(_message(owner, name, expected, value))
    value = float(value)
    if math.isnan(value) or (valid is not None and not valid(value)):
        raise ValueError(_message(owner, name, expected, value))
    return value


def check_seed(seed, owner: str, name: str = "seed"):
    """`seed` as a non-negative Python int, or None."""
    if seed is None:
        return None
    return check_int(name, seed, owner, minimum=0)


def check_density(density, owner: str, name: str = "density") -> float:
    """`density` as a float in (0, 1]."""
    return check_float(name, density, owner, "a float in (0, 1]", lambda d: 0.0 < d <= 1.0)


def check_epsilon(epsilon, owner: str) -> float:
    """SET's `epsilon` as a positive float."""
    return check_float("epsilon", epsilon, owner, "a positive number", lambda e: e > 0)


def check_bool(name: str, value, owner: str) -> bool:
    """`value` if it is a bool (numpy's included)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(_message(owner, name, "a bool", value))
    return bool(value)


def check_choice(name: str, value, owner: str, choices) -> str:
    """`value` if it is one of the strings `choices`."""
    expected = f"one of {tuple(choices)}"
    if not isinstance(value, str):
        raise TypeError(_message(owner, name, expected, value))
    if value not in choices:
        raise ValueError(_message(owner, name, expected, value))
    return value


def check_type(name: str, value, owner: str, types, expected: str):
    """`value` if it is an instance of `types`, else a `TypeError` saying `expected`."""
    if not isinstance(value, types):
        raise TypeError(_message(owner, name, expected, value))
    return value
