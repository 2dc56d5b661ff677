"""Checks of the passes' public arguments, made before anything is traced.

A wrong type would otherwise surface deep inside (`"12" - 8` in the sizing arithmetic, a float
`range` bound) as a bare TypeError naming neither the pass nor the value, or be silently
coerced (`int(2.7)` keeps unit 2). Each check names the pass, the argument and the value.
`bool` is not a count (True is not "one head"); numpy and 0-d torch integers are.
"""
from __future__ import annotations

import operator

from .driver import PassError

__all__ = ["PassTypeError", "integer", "count", "name", "names", "optional_name", "positions", "choice"]


class PassTypeError(PassError, TypeError):
    """A pass's argument has the wrong type (a PassError, and a TypeError)."""


def _where(what: str, arg: str, value) -> str:
    return f"{what}: {arg}={value!r} ({type(value).__name__})"


def integer(value, what: str, arg: str) -> int:
    """`value` as an int: an int, a numpy or 0-d torch integer; never a bool, a float or a string."""
    if isinstance(value, bool):
        raise PassTypeError(f"{_where(what, arg, value)}: must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise PassTypeError(f"{_where(what, arg, value)}: must be an integer") from None


def count(value, what: str, arg: str, minimum: int = 1) -> int:
    """An integer of at least `minimum`."""
    n = integer(value, what, arg)
    if n < minimum:
        raise PassError(f"{_where(what, arg, value)}: must be at least {minimum}")
    return n


def name(value, what: str, arg: str) -> str:
    """A string (an input, a module, a hidden axis: whether it exists is checked on the model)."""
    if not isinstance(value, str):
        raise PassTypeError(f"{_where(what, arg, value)}: must be a name (a string)")
    return value


def optional_name(value, what: str, arg: str) -> str | None:
    return None if value is None else name(value, what, arg)


def names(value, what: str, arg: str, *, single: bool = True) -> list[str]:
    """A list of strings; with `single`, one string stands for a list of one."""
    if isinstance(value, str):
        if single:
            return [value]
        raise PassTypeError(f"{_where(what, arg, value)}: must be a list of names, not one string")
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise PassTypeError(f"{_where(what, arg, value)}: must be a list of names (strings)")
    out = list(value)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise PassTypeError(f"{what}: {arg} must hold names (strings); {bad[0]!r} ({type(bad[0]).__name__}) "
                            f"is not one, in {out!r}")
    return out


def positions(value, what: str, arg: str) -> list[int]:
    """A list of integers (old positions); a float is refused, never truncated."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise PassTypeError(f"{_where(what, arg, value)}: must be a list of integer positions")
    out = list(value)
    result = []
    for v in out:
        try:
            result.append(integer(v, what, arg))
        except PassTypeError:
            raise PassTypeError(f"{what}: {arg} must hold integer positions; {v!r} ({type(v).__name__}) is "
                                f"not one, in {out!r}") from None
    return result


def choice(value, what: str, arg: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PassError(f"{_where(what, arg, value)}: must be one of {list(allowed)}")
    return value
