"""Checkpoints for the command line: reading a state dict and loading it into a model after
checking that it matches.

Checkpoints are state dicts saved with `torch.save` (read with `weights_only=True`) or
`.safetensors` files (with the safetensors package); a dict holding the state dict under
"state_dict", "model_state_dict" or "model" (a training checkpoint) is read too.

A checkpoint directory (transformers' layout: `model.safetensors`, or shards with
`model.safetensors.index.json`) is never loaded: the commands stream it into another one.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

import torch

from ..tied import tied_names
from .errors import CliError

__all__ = ["load_checkpoint", "load_into", "on_meta", "is_directory_output", "check_output_directory", "init_of",
           "config_files", "stream"]


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.pt`/`.pth`/`.bin` file (torch.load, weights only) or a
    `.safetensors` file."""
    if not os.path.exists(path):
        raise CliError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CliError(f"reading {path!r} needs the safetensors package (pip install safetensors), "
                           "or save the checkpoint with torch.save") from None
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - reported with the file named
            raise CliError(f"cannot read safetensors checkpoint {path!r}: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported with the file named
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): {first}") from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CliError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict (name -> tensor)")


def _listing(names, limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_into(model: torch.nn.Module, state: dict, path: str) -> None:
    """Loads a checkpoint into a model after checking that it matches: every key present (a tied
    parameter may be stored under one of its names), none unknown, every shape equal."""
    expected = model.state_dict(keep_vars=True)
    group_of = tied_names(model)
    missing = [k for k in expected if k not in state and not any(a in state for a in group_of.get(k, ()))]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})" for k in state
             if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(wrong)}")
        raise CliError(f"checkpoint {path!r} does not match the old model ({type(model).__name__}): "
                       + "; ".join(parts))
    complete = dict(state)
    for k in expected:
        if k not in complete:
            complete[k] = next(state[a] for a in group_of[k] if a in state)
    on_meta = any(t.device.type == "meta" for t in expected.values())
    model.load_state_dict(complete, strict=True, assign=on_meta)


def on_meta(model: torch.nn.Module) -> bool:
    return any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values())


# --- checkpoint directories: streaming ------------------------------------------------------
# An output without a file suffix (or an existing directory) is a checkpoint directory: the
# models stay on the meta device and the weights are streamed into it shard by shard
# (fxsurgery.surgery.checkpoint), written into a temporary sibling renamed into place.

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# What an output directory may already hold: it is replaced whole, so anything else in it
# (a user's files) makes it refused rather than deleted.
_CHECKPOINT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                              r"config\.json|generation_config\.json")


def is_directory_output(path: str) -> bool:
    """Whether -o names a checkpoint directory (streamed) rather than a file."""
    return os.path.isdir(path) or path.endswith(("/", os.sep)) or not path.lower().endswith(FILE_SUFFIXES)


def check_output_directory(path: str, flag: str, inputs) -> None:
    """Fails now, before any work, if the checkpoint directory `path` cannot be written: its
    parent missing or not writable, a file in its place, files in it that are not a checkpoint's,
    or an input (path, flag, what) inside it."""
    from .files import TEMP_PREFIX
    full = os.path.abspath(path)
    parent = os.path.dirname(full.rstrip(os.sep)) or os.sep
    what = f"the new checkpoint directory {flag} {path!r}"
    if not os.path.isdir(parent):
        raise CliError(f"cannot write {what}: folder {parent!r} does not exist; create it first")
    if os.path.exists(full) and not os.path.isdir(full):
        raise CliError(f"cannot write {what}: it is a file; give a directory, or a file name ending in "
                       f"{', '.join(FILE_SUFFIXES)} to write one file")
    for other, other_flag, other_what in inputs:
        if other and os.path.exists(other):
            o = os.path.realpath(other)
            d = os.path.realpath(full)
            if o == d or o.startswith(d.rstrip(os.sep) + os.sep):
                raise CliError(f"{flag} {path!r} holds {other_what} ({other_flag}); write the new checkpoint "
                               "elsewhere: fxsurgery never modifies its inputs")
    if os.path.isdir(full):
        others = sorted(f for f in os.listdir(full) if not _CHECKPOINT_FILE.fullmatch(f))
        if others:
            raise CliError(f"cannot write {what}: it exists and holds files that are not a checkpoint's "
                           f"({_listing(others, 5)}); an output directory is replaced whole: give a new or "
                           "empty directory")
    try:
        probe = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise CliError(f"cannot write {what}: {err.strerror} in folder {parent!r}") from None


def init_of(model):
    """The new elements' initialisation for streaming: a transformers model's own
    `_init_weights` (called on one module at a time), else each module's reset_parameters."""
    init = getattr(model, "_init_weights", None)
    return init if callable(init) and hasattr(model, "config") else None


def config_files(model) -> dict:
    """{"config.json": writer} when the model has a Hugging Face config, so that
    `from_pretrained(output)` works; written inside the output before it is renamed into place."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_file", None)):
        return {}
    return {"config.json": lambda path: config.to_json_file(str(path))}


def stream(plans, src: str, output: str, args, *, init=None, config=None, init_like=None):
    """Carries the checkpoint `src` through `plans` (one after the other: a rewrite's changes)
    into the directory `output`; intermediate checkpoints live in a temporary folder next to it,
    deleted in any case. Returns the last `Written`."""
    from ..surgery.checkpoint import apply_to_checkpoint
    from .common import log, progress as progress_of
    from .files import TEMP_PREFIX
    parent = os.path.dirname(os.path.abspath(output).rstrip(os.sep)) or os.sep
    work = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent) if len(plans) > 1 else None
    progress = progress_of(args)     # a bar on a terminal only
    try:
        current, written = src, None
        for i, p in enumerate(plans, 1):
            last = i == len(plans)
            dst = output.rstrip(os.sep) if last else os.path.join(work, f"step{i}")
            log(args, f"streaming {current} -> {output if last else f'(change {i}, temporary)'}")
            written = apply_to_checkpoint(p, current, dst, init=init, progress=progress, overwrite=last,
                                          sync=last, extra_files=(config or {}) if last else None,
                                          init_like=init_like)
            current = dst
        return written
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
