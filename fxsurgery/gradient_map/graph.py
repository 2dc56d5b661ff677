"""The captured graph, classified for the gradient mapping: inputs and state, data-dependent and
parameter-derived nodes, and the meeting nodes (data-dependent, with a parameter-derived
operand). `_Graph` is assembled from the parts in categories.py, substitutes.py,
random_points.py and evaluation.py."""
from __future__ import annotations

import torch
import torch.fx
from torch.export.graph_signature import OutputKind
from torch.utils._pytree import tree_flatten

from ..capture import Traced
from ..nodes import describe_node
from .categories import _CategoryRelaxation
from .dtypes import _is_float
from .errors import GradientMapError
from .evaluation import _Evaluation
from .random_points import _RandomPoints
from .substitutes import _Substitutes


class _Graph(_CategoryRelaxation, _Substitutes, _RandomPoints, _Evaluation):
    """The graph, classified: inputs, state, data-dependent and parameter-derived nodes, the
    meeting nodes, and the labelled directions."""

    def __init__(self, traced: Traced):
        self.traced = traced
        self.gm = traced.graph_module
        self.nodes = list(self.gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.kind: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.input_of: dict[str, str] = {}     # placeholder -> user input name
        for n in self.nodes:
            if n.op != "placeholder":
                continue
            kind, name = traced.placeholders.get(n.name, ("input", n.name))
            if kind in ("parameter", "buffer"):
                name = _canonical(traced, name)   # tied parameters: one name, one tensor
            self.kind[n.name] = kind
            self.state[n.name] = name
        for name, node in zip(traced.input_names, traced.input_nodes):
            self.input_of[node] = name
        self._check_outputs()
        self._functionalise()
        self._classify()
        self._check_indices()
        self._substitute()
        self.labels = self._labels()
        self.cat_outputs: set = set()

    def _check_outputs(self) -> None:
        out = next(n for n in self.nodes if n.op == "output")
        flat = tree_flatten(out.args[0])[0] if out.args else []
        specs = self.traced.program.graph_signature.output_specs
        for i, (spec, arg) in enumerate(zip(specs, flat)):
            if spec.kind != OutputKind.USER_OUTPUT:
                continue
            val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
            if not isinstance(val, torch.Tensor):
                where = f" (from {describe_node(arg)})" if isinstance(arg, torch.fx.Node) else ""
                raise GradientMapError(
                    f"model output {i} is {type(val).__name__} {val!r}{where}, not a tensor: the "
                    "gradient mapping needs the model to return a tensor or a tuple of tensors")

    def _classify(self) -> None:
        """data: depends on a user input; param: computed from parameters/buffers/constants
        with at least one float parameter or buffer among its ancestors."""
        self.data: set[str] = set()
        self.param: set[str] = set()
        self.param_states: dict[str, set[str]] = {}   # param-derived node -> float states behind it
        for n in self.nodes:
            if n.op == "placeholder":
                kind = self.kind[n.name]
                if kind == "input":
                    self.data.add(n.name)
                elif kind in ("parameter", "buffer") and _is_float(n.meta.get("val")):
                    self.param.add(n.name)
                    self.param_states[n.name] = {self.state[n.name]}
                continue
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            ins = n.all_input_nodes
            if any(a.name in self.data for a in ins):
                self.data.add(n.name)
            elif any(a.name in self.param for a in ins):
                self.param.add(n.name)
                self.param_states[n.name] = set().union(*(self.param_states.get(a.name, set()) for a in ins))
        # Meeting nodes: data-dependent, with a parameter-derived operand.
        self.meeting: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.op == "call_function" and n.name in self.data:
                states: set[str] = set()
                for a in n.all_input_nodes:
                    if a.name in self.param:
                        states |= self.param_states[a.name]
                if states:
                    self.meeting[n.name] = sorted(states)


def _canonical(traced: Traced, name: str) -> str:
    """The one name a group of tied parameters is known by."""
    if hasattr(traced, "canonical"):
        return traced.canonical(name)
    return next((names[0] for names in traced.aliases.values() if name in names), name)
