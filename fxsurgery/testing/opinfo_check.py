"""Every registered rule checked against autodiff on one-operator models (fxsurgery.testing.opinfo).

For a rule's operator, the samples of its OpInfos (or, where torch has none, those of
opinfo_hand.HAND) are built into one-operator models and captured as fxsurgery captures
(`fs.trace`); when the operator is not in that graph (torch.export emitted another overload, or
the operator is a core ATen one that only decomposition produces) the graph decomposed to core
ATen is tried. A sample whose graphs hold neither is reported as such, not counted.

On a graph holding the operator, the boolean mapping (the rules) and the gradient mapping
(autodiff, no rule) are compared on every node's dependence and on what every parameter
element meets:

- sound: nothing the gradient mapping finds is missing from the boolean mapping, ever;
- tight: the two are equal, at 4 random points or, failing that, at 24 others (a ReLU branch
  the first points never took); otherwise the difference must be a named divergence of
  opinfo_divergences.DIVERGENCES.

Results per model: "pass", "divergence" (named), "unsound", "loose" (differs, unnamed),
"rule error" (the rule raised), and, not counted as checks: "fallback" (the rule declined the
case and the sound fallback ran), "no derivative" (the operator's result is not floating, so
autodiff sees nothing), "not captured", "gradient map failed".
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field


from ..capture import Traced, trace
from ..gradient_map import dependence_difference, gradient_dependence, gradient_interaction_map
from ..interaction_map import compare, interaction_map
from ..propagate import RuleError, fallbacks
from ..rules import REGISTRY
from .opinfo import Model, _on_a_copy, models, opinfo_cases, sources
from .opinfo_divergences import explains
from .opinfo_hand import HAND

__all__ = ["Result", "OpReport", "Runner", "CHECKED", "FAILED"]

CHECKED = ("pass", "divergence", "unsound", "loose", "rule error")   # a comparison was made
FAILED = ("unsound", "loose", "rule error")


@dataclass
class Result:
    model: str          # the model's description (case and variant)
    graph: str          # "export" (fs.trace's graph) or "core ATen" (after run_decompositions)
    status: str
    detail: str = ""


@dataclass
class OpReport:
    """What the check found for one registered operator."""
    op: str
    results: list = field(default_factory=list)
    absent: list = field(default_factory=list)    # models whose graphs do not hold the operator
    reason: str | None = None                     # opinfo_hand.HAND's reason it cannot be checked
    source: str = ""                              # "opinfo", "hand" or ""

    def count(self, *statuses) -> int:
        return sum(r.status in statuses for r in self.results)

    @property
    def checked(self) -> int:
        return self.count(*CHECKED)

    @property
    def failures(self) -> list:
        return [r for r in self.results if r.status in FAILED]

    @property
    def divergences(self) -> list:
        return sorted({r.detail for r in self.results if r.status == "divergence"})

    def summary(self) -> str:
        """"12 pass, 1 divergence" / "unsound 1 of 3" / the reason / "no sample"."""
        if self.failures:
            kinds = sorted({r.status for r in self.failures})
            return f"{'/'.join(kinds)} {len(self.failures)} of {self.checked}"
        if self.checked:
            d = self.count("divergence")
            return f"{self.count('pass')} pass" + (f", {d} named divergence{'s' * (d > 1)}" if d else "")
        if self.reason:
            return f"not checkable: {self.reason}"
        other = sorted({r.status for r in self.results})
        if other:
            return "no check: " + ", ".join(other)
        return "no sample" + (f" ({len(self.absent)} samples emit other operators)" if self.absent else "")


class Runner:
    """Runs the check; graphs and results are cached per model, so that the overloads that one
    OpInfo's samples emit share the work. `per_op`: models credited to an operator before its
    search stops (None: every one); `samples_per_source`: samples taken from each OpInfo
    (None: all of them). `Runner.everything()` is the unbounded run."""

    def __init__(self, registry=REGISTRY, per_op: int | None = 2, samples_per_source: int | None = 4,
                 hand_first: bool | None = None):
        self.registry = registry
        # Bounded runs go to opinfo_hand.HAND first when it has an entry; full runs search
        # OpInfo too (and report what its samples emit).
        self.hand_first = per_op is not None if hand_first is None else hand_first
        self.per_op = per_op
        self.samples_per_source = samples_per_source
        self._models: dict = {}
        self._graphs: dict = {}
        self._results: dict = {}

    @classmethod
    def everything(cls, registry=REGISTRY) -> "Runner":
        return cls(registry, per_op=None, samples_per_source=None)

    def run(self, ops=None) -> list:
        """OpReports of `ops` (every registered operator by default), in registry order."""
        return [self.report(r.op) for r in self.registry] if ops is None else [self.report(op) for op in ops]

    # models and graphs ------------------------------------------------------------------
    def _source_models(self, info, fn, direct: bool = False) -> list:
        key = (info.name, info.variant_test_name, str(fn) if direct else getattr(fn, "__name__", id(fn)))
        if key not in self._models:
            call = fn
            if direct:
                call = _on_a_copy(fn) if fn._schema.arguments and fn._schema.arguments[0].alias_info is not None \
                    and fn._schema.arguments[0].alias_info.is_write else fn
            cases = opinfo_cases(info, call, self.samples_per_source)
            if direct:   # only the samples that fit the overload's schema
                cases = [c for c in cases if _runs(c)]
            self._models[key] = [m for case in cases for m in models(case)]
        return self._models[key]

    def _graph(self, model: Model, kind: str):
        key = (id(model), kind)
        if key not in self._graphs:
            self._graphs[key] = self._capture(model, kind)
        return self._graphs[key]

    def _capture(self, model: Model, kind: str):
        if kind == "core ATen":
            exported = self._graph(model, "export")
            return _decomposed(exported) if isinstance(exported, Traced) else exported
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return trace(model.module, model.inputs, model.features)
        except Exception as err:  # noqa: BLE001 - reported as "not captured"
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    # the check ------------------------------------------------------------------------
    def report(self, op) -> OpReport:
        rep = OpReport(str(op))
        hand = HAND.get(str(op))
        if self.hand_first and hand is not None:
            # The table's entry exists because OpInfo's samples do not reach the operator:
            # searching them again is the slow part of a bounded run.
            self._hand(op, hand, rep)
            return rep
        found = sources(op)
        cands = [m for info, fn in found for m in self._source_models(info, fn)]
        if cands:
            rep.source = "opinfo"
            self._credit(op, cands, rep)
        if not rep.checked and found:
            # The same samples, calling the overload itself: torch.export keeps an operator that
            # is called directly, where the Python function reached another overload.
            direct = [m for info, _ in found for m in self._source_models(info, op, direct=True)]
            if direct:
                rep.source = "opinfo (direct call)"
                self._credit(op, direct, rep)
        if not rep.checked and hand is not None:
            self._hand(op, hand, rep)
        return rep

    def _hand(self, op, hand, rep: OpReport) -> None:
        if isinstance(hand, str):
            rep.reason = hand
            return
        rep.source = "hand"
        key = ("hand", str(op))
        if key not in self._models:
            self._models[key] = [m for case in hand() for m in models(case)]
        self._credit(op, self._models[key], rep)

    def _credit(self, op, cands: list, rep: OpReport) -> None:
        for model in cands:
            if self.per_op is not None and rep.checked >= self.per_op:
                return
            res = None
            for kind in ("export", "core ATen"):
                traced = self._graph(model, kind)
                if isinstance(traced, str):
                    res = Result(repr(model), kind, "not captured", traced)
                    break
                if op in _ops(traced):
                    key = (id(model), kind)
                    if key not in self._results:
                        self._results[key] = Result(repr(model), kind, *check(traced, op, self.registry))
                    res = self._results[key]
                    break
            if res is None:
                rep.absent.append(repr(model))
            else:
                rep.results.append(res)


def _runs(case) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.fn(*case.args, **case.kwargs)
        return True
    except Exception:  # noqa: BLE001 - the sample does not fit this overload
        return False


def _ops(traced: Traced) -> set:
    return {n.target for n in traced.graph.nodes if n.op == "call_function"}


def _decomposed(traced: Traced):
    """The Traced of the same model decomposed to core ATen (a message if that fails)."""
    from torch.export.graph_signature import InputKind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = traced.program.run_decompositions()
    except Exception as err:  # noqa: BLE001
        return f"run_decompositions: {type(err).__name__}: {err}"
    kinds = {InputKind.USER_INPUT: "input", InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}
    placeholders, nodes = {}, []
    for spec in program.graph_signature.input_specs:
        kind = kinds.get(spec.kind, "constant")
        placeholders[spec.arg.name] = (kind, spec.arg.name if kind == "input" else (spec.target or spec.arg.name))
        if kind == "input":
            nodes.append(spec.arg.name)
    return Traced(model=traced.model, program=program, inputs=traced.inputs, input_names=traced.input_names,
                  input_nodes=nodes, descriptions=traced.descriptions, placeholders=placeholders,
                  aliases=traced.aliases, keywords=traced.keywords, config=traced.config, notes=list(traced.notes))


def check(traced: Traced, op, registry=REGISTRY) -> tuple[str, str]:
    """(status, detail) of the comparison on one graph that holds `op`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boolean = interaction_map(traced, keys=False, registry=registry)
    except RuleError as err:
        return "rule error", str(err).splitlines()[0]
    nodes = [n for n in traced.graph.nodes if n.target == op]
    declined = [why for name, o, why in fallbacks(traced.graph) if name in {n.name for n in nodes}]
    if declined:
        return "fallback", declined[0]
    if not any(n.op == "placeholder" and traced.placeholders.get(n.name, ("",))[0] == "input"
               for n in traced.graph.nodes):
        return "no derivative", "no floating operand to label"
    try:
        dep = gradient_dependence(traced, trials=4, seed=0)
        grad = gradient_interaction_map(traced, trials=4, seed=0)
    except Exception as err:  # noqa: BLE001 - reported: the witness cannot run here
        return "gradient map failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    results = nodes + [u for n in nodes for u in n.users if u.target is operator.getitem]
    if not any(n.name in dep.masks for n in results) and not any(_param_operand(n, traced) for n in nodes):
        return "no derivative", "the operator's result is not floating"
    unsound = _unsound(dep, grad, boolean, traced)
    if unsound:
        return "unsound", unsound
    loose = _loose(dep, grad, boolean, traced)
    if loose:
        # A branch the first points never took (an inactive ReLU, a max's winner) is taken
        # at more points: the "generic point" clause, not a divergence.
        dep = gradient_dependence(traced, trials=24, seed=1)
        grad = gradient_interaction_map(traced, trials=24, seed=1)
        unsound = _unsound(dep, grad, boolean, traced)
        if unsound:
            return "unsound", unsound
        loose = _loose(dep, grad, boolean, traced)
    if not loose:
        return "pass", ""
    by_name = {n.name: n for n in traced.graph.nodes}
    reasons = []
    for name, k, text in loose:
        if name is None:   # a parameter's meeting: any operator of the graph may explain it
            why = next((w for n in traced.graph.nodes if n.op == "call_function"
                        for w in [explains(n, None)] if w), None)
        else:
            why = _explained(by_name[name], k)
        if why is None:
            return "loose", text
        reasons.append(why)
    return "divergence", "; ".join(sorted(set(reasons)))


