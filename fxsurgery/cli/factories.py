"""Models for the command line: `package.module:factory`, its example inputs and descriptions.

A factory is any callable that returns either a module, or `(module, example_inputs,
features)` as the functions of `fxsurgery.zoo` do. Example inputs are a dict by name, or a
tensor or tuple named after forward's parameters (`input0`, `input1`, ... past them). Inputs
can be given or overridden with `--input name=2x3x5[:long]`, descriptions with `--features
file.json`, whose entries are a list of names (features along the last axis), {"features":
[...], "dim": d} or {"categories": [...]}.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import sys
import warnings

import torch

from .errors import CliError, one_line

__all__ = ["load_factory", "read_json_object", "parse_input", "read_features", "build", "capture",
           "importable_cwd", "quiet_torch"]


@contextlib.contextmanager
def importable_cwd():
    """The current directory first on sys.path, as `python -m` has it, so that a factory next to
    the shell imports; removed afterwards (main may be called from a longer-lived program)."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        try:
            sys.path.remove(cwd)  # the first occurrence: the one put there
        except ValueError:
            pass


def load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"model {spec!r} must be written package.module:factory")
    with importable_cwd():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CliError(f"cannot import {module_name!r} for model {spec!r}: {one_line(err)}") from err
        except Exception as err:  # noqa: BLE001 - the module's own failure (a syntax error, ...)
            raise CliError(f"cannot import {module_name!r} for model {spec!r}: "
                           f"{type(err).__name__}: {one_line(err)}") from err
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"cannot read {what} file {path!r}: {one_line(err)}") from err
    if not isinstance(data, dict):
        raise CliError(f"{what} file {path!r} must hold an object")
    return data


def parse_input(text: str):
    form = "name=2x3x5 or name=2x3x5:long"
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise CliError(f"--input {text!r} must be {form}")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = [int(s) for s in shape_text.split("x")]
    except ValueError:
        raise CliError(f"--input {text!r}: shape {shape_text!r} is not like 2x3x5") from None
    if any(s < 0 for s in shape):
        raise CliError(f"--input {text!r}: shape {shape_text!r} has a negative size")
    dtype = getattr(torch, dtype_text or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise CliError(f"--input {text!r}: unknown dtype {dtype_text!r} (float32, long, ...)")
    return name, shape, dtype


def read_features(path: str) -> dict:
    """Input name -> Features or Categories, each entry checked here so that the error names
    the file and the input (the constructors only know the value)."""
    from ..labels import description_from_json
    out = {}
    for name, entry in read_json_object(path, "features").items():
        where = f"features file {path!r}, input {name!r}"
        if isinstance(entry, dict) and "dim" in entry and (type(entry["dim"]) is not int):
            raise CliError(f"{where}: 'dim' must be an integer axis such as -1, got {entry['dim']!r}")
        try:
            out[name] = description_from_json(entry)
        except (TypeError, ValueError) as err:
            raise CliError(f"{where}: {one_line(err)}") from err
    return out


def _positional_names(model: torch.nn.Module, n: int) -> list[str]:
    """Names for positional example inputs: forward's leading parameters, then inputN (a
    forward(*inputs), or a signature inspect cannot read)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return [names[i] if i < len(names) else f"input{i}" for i in range(n)]


def _call_factory(spec: str):
    factory = load_factory(spec)
    with importable_cwd():  # a factory may import its siblings lazily
        try:
            return factory()
        except CliError:
            raise
        except Exception as err:  # noqa: BLE001 - the factory's own failure, reported in one line
            raise CliError(f"factory {spec!r} failed: {type(err).__name__}: {one_line(err)}") from err


def _call_on_meta(spec: str):
    """The factory called with the meta device as the default: its model has no storage (a
    checkpoint is streamed instead). A factory that cannot run so (it loads weights, say) is
    called as usual, and its model moved to meta afterwards."""
    try:
        with torch.device("meta"):
            return _call_factory(spec)
    except CliError:
        return _call_factory(spec)


def _to_meta(model: torch.nn.Module, inputs: dict) -> tuple[torch.nn.Module, dict]:
    if any(not t.is_meta for t in model.state_dict(keep_vars=True).values()):
        model = model.to("meta")
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


def build(spec: str, inputs_args, features_path, device: str, meta: bool = False):
    """Calls the factory and returns (model, inputs dict, features dict). meta: the model and
    its example inputs on the meta device (for streaming a checkpoint)."""
    made = _call_on_meta(spec) if meta else _call_factory(spec)
    if isinstance(made, torch.nn.Module):
        model, inputs, features = made, {}, {}
    elif isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], torch.nn.Module):
        model, inputs, features = made
        if not isinstance(inputs, dict):
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            inputs = dict(zip(_positional_names(model, len(inputs)), inputs))
        features = dict(features or {})
    else:
        what = f"a tuple of {len(made)}" if isinstance(made, tuple) else type(made).__name__
        raise CliError(f"factory {spec!r} returned {what}; expected a module or "
                       "(module, example_inputs, features)")
    inputs = dict(inputs)
    if meta:
        model, inputs = _to_meta(model, inputs)
        device = "meta"
    for text in inputs_args or []:
        name, shape, dtype = parse_input(text)
        try:
            inputs[name] = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, TypeError) as err:
            raise CliError(f"--input {text!r} on --device {device!r}: {one_line(err)}") from err
    if not inputs:
        raise CliError(f"factory {spec!r} gives no example inputs: pass --input name=shape")
    if features_path:
        features = read_features(features_path)
    return model, inputs, features


@contextlib.contextmanager
def quiet_torch():
    """No log records and no warnings from torch while capturing: a failed export logs its
    traceback (some twenty lines) before raising the error that is reported in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_flat_weights.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logging.disable(previous)


def capture(model, inputs, features):
    """fs.trace, with torch's logging silenced."""
    import fxsurgery as fs
    with quiet_torch():
        return fs.trace(model, inputs, features)
