"""The boolean mapping's engine: label tensors propagated forward through the graph.

`LabelPropagator` is a `torch.fx.Interpreter` that runs the rule of each operator on label
tensors instead of numbers and writes the result into `node.meta["fxsurgery"]`, the way
`torch.fx.passes.shape_prop` writes `tensor_meta`. It runs in one of two modes:

- "deps": the paper's relation. Every element carries the input labels it depends on, and each
  parameter records the labels it meets.
- "keys": the same, except that a parameterised contraction gives its outputs fresh *unit*
  labels, and normalisations and attention keep positions aligned instead of mixing them, so
  a parameter element's key names the nearest units it meets and the units it is aligned with.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from .capture import Traced, wrapped_call
from .label_tensor import LabelTensor, ParamRef, compress, full_ids
from .nodes import describe_node as _where
from .labels import Categories, Features, Label, SetPool
from .rules.registry import REGISTRY, RuleRegistry
from .terms import Terms

__all__ = ["LabelPropagator", "RuleError", "NotCovered", "UnknownOperatorWarning", "input_labels", "META_KEY",
           "fallbacks"]

META_KEY = "fxsurgery"
# node.meta[META_KEY][_FALLBACK[mode]]: [(operator, why), ...] for each use of the sound fallback
# while running that node (in a decomposition or a wrapped region, on the node that holds it).
_FALLBACK = {"deps": "deps fallback", "keys": "keys fallback"}


def fallbacks(graph: torch.fx.Graph) -> list[tuple[str, str, str]]:
    """(node name, operator, why) of every node of `graph` where the last propagation used the
    sound fallback, in graph order: the elements after such a node depend on everything its
    inputs depend on, so they cannot be told apart by their labels."""
    out = []
    for node in graph.nodes:
        meta = node.meta.get(META_KEY) or {}
        seen = []
        for key in _FALLBACK.values():
            for op, why in meta.get(key, ()):
                if (op, why) not in seen:
                    seen.append((op, why))
        out += [(node.name, op, why) for op, why in seen]
    return out


class RuleError(RuntimeError):
    """A rule failed or returned something that does not fit its operator's output."""


class NotCovered(Exception):
    """Raised by a rule for an argument combination it does not model (a repeated einsum
    letter on a parameter, a data-dependent index into an operator that needs constants):
    the engine then uses the sound fallback and warns, naming the case."""


class UnknownOperatorWarning(UserWarning):
    """An operator had no label rule; the sound fallback was used."""



def input_labels(name: str, desc, shape, pool: SetPool) -> LabelTensor:
    """The label tensor of a user input, from its description (cached in the pool, so that
    the two modes and repeated runs label inputs once)."""
    shape = tuple(shape)
    cache = pool.__dict__.setdefault("_inputs", {})
    key = (name, repr(desc), shape)
    if key not in cache:
        cache[key] = _input_labels(name, desc, shape, pool)
    return cache[key]


def _input_labels(name: str, desc, shape, pool: SetPool) -> LabelTensor:
    if isinstance(desc, Features):
        dim = desc.dim % len(shape)
        ids = pool.singletons(pool.label_ids("feature", name, desc.names))
        view = [1] * len(shape)
        view[dim] = len(desc)
        return LabelTensor(ids.reshape(view), shape)
    if isinstance(desc, Categories):
        members = pool.label_ids("category", name, desc.names)
        every = int(pool.intern_segments(members, torch.zeros_like(members), 1)[0])
        return LabelTensor.of_set(shape, every)
    return LabelTensor.of_set(shape, pool.singleton(Label("input", name, name, 0)))