def _explained(node, k):
    """The named divergence of `node`'s output `k`, looking back through the getitem and view
    nodes that carry a result of a multi-output operator to the graph's output."""
    while True:
        why = explains(node, k)
        if why is not None or not hasattr(node, "target") or not node.args:
            return why
        if node.target is operator.getitem:
            node, k = node.args[0], node.args[1]
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return None
        node = node.args[0]


def _param_operand(node, traced) -> bool:
    return any(a.op == "placeholder" and traced.placeholders.get(a.name, ("",))[0] in ("parameter", "buffer")
               for a in node.all_input_nodes)


def _written(traced) -> set:
    """Nodes whose value an in-place operator later overwrites (its written operands, and the
    values those are views of). The boolean mapping records such a node's labels before the
    write; the gradient mapping reads the tensor after it: their dependences are not compared
    (the in-place node's own result is)."""
    out = set()
    for n in traced.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            value = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
            if arg.alias_info is None or not arg.alias_info.is_write or not hasattr(value, "op"):
                continue
            while hasattr(value, "op"):
                out.add(value.name)
                inner = getattr(value.target, "_schema", None)
                if value.op != "call_function" or inner is None or not inner.returns \
                        or inner.returns[0].alias_info is None or not value.args:
                    break
                value = value.args[0]
    return out


