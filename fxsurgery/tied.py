"""Tied parameters: the state_dict names a model registers for one tensor.

A tensor registered under several names (an output projection sharing the embedding's weight)
is captured once, planned once and written once, but every one of its names may be asked for
or stored in a checkpoint. Grouping is by tensor identity over parameters then buffers, with
`remove_duplicate=False` so that every name is seen.
"""
from __future__ import annotations

import torch

__all__ = ["tied_groups", "tied_names"]


def tied_groups(model: torch.nn.Module) -> list[tuple[str, ...]]:
    """Every group of names sharing one tensor, a lone name as a group of one; groups and the
    names in each in the order the model registers them (parameters, then buffers)."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    return [tuple(names) for names in by_id.values()]


def tied_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Each name -> its group (itself included, the first registered name first)."""
    return {name: group for group in tied_groups(model) for name in group}