class RuleContext:
    """What a rule sees besides its arguments."""

    def __init__(self, prop: "LabelPropagator", node: torch.fx.Node):
        self.prop = prop
        self.node = node
        self.pool = prop.pool
        self.mode = prop.mode
        self.out = node.meta.get("val")

    @property
    def keys(self) -> bool:
        return self.mode == "keys"

    def out_shape(self, i: int | None = None) -> tuple:
        v = self.out if i is None else self.out[i]
        return tuple(v.shape)

    # parameters ----------------------------------------------------------------------
    def meet(self, operand: LabelTensor, meets: torch.Tensor | None, aligned: torch.Tensor | None = None) -> None:
        """Records that the elements of a parameter-derived `operand` meet `meets` and are
        aligned with `aligned` (id tensors broadcastable to the operand's shape)."""
        self.prop.record(operand, meets, aligned if self.keys else None)

    def units(self, group: str, n: int) -> torch.Tensor:
        """Ids of the singleton sets {unit group[0]}, ..., {unit group[n-1]}."""
        return self.prop.unit_ids(group, n)

    def warn(self, message: str) -> None:
        self.prop.note(f"{message} at {_where(self.node)}")


class LabelPropagator(torch.fx.Interpreter):
    def __init__(self, traced: Traced, pool: SetPool, mode: str = "deps",
                 registry: RuleRegistry = REGISTRY, graph_module=None, step=None):
        super().__init__(graph_module or traced.graph_module, garbage_collect_values=True)
        if mode not in ("deps", "keys"):
            raise ValueError(f"mode must be 'deps' or 'keys', got {mode!r}")
        self.traced = traced
        self.pool = pool
        self.mode = mode
        self.registry = registry
        self.meets: dict[str, Terms] = {}
        self.aligned: dict[str, Terms] = {}
        self.notes: list[str] = []
        self._units: dict[tuple[str, int], torch.Tensor] = {}
        self._node: torch.fx.Node | None = None
        self.outer: torch.fx.Node | None = None   # for a sub-graph: the node of the traced graph running it
        self.step = step   # called with no argument after each node (a progress bar); sub-graphs get none

    # bookkeeping ---------------------------------------------------------------------
    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def unit_ids(self, group: str, n: int) -> torch.Tensor:
        key = (group, n)
        ids = self._units.get(key)
        if ids is None:
            ids = self.pool.singletons(self.pool.unit_label_ids(group, n))
            self._units[key] = ids
        return ids

    def record(self, operand: LabelTensor, meets, aligned) -> None:
        for ref in operand.refs:
            for store, ids in ((self.meets, meets), (self.aligned, aligned)):
                if ids is None:
                    continue
                terms = store.setdefault(ref.name, Terms(ref.shape))
                ids = ids if ids.dim() == len(operand.shape) else ids.reshape([1] * len(operand.shape))
                if ref.everything:
                    terms.add(full_ids(ref.shape, LabelTensor(ids, operand.shape).total(self.pool)), self.pool)
                elif ref.index is None:
                    terms.add(compress(ids), self.pool)
                else:
                    index = ref.index.expand(operand.shape).reshape(-1).long()
                    vals = ids.expand(operand.shape).reshape(-1)
                    keep = index >= 0
                    n = 1
                    for s in ref.shape:
                        n *= s
                    seg = self.pool.segment_union(vals[keep], index[keep], n)
                    terms.add(compress(seg.reshape(ref.shape)), self.pool)

    # interpreter ---------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        self._node = n
        if self.outer is None and META_KEY in n.meta:
            n.meta[META_KEY].pop(_FALLBACK[self.mode], None)   # from an earlier run
        result = super().run_node(n)
        if n.op != "output":
            n.meta.setdefault(META_KEY, {})[self.mode] = result
        if self.step is not None:
            self.step()
        return result

    def placeholder(self, target, args, kwargs):
        node = self._node
        kind, name = self.traced.placeholders.get(node.name, ("input", node.name))
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
        if kind == "input":
            name = self.traced.input_names[self.traced.input_nodes.index(node.name)]
            return input_labels(name, self.traced.descriptions.get(name), shape, self.pool)
        if kind in ("parameter", "buffer"):
            return LabelTensor.empty(shape, refs=(ParamRef(self.traced.canonical(name), shape),))
        const = self.traced.program.constants.get(name)
        if isinstance(const, torch.Tensor) and const.device.type != "meta":
            return LabelTensor.empty(shape, const=const.detach())
        return LabelTensor.empty(shape)

    def call_function(self, target, args, kwargs):
        node = self._node
        if target is operator.getitem:
            return args[0][args[1]]
        wrapped = wrapped_call(target, args)
        if wrapped is not None and isinstance(wrapped[0], torch.fx.GraphModule) and not kwargs:
            # A no_grad / autocast region: its graph is propagated as if inlined.
            return self._check(target, self._run_sub(wrapped[0], list(wrapped[1])), node.meta.get("val"))
        if not isinstance(target, torch._ops.OpOverload):
            return self._fallback(target, args, kwargs, f"no label rule for {target}")
        if not target._schema.returns:
            return None  # assertions and other operators without results
        val = node.meta.get("val")
        if val is not None and not _has_tensor(val):
            return val  # sizes and other Python values flow through unchanged
        rule = self.registry.get(target)
        ctx = RuleContext(self, node)
        if rule is None:
            decomposed = self._decompose(target, args, kwargs)
            if decomposed is not None:
                result = decomposed
            else:
                result = self._fallback(target, args, kwargs, f"no label rule for {target}")
        else:
            try:
                result = rule(ctx, *args, **kwargs)
            except NotCovered as why:
                result = self._fallback(target, args, kwargs, f"the rule for {target} does not cover {why}")
            except RuleError:
                raise
            except Exception as err:  # noqa: BLE001 - re-raised with the rule and node named
                raise RuleError(f"label rule ({rule.family}) for {target} failed at {_where(node)}: "
                                f"{type(err).__name__}: {err}") from err
        result = self._check(target, result, val)
        self._propagate_const(target, args, kwargs, result)
        if target._schema.arguments and target._schema.arguments[0].alias_info is not None \
                and target._schema.arguments[0].alias_info.is_write and node.args \
                and isinstance(node.args[0], torch.fx.Node):
            # An in-place operator changes its first argument for every later reader.
            self.env[node.args[0]] = result
        return result

    # checks and fallbacks ------------------------------------------------------------
    def _check(self, target, result, val):
        """The driver checks what rules return: one label tensor per tensor output, same shapes."""
        got, _ = tree_flatten(result)
        want, _ = tree_flatten(val)
        got_t = [g for g in got if isinstance(g, LabelTensor)]
        want_t = [w for w in want if isinstance(w, torch.Tensor)]
        if len(got_t) != len(want_t):
            raise RuleError(f"label rule for {target} returned {len(got_t)} label tensors for "
                            f"{len(want_t)} outputs at {_where(self._node)}")
        for g, w in zip(got_t, want_t):
            if tuple(g.shape) != tuple(w.shape):
                raise RuleError(f"label rule for {target} returned labels of shape {g.shape} for an "
                                f"output of shape {tuple(w.shape)} at {_where(self._node)}")
        return result

    def _fallback(self, target, args, kwargs, why: str):
        """The sound rule: every output element depends on everything the inputs depend on,
        and every parameter operand meets all of it."""
        node = self._node
        message = f"{why} at {_where(node)}; used the sound fallback (everything meets everything)"
        self.note(message)
        warnings.warn(message, UnknownOperatorWarning, stacklevel=2)
        top = self.outer if self.outer is not None else node
        top.meta.setdefault(META_KEY, {}).setdefault(_FALLBACK[self.mode], []).append((str(target), why))
        operands = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, LabelTensor)]
        total = self.pool.union_many(op.total(self.pool) for op in operands)
        data = [op for op in operands if not op.is_param]
        params = [op for op in operands if op.is_param]
        val = node.meta.get("val")
        only_params = params and all(op.is_free for op in data)
        refs = tuple(ParamRef(r.name, r.shape, everything=True) for op in params for r in op.refs) \
            if only_params else ()
        if not only_params:
            for op in params:
                self.record(op, full_ids(op.shape, total), full_ids(op.shape, total) if self.mode == "keys" else None)
        return tree_map(lambda v: LabelTensor(full_ids(v.shape, total), v.shape, refs)
                        if isinstance(v, torch.Tensor) else v, val)

    def _decompose(self, target, args, kwargs):
        """Runs the labels through the operator's decomposition, when it has one."""
        from torch._decomp import decomposition_table
        decomp = decomposition_table.get(target)
        if decomp is None and torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"):
            decomp = target.decompose
        if decomp is None:
            return None
        node = self._node
        try:
            from torch.fx.experimental.proxy_tensor import make_fx
            flat, spec = tree_flatten((args, kwargs))
            metas = [torch.empty(a.shape, dtype=_val_dtype(n), device="meta") if isinstance(a, LabelTensor) else a
                     for a, n in zip(flat, tree_flatten((node.args, node.kwargs))[0] + [None] * len(flat))]
            positions = [i for i, a in enumerate(flat) if isinstance(a, LabelTensor)]

            def fn(*tensors):
                vals = list(metas)
                for i, t in zip(positions, tensors):
                    vals[i] = t
                a, k = torch.utils._pytree.tree_unflatten(vals, spec)
                return decomp(*a, **k)

            gm = make_fx(fn, tracing_mode="fake")(*[metas[i] for i in positions])
        except Exception:  # noqa: BLE001 - no usable decomposition: the caller falls back
            return None
        self.note(f"{target} has no label rule; labels were run through its decomposition at {_where(node)}")
        return self._run_sub(gm, [flat[i] for i in positions])

    def _run_sub(self, gm: torch.fx.GraphModule, operands: list):
        """Propagates `operands` through the graph `gm` (a decomposition, a wrapped region) into
        this propagator's records: its placeholders take the operands in order."""
        sub = LabelPropagator(self.traced, self.pool, self.mode, self.registry, graph_module=gm)
        sub.meets, sub.aligned, sub.notes, sub._units = self.meets, self.aligned, self.notes, self._units
        sub.outer = self.outer if self.outer is not None else self._node
        sub_placeholders = {}
        sub.placeholder = lambda t, a, k: sub_placeholders[sub._node.name]  # type: ignore[method-assign]
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if len(names) != len(operands):
            raise RuleError(f"the graph run at {_where(self._node)} takes {len(names)} inputs, "
                            f"{len(operands)} were given")
        for name, value in zip(names, operands):
            sub_placeholders[name] = value
        return sub.run(*operands)

    def _propagate_const(self, target, args, kwargs, result):
        """Values computed from constants alone (shapes, aranges) are kept concrete, so that
        an index built from them can be read by the movement rules."""
        if not isinstance(result, LabelTensor) or result.const is not None:
            return
        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, LabelTensor)]
        if any(t.const is None for t in tensors):
            return
        if not _const_safe(target):
            return
        numel = 1
        for s in result.shape:
            numel *= s
        if numel > (1 << 20):
            return
        try:
            a, k = tree_map(lambda v: v.const if isinstance(v, LabelTensor) else v, (args, kwargs))
            k = {key: (torch.device("cpu") if key == "device" else v) for key, v in k.items()}
            value = target(*a, **k)
        except Exception:  # noqa: BLE001 - not computable here: stays symbolic
            return
        if isinstance(value, torch.Tensor) and tuple(value.shape) == result.shape:
            result.const = value


def _has_tensor(val) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_flatten(val)[0])


def _val_dtype(n):
    if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor):
        return n.meta["val"].dtype
    return torch.float32


def _const_safe(target) -> bool:
    return not target._schema.is_mutable and "rand" not in target._schema.name \
        and target._schema.name not in ("aten::bernoulli", "aten::normal", "aten::dropout",
                                        "aten::native_dropout", "aten::empty", "aten::empty_like")
