"""Command line: `fxsurgery map pkg.module:factory ...`, for pipelines that do not write Python.

A factory is any callable that returns either a module, or `(module, example_inputs,
features)` as the functions of `fxsurgery.zoo` do. Inputs can be given or overridden with
`--input name=2x3x5[:long]`, descriptions with `--features file.json`, whose entries are a list
of names (features along the last axis), {"features": [...], "dim": d} or {"categories": [...]}.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

import torch

__all__ = ["main", "load_factory"]


class CliError(Exception):
    pass


def load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"model {spec!r} must be written package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"cannot import {module_name!r} for model {spec!r}: {err}") from err
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no {attr!r} (model {spec!r})") from None
    if not callable(factory):
        raise CliError(f"{spec!r} is not callable")
    return factory


def read_json_object(path: str, what: str) -> dict:
    """A JSON file holding an object, or a CliError naming the file and what it should hold."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"cannot read {what} file {path!r}: {err}") from err
    if not isinstance(data, dict):
        raise CliError(f"{what} file {path!r} must hold an object")
    return data


def _parse_input(text: str):
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise CliError(f"--input {text!r} must be name=2x3x5 or name=2x3x5:long")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = [int(s) for s in shape_text.split("x")]
    except ValueError:
        raise CliError(f"--input {text!r}: shape {shape_text!r} is not like 2x3x5") from None
    dtype = getattr(torch, dtype_text or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise CliError(f"--input {text!r}: unknown dtype {dtype_text!r}")
    return name, shape, dtype


def build(spec: str, inputs_args, features_path, device: str):
    """Calls the factory and returns (model, inputs dict, features dict)."""
    from .labels import description_from_json
    made = load_factory(spec)()
    if isinstance(made, torch.nn.Module):
        model, inputs, features = made, {}, {}
    elif isinstance(made, tuple) and len(made) == 3:
        model, inputs, features = made
        if not isinstance(inputs, dict):
            inputs = {f"input{i}": t for i, t in enumerate(inputs if isinstance(inputs, tuple) else (inputs,))}
    else:
        raise CliError(f"factory {spec!r} returned {type(made).__name__}; expected a module or "
                       "(module, example_inputs, features)")
    inputs = dict(inputs)
    for text in inputs_args or []:
        name, shape, dtype = _parse_input(text)
        inputs[name] = torch.zeros(shape, dtype=dtype, device=device)
    if not inputs:
        raise CliError(f"factory {spec!r} gives no example inputs: pass --input name=shape")
    if features_path:
        raw = read_json_object(features_path, "features")  # input name -> description
        features = {k: description_from_json(v) for k, v in raw.items()}
    return model, inputs, features


def cmd_map(args) -> int:
    import fxsurgery as fs
    model, inputs, features = build(args.model, args.input, args.features, args.device)
    traced = fs.trace(model, inputs, features)
    imap = fs.interaction_map(traced)
    print(imap.table(tablefmt=args.format))
    if args.json:
        imap.save_json(args.json)
        print(f"\nwrote {args.json}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxsurgery", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("map", help="print which parameters meet which input labels")
    m.add_argument("model", help="package.module:factory")
    m.add_argument("--input", action="append", help="name=2x3x5[:dtype], repeatable")
    m.add_argument("--features", help="JSON file: input name -> description")
    m.add_argument("--json", help="write the map as JSON to this file")
    m.add_argument("--device", default="cpu", help="device for --input tensors (meta: no memory)")
    m.add_argument("--format", default="simple", help="table format (tabulate's tablefmt)")
    m.set_defaults(run=cmd_map)
    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands():
    """Sub-commands living in other modules register here (plan, transplant, coverage, rewrite)."""
    found = []
    for name in ("fxsurgery.coverage", "fxsurgery.surgery_cli", "fxsurgery.rewrite_cli"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        add = getattr(module, "add_subcommand", None)
        if add is not None:
            found.append(add)
    return found


def main(argv=None) -> int:
    from .capture import CaptureError, InputError
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*_flat_weights.*")
    try:
        return args.run(args)
    except (CliError, CaptureError, InputError, KeyError, ValueError) as err:
        print(f"fxsurgery {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the package's own module, so that its exception classes are the ones other
    # modules raise (not copies living in __main__).
    from fxsurgery.cli import main as _main
    sys.exit(_main())
