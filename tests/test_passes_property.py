"""Property: every pass, on random architectures (`fxsurgery.testing`) and random requested
changes, either refuses with a clear error that names the node, parameter or input at fault,
or returns a module that runs on inputs of its new shapes, whose parameters have the shapes its
own trace reports, and which computes what the old model did (relative deviation <= 1e-5 on the
old positions of every output) whenever its plan says the function is preserved. It never
crashes with anything but those errors, and never modifies the old model. Where the plan claims
preservation, the outputs are also compared by the position the user sees, on inputs carried
over by feature and category name (`by_position`), so that an output whose columns moved fails
even where a comparison by label passes.

The changes: features added (at a random position) to, removed from, or reordered in a feature
input; categories added to an index input; a random hidden axis widened or pruned; an identity
layer inserted after a random Linear; heads added to a random attention. Which change applies is
drawn from what the model has.

`test_the_property_has_teeth` plants a bug (the plan is made but the weights are not carried
over) and shows the property fails on it. Examples: FXSURGERY_PASS_EXAMPLES (default 40).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxsurgery as fs
from fxsurgery.passes import PassError, SizingError
from fxsurgery.testing import architectures, build

TOL = 1e-5
EXAMPLES = int(os.environ.get("FXSURGERY_PASS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KINDS = ("add_features", "remove_features", "reorder_features", "add_categories", "widen", "prune_units",
         "insert_identity_layer", "add_heads")


@st.composite
def requests(draw):
    spec = draw(architectures(max_layers=3, max_width=6))
    return spec, draw(st.integers(0, len(KINDS) - 1)), draw(st.integers(0, 2**16)), draw(st.integers(1, 3))


def _applicable(tr) -> list[str]:
    """The kinds of change this model offers (an input of the right kind, a hidden axis)."""
    kinds = []
    descs = tr.descriptions.values()
    if any(isinstance(d, fs.Features) for d in descs):
        kinds += ["add_features", "reorder_features"]
        if any(isinstance(d, fs.Features) and len(d.names) > 1 for d in descs):
            kinds.append("remove_features")
    if any(isinstance(d, fs.Categories) for d in descs):
        kinds.append("add_categories")
    if fs.passes.unit_groups(tr):
        kinds += ["widen", "prune_units"]
    if any(isinstance(m, torch.nn.Linear) for m in tr.model.modules()):
        kinds.append("insert_identity_layer")
    if _attentions(tr):
        kinds.append("add_heads")
    return kinds


def _attentions(tr) -> list[str]:
    """Module paths of the fused attentions (sdpa and MultiheadAttention layers)."""
    out = []
    for n in tr.graph.nodes:
        if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target):
            out.append(list((n.meta.get("nn_module_stack") or {}).values())[-1][0])
    return sorted(set(out))


def _apply(kind: str, tr, r: int, k: int):
    """Runs pass `kind` with choices made from r and k; None when the model offers nothing
    for that kind (no such input, no hidden axis)."""
    feats = [n for n, d in tr.descriptions.items() if isinstance(d, fs.Features)]
    cats = [n for n, d in tr.descriptions.items() if isinstance(d, fs.Categories)]
    if kind in ("add_features", "remove_features", "reorder_features"):
        if not feats:
            return None
        name = feats[r % len(feats)]
        names = list(tr.descriptions[name].names)
        if kind == "add_features":
            return fs.passes.add_features(tr, name, [f"new{i}" for i in range(k)], at=r % (len(names) + 1))
        if kind == "remove_features":
            if len(names) < 2:
                return None
            return fs.passes.remove_features(tr, name, [names[r % len(names)]])
        order = names[r % len(names):] + names[:r % len(names)]
        return fs.passes.reorder_features(tr, name, order[::-1] if k % 2 else order)
    if kind == "add_categories":
        if not cats:
            return None
        return fs.passes.add_categories(tr, cats[r % len(cats)], [f"new{i}" for i in range(k)])
    if kind == "add_heads":
        paths = _attentions(tr)
        return fs.passes.add_heads(tr, paths[r % len(paths)], k)
    groups = sorted(fs.passes.unit_groups(tr).items())
    if kind == "insert_identity_layer":
        linears = [n for n, m in tr.model.named_modules() if isinstance(m, torch.nn.Linear)]
        return fs.passes.insert_identity_layer(tr, linears[r % len(linears)]) if linears else None
    if not groups:
        return None
    group, n = groups[r % len(groups)]
    if kind == "widen":
        return fs.passes.widen(tr, group, by=k)
    keep = sorted({(r * (i + 3)) % n for i in range(max(1, n - k))})
    return fs.passes.prune_units(tr, group, keep)


def check(spec, which, r, k, outcomes: Counter, dynamic: bool = False) -> None:
    model, inputs, features = build(spec, seed=0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = fs.trace(model, inputs, features, dynamic=dynamic)
        kinds = _applicable(tr)
        kind = kinds[(which + r) % len(kinds)]   # r spreads the draws over what applies
        try:
            gm = _apply(kind, tr, r, k)
        except (PassError, SizingError) as err:
            # A refusal must say where: a node, a parameter, an input or a module by name.
            assert any(w in str(err) for w in ("node %", "parameter ", "input ", "module ", "'")), str(err)
            outcomes[f"{kind}: refused ({str(err).split(':')[0][:40]})"] += 1
            return
        finally:
            assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()), "the old model changed"
        if gm is None:
            outcomes[f"{kind}: not applicable"] += 1
            return
        meta = gm.meta["fxsurgery"]
        p = meta["plan"]
        new_inputs = meta["inputs"]
        out = gm(*[new_inputs[n] for n in tr.input_names])
        assert out is not None
        shapes = meta["traced"].state_shapes()
        for name, t in gm.state_dict().items():
            if name in shapes:
                assert tuple(t.shape) == shapes[name], name
        v = fs.verify(p)
        if p.preserves_function:
            assert v.max <= TOL, f"{kind}: plan claims preservation, deviation {v.max:.3g}\n{p.table()}\n{v}"
            by_position(tr, gm, new_inputs, kind, p)
            outcomes[f"{kind}: preserved"] += 1
            if dynamic:
                outcomes[f"sizes {at_other_sizes(tr, gm, new_inputs, kind, p)}"] += 1
        else:
            outcomes[f"{kind}: issues {sorted({i.kind for i in p.issues})}"] += 1


def _carried_inputs(tr, new_descriptions, new_inputs, g: torch.Generator) -> tuple[list, list]:
    """Random old inputs and the new inputs that hold the same values under the same names: a
    feature keeps its value wherever the change moved it, a new feature gets a random one, an
    index input keeps its category names. Built from the input descriptions alone, not from the
    plan, so that the comparison below is independent of what the planner matched."""
    olds, news = [], []
    for name, old_example in zip(tr.input_names, tr.inputs):
        new_example = new_inputs[name]
        old_desc, new_desc = tr.descriptions.get(name), new_descriptions.get(name)
        if old_example.is_floating_point():
            old = torch.randn(old_example.shape, generator=g, dtype=old_example.dtype)
        else:
            high = len(old_desc) if isinstance(old_desc, fs.Categories) else int(old_example.max()) + 1
            old = torch.randint(0, max(high, 1), old_example.shape, generator=g)
        if isinstance(old_desc, fs.Features) and isinstance(new_desc, fs.Features):
            dim = old_desc.dim % old.dim()
            new = torch.randn(new_example.shape, generator=g, dtype=new_example.dtype)
            where = {n: i for i, n in enumerate(old_desc.names)}
            for j, n in enumerate(new_desc.names):
                if n in where:
                    new.select(dim, j).copy_(old.select(dim, where[n]))
        elif isinstance(old_desc, fs.Categories) and isinstance(new_desc, fs.Categories):
            index = {n: i for i, n in enumerate(new_desc.names)}
            new = torch.tensor([index[n] for n in old_desc.names])[old]
        else:
            assert tuple(new_example.shape) == tuple(old_example.shape), name
            new = old
        olds.append(old)
        news.append(new)
    return olds, news


def _record(gm, key):
    rec = gm.meta["fxsurgery"]
    return rec[key] if isinstance(rec, dict) else getattr(rec, key)


def by_position(tr, gm, new_inputs, kind, p) -> None:
    """Where the plan claims preservation, every output position the user sees (same output,
    same index) computes what it did, on inputs carried over by name: an output whose columns
    moved fails here even where a comparison by label would pass."""
    g = torch.Generator().manual_seed(1)
    olds, news = _carried_inputs(tr, _record(gm, "features"), new_inputs, g)
    with torch.no_grad():
        old_out = torch.utils._pytree.tree_leaves(tr.call(tr.model, olds))
        new_out = torch.utils._pytree.tree_leaves(gm(*news))
    assert len(old_out) == len(new_out), f"{kind}: the number of outputs changed"
    for i, (a, b) in enumerate(zip(old_out, new_out)):
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape:
            # Gaining positions is reported as a new output, which preservation allows; the old
            # positions are then compared by label above.
            assert any(x.kind == "new output" for x in p.issues), \
                f"{kind}: output {i} changed shape {tuple(a.shape)} -> {tuple(b.shape)} unreported\n{p.table()}"
            continue
        dev = float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) if a.numel() else 0.0
        assert dev <= TOL, f"{kind}: plan claims preservation, output {i} moved by position: {dev:.3g}\n{p.table()}"


def at_other_sizes(tr, gm, new_inputs, kind, p) -> str:
    """Where a pass on a capture with free sizes says its sizes are free, the module computes
    what the old model did at other sizes too: every free axis one position longer, on inputs
    carried over by name as in `by_position`. Returns "free", "fixed" or "none free"."""
    from fxsurgery.passes.free_sizes import _resized
    if not _record(gm, "sizes").startswith("free"):
        return "fixed"
    g = torch.Generator().manual_seed(2)
    olds, news = _carried_inputs(tr, _record(gm, "features"), new_inputs, g)
    # A size is grown where old and new inputs agree along all its axes (not a changed one).
    grow = {ka: 1 for axes in tr.sizes.axes.values()
            if all(olds[k].shape[a] == news[k].shape[a] for k, a in axes) for ka in axes}
    if not grow:
        return "none free"
    olds, news = _resized(olds, grow), _resized(news, grow)
    with torch.no_grad():
        try:
            old_out = torch.utils._pytree.tree_leaves(tr.call(tr.model, olds))
        except Exception:  # noqa: BLE001 - the old model does not run there: nothing to compare
            return "old model fails"
        try:
            new_out = torch.utils._pytree.tree_leaves(gm(*news))
        except Exception as err:  # noqa: BLE001 - the claim is what fails
            raise AssertionError(f"{kind}: sizes claimed free ({_record(gm, 'sizes')}), but the module fails "
                                 f"with {sorted(grow)} grown: {type(err).__name__}: {err}") from err
    for i, (a, b) in enumerate(zip(old_out, new_out)):
        if isinstance(a, torch.Tensor) and a.shape == b.shape and a.numel():
            dev = float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
            assert dev <= TOL, f"{kind}: output {i} at grown sizes {sorted(grow)} deviates by {dev:.3g}"
    return "free"


def run_property(outcomes: Counter, dynamic: bool = False, examples: int = EXAMPLES):
    @settings(SETTINGS, max_examples=examples)
    @given(requests())
    def prop(req):
        check(*req, outcomes, dynamic=dynamic)
    prop()


def test_passes_on_random_architectures_refuse_clearly_or_preserve_the_function():
    outcomes = Counter()
    run_property(outcomes)
    print(dict(outcomes))
    preserved = sum(n for o, n in outcomes.items() if o.endswith("preserved"))
    # Not vacuous: most drawn changes apply and preserve the function.
    assert preserved >= EXAMPLES // 3, dict(outcomes)


def test_the_property_has_teeth(monkeypatch):
    """A planted bug: the plan is made but never applied (the new model keeps its fresh
    values). The property must fail."""
    import fxsurgery.surgery.planning as planning
    monkeypatch.setattr(planning.SurgeryPlan, "apply", lambda self, progress=None: self.new.model)
    with pytest.raises(AssertionError, match="plan claims preservation"):
        run_property(Counter())


FREE_EXAMPLES = int(os.environ.get("FXSURGERY_FREE_SIZE_EXAMPLES", "0"))


@pytest.mark.skipif(not FREE_EXAMPLES, reason="opt-in (FXSURGERY_FREE_SIZE_EXAMPLES=20: about 10 minutes); "
                    "open defect: it failed on add_categories, see the README's limits")
def test_passes_on_free_size_captures_run_like_the_old_model_at_other_sizes():
    """The same property on `fs.trace(..., dynamic=True)`; where the module's sizes are free, it
    also computes what the old model did with every free axis grown (`at_other_sizes`)."""
    outcomes = Counter()
    run_property(outcomes, dynamic=True, examples=FREE_EXAMPLES)
    print(dict(outcomes))
    assert outcomes["sizes free"] >= max(FREE_EXAMPLES // 4, 1), dict(outcomes)   # not vacuous


@pytest.mark.skipif(not FREE_EXAMPLES, reason="opt-in, with the property above")
def test_the_free_size_property_has_teeth(monkeypatch):
    """A planted bug: the size expressions written as their example values, and the pass's own
    check at grown sizes skipped. The property must fail."""
    from fxsurgery.passes import free_sizes as F
    real = F._emit
    monkeypatch.setattr(F, "_run_at", lambda gm, traced, args: None)
    monkeypatch.setattr(F, "_emit", lambda graph, expr, sizes: real(graph, expr, sizes) if expr.is_Integer
                        else int(expr.xreplace({sym: 2 for sym in expr.free_symbols})))
    with pytest.raises(AssertionError, match="claimed free|at grown sizes"):
        run_property(Counter(), dynamic=True, examples=FREE_EXAMPLES)
