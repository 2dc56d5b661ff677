"""Naming graph nodes in the passes' messages and finding their operator."""
from __future__ import annotations

import torch.fx

__all__ = ["module_path", "where", "packet"]


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced in ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def where(node: torch.fx.Node) -> str:
    path = module_path(node)
    return f"node %{node.name}" + (f" (in {path})" if path else "")


def packet(node: torch.fx.Node) -> str:
    """The ATen operator's name without overload ("view" for aten.view.default), or ""."""
    t = node.target
    return t._overloadpacket.__name__ if hasattr(t, "_overloadpacket") else ""
