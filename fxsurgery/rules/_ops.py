"""Resolving operator names to ATen overloads."""
from __future__ import annotations

import torch

aten = torch.ops.aten


def ops(*names: str) -> list:
    """`ops("relu.default", "add.Tensor")` -> the overloads that exist in this torch build
    (a name missing from an older build is skipped rather than breaking the import)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        try:
            found.append(getattr(getattr(aten, packet), overload or "default"))
        except AttributeError:
            continue
    return found
