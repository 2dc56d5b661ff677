"""Operators the transforms cannot run as captured, run through a substitute, still as one node:
in-place operators out of place, batch norm through its decomposition (autograd refuses its
running statistics as differentiable operands), and attention with the math kernel (the fused
CPU kernels have no forward-mode derivative)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..nodes import describe_node
from .dtypes import _to_cpu64
from .errors import GradientMapError, _op_name, _schema

aten = torch.ops.aten


class _Substitutes:
    """Part of `_Graph` (graph.py): which nodes run through a substitute, and the substitutes."""

    def _functionalise(self) -> None:
        """In-place operators are run out of place (each meeting node is evaluated twice, and
        vmap cannot write into an unbatched tensor); their result replaces the operand."""
        self.functional: dict[str, Any] = {}
        self.inplace: set[str] = set()
        for n in self.nodes:
            t = n.target
            if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
                continue
            args = t._schema.arguments
            if not (args and args[0].alias_info is not None and args[0].alias_info.is_write):
                continue
            base = t._schema.name.split("::")[-1]
            packet = getattr(aten, base.rstrip("_"), None) if base.endswith("_") else None
            overload = getattr(packet, t._overloadname, None) if packet is not None else None
            if overload is None:
                raise GradientMapError(f"{_op_name(t)} at {describe_node(n)} writes into its operand and has no "
                                       "out-of-place variant the gradient mapping could run instead")
            self.functional[n.name] = overload
            if n.args and isinstance(n.args[0], torch.fx.Node):
                self.inplace.add(n.name)

    def _substitute(self) -> None:
        """Operators autograd cannot differentiate in an operand the map needs are run through
        their decomposition, still as one node: batch norm's running statistics (eval mode) are
        operands `native_batch_norm` refuses to differentiate."""
        self.impl: dict[str, tuple] = {}
        for n in self.nodes:
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                    and _schema(n.target) in _SUBSTITUTED:
                flat = tree_flatten((n.args, n.kwargs))[0]
                positions = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
                self.impl[n.name] = (self._decompose(n), positions)

    def _decompose(self, node: torch.fx.Node) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx
        flat, spec = tree_flatten((node.args, node.kwargs))
        positions = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
        examples = []
        for i in positions:
            val = flat[i].meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise GradientMapError(f"{_op_name(node.target)} at {describe_node(node)} has an operand "
                                       f"%{flat[i].name} that is not a tensor; cannot decompose it")
            dtype = torch.float64 if val.dtype.is_floating_point else val.dtype
            examples.append(torch.zeros(tuple(val.shape), dtype=dtype))

        def fn(*tensors):
            vals = list(flat)
            for i, t in zip(positions, tensors):
                vals[i] = t
            a, k = _to_cpu64(tree_unflatten(vals, spec))
            return node.target(*_without_updated_statistics(node.target, list(a), k), **k)

        try:
            with _quiet():
                return make_fx(fn, decomposition_table=_decompositions(), tracing_mode="fake")(*examples)
        except Exception as err:  # noqa: BLE001 - re-raised with the node named
            raise GradientMapError(f"{_op_name(node.target)} at {describe_node(node)} could not be decomposed into "
                                   f"the operations autograd differentiates: {type(err).__name__}: {err}") from err


_DECOMPOSITIONS: dict | None = None


def _decompositions() -> dict:
    """Batch norm written out, so that its running statistics are differentiable operands."""
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        from torch._decomp import get_decompositions
        names = ("native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                 "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
                 "_batch_norm_with_update_functional", "cudnn_batch_norm", "miopen_batch_norm")
        ops = [getattr(aten, n) for n in names if hasattr(aten, n)]
        _DECOMPOSITIONS = get_decompositions(ops)
    return _DECOMPOSITIONS


_SUBSTITUTED = frozenset("aten::" + n for n in (
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
    "_batch_norm_impl_index", "_batch_norm_no_update", "instance_norm"))


def _without_updated_statistics(target, args: list, kwargs: dict) -> list:
    """A normalisation that uses its batch statistics (training mode) only updates its running
    statistics, which its output does not read: they are left out, so that the decomposition
    writes into no operand (a transform refuses in-place writes into captured tensors)."""
    schema = target._schema.arguments
    names = [a.name for a in schema]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if not (bound.get("training") is True or bound.get("use_input_stats") is True):
        return args
    for stat in ("running_mean", "running_var"):
        if stat in names and isinstance(schema[names.index(stat)].type, torch.OptionalType):
            i = names.index(stat)
            if i < len(args):
                args[i] = None
            elif stat in kwargs:
                kwargs[stat] = None
    return args


@contextlib.contextmanager
def _quiet():
    """Transforms run with the math attention kernel (the fused CPU kernels have no forward-mode
    derivative) and without functorch's performance warnings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        yield
