"""How a graph node is named in messages, and what module and operator it comes from.

Every error, warning and issue that points at a node says it the same way, "node %linear_1
(encoder.fc)": the node's name in the graph, then the innermost module it was traced in, read
from torch.export's `nn_module_stack`.
"""
from __future__ import annotations

import torch.fx

__all__ = ["module_path", "module_paths", "in_module", "node_tag", "describe_node", "packet"]


def module_paths(node: torch.fx.Node) -> list[str]:
    """Every module the node was traced in, outermost first ("" stands for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced in ("" at the top level)."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def in_module(node: torch.fx.Node, path: str) -> bool:
    """Whether the node was traced inside module `path` (or one of its submodules)."""
    return any(p == path or p.startswith(path + ".") for p in module_paths(node))


def node_tag(node: torch.fx.Node) -> str:
    """"%linear_1 (encoder.fc)", or "%linear_1" at the top level: for a field that already says
    it holds a node (an issue's `where`)."""
    path = module_path(node)
    return f"%{node.name}" + (f" ({path})" if path else "")


def describe_node(node: torch.fx.Node) -> str:
    """"node %linear_1 (encoder.fc)", or "node %linear_1" at the top level: for a message."""
    return "node " + node_tag(node)


def packet(node: torch.fx.Node) -> str:
    """The ATen operator's name without overload ("view" for aten.view.default), or ""."""
    t = node.target
    return t._overloadpacket.__name__ if hasattr(t, "_overloadpacket") else ""