def _dependence_rows(dep, traced, pool, subset: bool) -> list:
    written = _written(traced)
    return [r for r in dependence_difference(dep, traced, pool, subset=subset) if r[0] not in written]


def _unsound(dep, grad, boolean, traced) -> str:
    rows = _dependence_rows(dep, traced, boolean.pool, subset=True)
    if rows:
        name, k, where, only_g, _ = rows[0]
        return f"%{name}{list(where)} depends on {sorted(map(str, only_g))} by autodiff, which the rules miss"
    diff = compare(grad, boolean, subset=True)
    return f"meeting: {str(diff).splitlines()[0]} (first: gradient, second: rules)" if diff else ""


def _loose(dep, grad, boolean, traced) -> list:
    """(node name or None, output index, description) of every place the rules add labels
    that autodiff does not see."""
    out = []
    for name, k, where, _, only_b in _dependence_rows(dep, traced, boolean.pool, subset=False):
        if only_b:
            out.append((name, k, f"%{name}{list(where)} (output {k}): the rules add "
                                 f"{sorted(map(str, only_b))[:6]} that autodiff never sees"))
    diff = compare(boolean, grad, subset=True)
    if diff:
        out.append((None, None, f"meeting: {str(diff).splitlines()[0]} (first: rules, second: gradient)"))
    return out
