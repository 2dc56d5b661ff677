"""RMSNorm written out element-wise, fused back into `aten.rms_norm` for the analysis.

Llama, Mistral, Qwen and Gemma write their norm as `x * rsqrt(mean(x**2, -1, keepdim) + eps)`.
Element by element that is a product of x_j with a statistic of the whole row, so the labels
give every position of the row the same set: the positions of the stream can no longer be
told apart, and a change of its width cannot be planned. The fused operator's rule says what
the expression means (output j is x_j normalised by the row), and it is the same function, so
the map stays sound; the planner then sees the norm (and reports it, or `fs.hf.resize` widens
through it).

This pass finds the pattern in a captured graph (the ATen form torch.export gives: pow,
mean.dim over the last axis with keepdim, add of a number, rsqrt, mul with the same x) and
replaces the product by `aten.rms_norm(x, [n], None, eps)`; the statistic's nodes go when
nothing else reads them. The learned weight stays the multiplication it was.
"""
from __future__ import annotations

import torch

__all__ = ["fuse_rms_norm"]

aten = torch.ops.aten


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _statistic_of(r):
    """x and eps when `r` is rsqrt(mean(x ** 2, [-1], True) + eps), else None."""
    if not _is(r, aten.rsqrt.default):
        return None
    add = r.args[0]
    if not _is(add, aten.add.Tensor) or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if not _is(mean, aten.mean.dim) or len(mean.args) < 3 or mean.args[2] is not True:
        return None
    pow_ = mean.args[0]
    if not _is(pow_, aten.pow.Tensor_Scalar) or pow_.args[1] != 2:
        return None
    x = pow_.args[0]
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    dims = mean.args[1]
    if val is None or list(dims) not in ([-1], [val.dim() - 1]) or "dtype" in mean.kwargs:
        return None
    return x, float(add.args[1]), int(val.shape[-1])


def fuse_rms_norm(gm: torch.fx.GraphModule) -> int:
    """Fuses every element-wise RMSNorm of `gm` in place; returns how many."""
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
            continue
        for x_arg, r_arg in (node.args, node.args[::-1]):
            found = _statistic_of(r_arg)
            if found is None or found[0] is not x_arg:
                continue
            x, eps, n = found
            with graph.inserting_before(node):
                new = graph.call_function(aten.rms_norm.default, (x, [n], None, eps))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            fused += 1
            break
    if fused:
        graph.eliminate_dead_code()
        gm.recompile()
    return fused
