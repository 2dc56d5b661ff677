"""The changes `fxsurgery rewrite` applies: one entry per pass, saying its flag, the
`fs.passes` function it runs and how the flag's text becomes that function's arguments."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable

from .errors import CliError

__all__ = ["CHANGES", "ChangeSpec", "ChangeAction", "parse_change"]


@dataclass(frozen=True)
class ChangeSpec:
    """One kind of change: its flag, the fs.passes function it runs, and how its text becomes
    that function's arguments after the model."""
    flag: str
    function: str
    metavar: str
    help: str
    parse: Callable[[str, str, argparse.Namespace], tuple[tuple, dict]]


def _split(flag: str, text: str, sep: str, form: str, empty_left: bool = False) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not right or (not left and not empty_left):
        raise CliError(f"{flag} {text!r} must be {form}")
    return left, right


def _names(flag: str, text: str, names: str, form: str) -> list[str]:
    out = [n.strip() for n in names.split(",")]
    if not all(out):
        raise CliError(f"{flag} {text!r}: an empty name in {names!r} (the form is {form})")
    return out


def _int(flag: str, text: str, value: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", value.strip()):
        raise CliError(f"{flag} {text!r}: {what} {value!r} is not an integer")
    return int(value)


def _input_names(form: str):
    def parse(flag, text, args):
        name, rest = _split(flag, text, ":", form)
        return (name, _names(flag, text, rest, form)), {}
    return parse


def _add_features(flag, text, args):
    form = "INPUT:A,B (at the end), INPUT:A,B@N (at position N) or INPUT:A,B@NAME (after feature NAME)"
    name, rest = _split(flag, text, ":", form)
    at = None
    if "@" in rest:
        rest, _, where = rest.rpartition("@")
        if not rest or not where:
            raise CliError(f"{flag} {text!r} must be {form}")
        at = int(where) if re.fullmatch(r"-?\d+", where) else where
    return (name, _names(flag, text, rest, form)), {"at": at}


def _add_categories(flag, text, args):
    (name, names), _ = _input_names("INPUT:A,B")(flag, text, args)
    return (name, names), {"new_categories": args.new_categories}


def _widen(flag, text, args):
    group, size = _split(flag, text, "=", "GROUP=SIZE or GROUP=+K")
    if size.startswith("+"):
        return (group,), {"by": _int(flag, text, size[1:], "the number of units to add")}
    return (group, _int(flag, text, size, "the size")), {}


def _prune(flag, text, args):
    form = "GROUP=0,3,5 (the old positions to keep, in their new order)"
    group, keep = _split(flag, text, "=", form)
    return (group, [_int(flag, text, k, "position") for k in _names(flag, text, keep, form)]), {}


def _insert_identity(flag, text, args):
    after, _, name = text.partition("=")
    if not after:
        raise CliError(f"{flag} {text!r} must be MODULE or MODULE=NEW_NAME")
    return (after,), ({"name": name} if name else {})


def _add_heads(flag, text, args):
    module, n = _split(flag, text, "=", "MODULE=N (an empty MODULE: the model itself)", empty_left=True)
    return (module, _int(flag, text, n, "the number of heads")), {}


# The changes, in the order --help lists them. A new pass is one entry.
CHANGES = [
    ChangeSpec("--add-features", "add_features", "INPUT:A,B[@AFTER|@POS]",
               "add features to an input (at the end, after feature AFTER, or at position POS)", _add_features),
    ChangeSpec("--remove-features", "remove_features", "INPUT:A,B", "remove features from an input",
               _input_names("INPUT:A,B")),
    ChangeSpec("--reorder-features", "reorder_features", "INPUT:A,B,C",
               "put an input's features in a new order (every feature once)", _input_names("INPUT:A,B,C")),
    ChangeSpec("--add-categories", "add_categories", "INPUT:A,B",
               "add categories to an index input (embedding rows)", _add_categories),
    ChangeSpec("--widen", "widen", "GROUP=SIZE|GROUP=+K", "widen a hidden axis to SIZE units, or by K", _widen),
    ChangeSpec("--prune", "prune_units", "GROUP=0,3,5", "keep only these units of a hidden axis", _prune),
    ChangeSpec("--insert-identity-layer", "insert_identity_layer", "MODULE[=NAME]",
               "insert a layer after MODULE that starts as the identity", _insert_identity),
    ChangeSpec("--add-heads", "add_heads", "MODULE=N", "add N heads to the attention in MODULE", _add_heads),
]
_BY_FLAG = {c.flag: c for c in CHANGES}


def parse_change(flag: str, text: str, args) -> tuple[ChangeSpec, tuple, dict]:
    spec = _BY_FLAG[flag]
    a, kw = spec.parse(flag, text, args)
    return spec, a, kw


class ChangeAction(argparse.Action):
    """Keeps every change flag in one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        changes = list(getattr(namespace, "changes", None) or [])
        changes.append((self.option_strings[0], values))
        namespace.changes = changes
