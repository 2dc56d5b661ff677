"""The error the gradient mapping raises, and how a node and an operator are named (in its
messages, and by schema name in the operator tables of the other modules)."""
from __future__ import annotations

import torch
import torch.fx


class GradientMapError(RuntimeError):
    """The gradient mapping cannot run on this graph (the node and operator are named)."""


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"node %{node.name}" + (f" ({path})" if path else "")


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return "aten." + target._schema.name.split("::")[-1] if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def _schema(target) -> str | None:
    return target._schema.name if isinstance(target, torch._ops.OpOverload) else None
