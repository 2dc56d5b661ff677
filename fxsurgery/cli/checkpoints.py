"""Checkpoints for the command line: reading a state dict and loading it into a model after
checking that it matches.

Checkpoints are state dicts saved with `torch.save` (read with `weights_only=True`) or
`.safetensors` files (with the safetensors package); a dict holding the state dict under
"state_dict", "model_state_dict" or "model" (a training checkpoint) is read too.
"""
from __future__ import annotations

import os

import torch

from ..tied import tied_names
from .errors import CliError

__all__ = ["load_checkpoint", "load_into", "on_meta"]


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
