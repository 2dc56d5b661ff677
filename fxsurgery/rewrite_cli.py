"""Command line for the rewriting passes: `fxsurgery rewrite`.

    fxsurgery rewrite pkg.mod:factory --weights old.pt --add-features obs:armor,speed --widen core=4096 -o new.pt

Applies the requested changes in the order given (each flag is repeatable), printing each
change's plan and the largest deviation of the new model from the old on random inputs, then
saves the rewritten model's state_dict (`torch.save`, or a `.safetensors` file) and, with
`--features-out`, the new input descriptions as JSON (readable by `--features`). The saved
weights are for the GraphModule the passes build: run the same passes in Python (or this command
without `--weights`) to get the module, then `load_state_dict(strict=True)`. Nothing is written
unless every change succeeded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .cli import CliError, build
from .surgery_cli import load_checkpoint, load_into

__all__ = ["add_subcommand", "CHANGES", "ChangeSpec", "parse_change"]


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


class _Change(argparse.Action):
    """Keeps every change flag in one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        changes = list(getattr(namespace, "changes", None) or [])
        changes.append((self.option_strings[0], values))
        namespace.changes = changes


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _one_line(err: Exception) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def _call(spec: ChangeSpec, source, a, kw):
    import fxsurgery.passes as passes
    fn = getattr(passes, spec.function, None)
    if fn is None:
        raise CliError(f"{spec.flag}: fs.passes.{spec.function} is not available in this version of fxsurgery")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own
        return fn(source, *a, **kw)


def _check_output(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {what} {path!r}: folder {folder!r} does not exist")


def _write_atomically(path: str, write) -> str:
    """Writes to a temporary file next to `path`; returns its name (renamed by the caller)."""
    fd, tmp = tempfile.mkstemp(prefix=".fxsurgery-", suffix=os.path.splitext(path)[1],
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def cmd_rewrite(args) -> int:
    import fxsurgery as fs
    from .surgery.apply import materialise

    changes = getattr(args, "changes", None) or []
    if not changes:
        raise CliError("no change requested; give at least one of " + ", ".join(c.flag for c in CHANGES))
    parsed = [(flag, text, *parse_change(flag, text, args)) for flag, text in changes]
    if args.output.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise CliError(f"writing {args.output!r} needs the safetensors package (pip install safetensors); "
                       "or write a .pt file")
    _check_output(args.output, "the new checkpoint")
    if args.features_out:
        _check_output(args.features_out, "the features file")

    t0 = time.perf_counter()
    _log(args, f"building {args.model}")
    try:
        model, inputs, features = build(args.model, args.input, args.features, args.device)
    except CliError:
        raise
    except Exception as err:  # noqa: BLE001 - the factory's own failure, reported in one line
        raise CliError(f"factory {args.model!r} failed: {type(err).__name__}: {_one_line(err)}") from err
    if args.weights:
        _log(args, f"loading {args.weights}")
        load_into(model, load_checkpoint(args.weights), args.weights)
    elif any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
        _log(args, "  the model is on the meta device and no --weights were given: initialising it on the cpu")
        materialise(model)
    else:
        _log(args, "  no --weights: rewriting the weights the factory built")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_flat_weights.*")
            source = fs.trace(model, inputs, features)
    except Exception as err:  # noqa: BLE001
        raise CliError(_one_line(err)) from err
    n_old = sum(int(t.numel()) for t in model.state_dict().values())

    for i, (flag, text, spec, a, kw) in enumerate(parsed, 1):
        _log(args, f"[{i}/{len(parsed)}] {flag} {text}")
        try:
            gm = _call(spec, source, a, kw)
        except CliError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a change is one line naming it
            raise CliError(f"{flag} {text}: {_one_line(err)}") from err
        p = gm.meta["fxsurgery"]["plan"]
        print(f"== {i}. {flag} {text}  ({gm.meta['fxsurgery'].get('what', spec.function)})")
        print(p.table(tablefmt=args.format))
        print()
        print(p.summary())
        if args.verify:
            print(fs.verify(p, n=args.verify))
        print()
        source = gm

    state = gm.state_dict()
    n_new = sum(int(t.numel()) for t in state.values())
    if args.output.endswith(".safetensors"):
        from safetensors.torch import save_model
        tmp_out = _write_atomically(args.output, lambda path: save_model(gm, path))
    else:
        tmp_out = _write_atomically(args.output, lambda path: torch.save(state, path))
    tmp_features = None
    if args.features_out:
        descriptions = {name: d.to_json() for name, d in gm.meta["fxsurgery"]["features"].items() if d is not None}

        def dump(path):
            with open(path, "w") as f:
                json.dump(descriptions, f, indent=1)
        try:
            tmp_features = _write_atomically(args.features_out, dump)
        except BaseException:
            os.unlink(tmp_out)
            raise
    os.replace(tmp_out, args.output)
    print(f"wrote {args.output} ({n_old:,} -> {n_new:,} parameter and buffer elements, "
          f"{len(parsed)} change{'s' if len(parsed) != 1 else ''})")
    if tmp_features is not None:
        os.replace(tmp_features, args.features_out)
        print(f"wrote {args.features_out}")
    _log(args, f"  done in {time.perf_counter() - t0:.1f}s")
    return 0


def add_subcommand(subparsers) -> None:
    """Adds `rewrite` to the `fxsurgery` command line."""
    from .surgery.planning import NEW_CATEGORIES

    help_text = "change a model with the rewriting passes and save its carried-over weights"
    p = subparsers.add_parser("rewrite", help=help_text, description=help_text,
                              epilog="Changes apply in the order given; every change flag is repeatable.")
    p.add_argument("model", help="the model: package.module:factory")
    p.add_argument("--weights", help="its checkpoint (.pt or .safetensors); without it, the factory's weights")
    p.add_argument("-o", "--output", required=True, help="where to write the new state_dict (.pt or .safetensors)")
    p.add_argument("--features-out", help="write the new input descriptions (JSON, as --features reads) here")
    p.add_argument("--features", help="JSON file: input name -> description")
    p.add_argument("--input", action="append", help="example input name=2x3x5[:dtype], repeatable")
    for spec in CHANGES:
        p.add_argument(spec.flag, action=_Change, metavar=spec.metavar, help=spec.help + " (repeatable)")
    p.add_argument("--new-categories", choices=NEW_CATEGORIES, default="zero",
                   help="initial value of new embedding rows (default: zero)")
    p.add_argument("--verify", type=int, default=8, metavar="N",
                   help="compare old and new model on N random inputs after each change (0: do not; default 8)")
    p.add_argument("--device", default="cpu", help="device for --input tensors")
    p.add_argument("--format", default="simple", help="table format (tabulate's tablefmt)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(run=cmd_rewrite, changes=[])
