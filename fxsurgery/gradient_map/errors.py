"""The error the gradient mapping raises, and how an operator is named (in its messages, and by
schema name in the operator tables of the other modules); nodes are named by `fxsurgery.nodes`."""
from __future__ import annotations

import torch


class GradientMapError(RuntimeError):
    """The gradient mapping cannot run on this graph (the node and operator are named)."""


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return "aten." + target._schema.name.split("::")[-1] if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def _schema(target) -> str | None:
    return target._schema.name if isinstance(target, torch._ops.OpOverload) else None
