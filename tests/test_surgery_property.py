"""Surgery as a property: random architectures (fxsurgery.testing), a random change of the kind
surgery exists for, then plan, apply, verify.

The changes: features added to a features input (at random positions), a feature removed, the
features of an input reordered, categories added to a categories input, a Linear (or GRU, LSTM)
layer widened.
The old model is `build(spec, seed=0)`, the new one `build(changed spec, seed=1)`, so that every
new parameter starts out different from the old one; the new model's Features are relabelled so
that old features keep their old names (`features_of` names feature j of input x `x.j`; the new
ones are `x.new0`, `x.new1`, ...; categories likewise).

Every test checks two properties:

- elements (`check_elements`): for every element of every new parameter and buffer, computed
  element by element from the keys of the two interaction maps, independently of the plan's
  block-wise bookkeeping: an element that meets a new label is not copied and is zero (new
  categories: zero, the new model's value or the mean, as asked); an element the plan copies
  comes from an old element with the *same key* and is bit-identical to it, and no old element
  is copied twice; an element whose key the old parameter has is copied (not missed); any other
  element keeps the new model's value; and every element it does not copy meets or is aligned
  with a new label (a new feature column, a new unit), and every old element whose labels all
  survive is copied somewhere (parameters the plan re-initialises, with a warning, keep the new
  model's values throughout). A planner that copies the wrong element, copies into a new
  column, forgets to zero it, or loses an old element without a word fails it.
- function (`check_function`): `fs.verify` (old and new model on the same random inputs, old
  positions of the outputs) deviates by at most 1e-5 relative wherever the plan says the
  function is preserved (`plan.preserves_function`), and the plan lists exactly the issues the
  change calls for (none for added, reordered or zero-weighted removed features and for added
  categories; "removed input" for a removed feature with non-zero weights; for a widened layer
  the normalisations, softmaxes and attentions that the new units reach, "new output" when they
  reach an output, and "moved output" when that output flattens several tokens, whose later
  positions shift). A plan that claims preservation and is wrong, or stays silent about a
  normalisation over the widened axis, fails it.

`test_the_properties_have_teeth` plants bugs in the planner (new columns not zeroed, two copied
columns swapped) and shows that each property catches each of them.

Known gaps, excluded from the random cases (the planner reports them as "unmatched" elements and
does not claim to preserve the function there, but does not carry them over exactly;
`test_known_gaps_weights_shared_across_roles_are_reported`):
- inputs whose features are zero-padded straight into the stream (`InputSpec(raw=True)`) are
  never the input changed: a stream channel is then a feature of one token and a hidden unit of
  another (the plan reports it, but cannot copy the columns by role);
- no layer is widened in front of a layer that shares one weight between the widened axis' old
  and new positions (a Linear across tokens, a Conv2d along the channels: `SHARED`) or regroups
  it (a grouped Conv1d).

Examples per property: FXSURGERY_SURGERY_EXAMPLES (default 40: the file in under a minute).
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxsurgery as fs
from fxsurgery.testing import ArchSpec, InputSpec, LayerSpec, architectures, build, features_of

TOL = 1e-5
EXAMPLES = int(os.environ.get("FXSURGERY_SURGERY_EXAMPLES", "40"))
MAX_LAYERS, MAX_WIDTH = 3, 6

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# cases ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """An old spec, the changed spec and the new model's input labels (input -> names)."""
    what: str
    old: ArchSpec
    new: ArchSpec
    labels: tuple                       # ((input name, (label names...)), ...) for the new model
    new_categories: str = "zero"
    zero_column: tuple | None = None    # (input index, feature index) zeroed in the old model
    issues: frozenset = frozenset()     # the issue kinds the plan must report
    widened: tuple | None = None        # (layer index, old width, new width), for the report

    def new_features(self) -> dict:
        out = features_of(self.new)
        for name, names in self.labels:
            out[name] = type(out[name])(list(names))
        return out


def _target(draw, spec: ArchSpec, kind: str, min_n: int) -> tuple[ArchSpec, int]:
    """An input to change: an existing one that fits, or a fresh one inserted at a random place
    (so that every drawn architecture can be used; the other inputs stay as drawn)."""
    fits = [i for i, s in enumerate(spec.inputs) if s.kind == kind and not s.raw and s.n >= min_n]
    if fits and draw(st.booleans()):
        return spec, draw(st.sampled_from(fits))
    if kind == "features":
        s = InputSpec("obs", n=draw(st.integers(max(min_n, 1), 6)), entities=draw(st.integers(0, 3)))
    else:
        s = InputSpec("tok", "categories", n=draw(st.integers(2, 6)), length=draw(st.integers(0, 3)))
    pos = draw(st.integers(0, len(spec.inputs)))
    return replace(spec, inputs=spec.inputs[:pos] + (s,) + spec.inputs[pos:]), pos


def _with_input(spec: ArchSpec, i: int, **changes) -> ArchSpec:
    inputs = list(spec.inputs)
    inputs[i] = replace(inputs[i], **changes)
    return replace(spec, inputs=tuple(inputs))


def _old_names(spec: ArchSpec, i: int) -> list[str]:
    return list(features_of(spec)[spec.inputs[i].name].names)


def _insert_new(draw, names: list[str], prefix: str) -> list[str]:
    out = list(names)
    for j in range(draw(st.integers(1, 3))):
        out.insert(draw(st.integers(0, len(out))), f"{prefix}.new{j}")
    return out


@st.composite
def added_features(draw) -> Case:
    spec, i = _target(draw, draw(architectures(MAX_LAYERS, MAX_WIDTH)), "features", 1)
    s = spec.inputs[i]
    names = _insert_new(draw, _old_names(spec, i), s.name)
    return Case("add features", spec, _with_input(spec, i, n=len(names)), ((s.name, tuple(names)),))


@st.composite
def removed_feature(draw) -> Case:
    spec, i = _target(draw, draw(architectures(MAX_LAYERS, MAX_WIDTH)), "features", 2)
    s = spec.inputs[i]
    names = _old_names(spec, i)
    r = draw(st.integers(0, len(names) - 1))
    zero = draw(st.booleans())
    kept = tuple(n for j, n in enumerate(names) if j != r)
    return Case("remove a feature", spec, _with_input(spec, i, n=len(kept)), ((s.name, kept),),
                zero_column=(i, r) if zero else None,
                issues=frozenset() if zero else frozenset({"removed input"}))


@st.composite
def reordered_features(draw) -> Case:
    spec, i = _target(draw, draw(architectures(MAX_LAYERS, MAX_WIDTH)), "features", 2)
    names = _old_names(spec, i)
    order = draw(st.permutations(names))
    if list(order) == names:
        order = names[::-1]
    return Case("reorder features", spec, spec, ((spec.inputs[i].name, tuple(order)),))


@st.composite
def added_categories(draw) -> Case:
    spec, i = _target(draw, draw(architectures(MAX_LAYERS, MAX_WIDTH)), "categories", 2)
    s = spec.inputs[i]
    names = _insert_new(draw, _old_names(spec, i), s.name)
    how = draw(st.sampled_from(("zero", "mean", "keep")))
    return Case("add categories", spec, _with_input(spec, i, n=len(names)), ((s.name, tuple(names)),),
                new_categories=how)


# Layers that share one weight between the widened axis' old and new positions (a Linear across
# tokens applied to every channel, a Conv2d sliding along the channels) or regroup it (a grouped
# Conv1d): reported as "unmatched", not carried over exactly
# (test_known_gaps_weights_shared_across_roles_are_reported).
SHARED = ("mix_tokens", "conv2d")
WIDENED = ("linear", "gru", "lstm")   # the layers widened (a Linear is inserted when there is none)


def _widen(spec: ArchSpec, j: int, k: int):
    """spec with layer j (a Linear, GRU or LSTM) k units wider, the layers after it adapted to
    the wider stream until one sets its own width; and the issue kinds the new units must raise.
    None when a later layer cannot take the wider stream (heads or groups that do not divide it)
    or is a known gap."""
    c = _channels(spec.width, spec.layers[:j])
    old_w = spec.layers[j].width or c
    layers = list(spec.layers)
    layers[j] = LayerSpec(spec.layers[j].kind, width=old_w + k)
    old_c, new_c = old_w, old_w + k
    issues = set()
    for n, layer in enumerate(spec.layers[j + 1:], start=j + 1):
        kind = layer.kind
        if kind in ("linear", "gru", "lstm", "flatten", "conv1d") and layer.width:
            if kind == "conv1d" and layer.groups > 1:
                return None
            old_c = new_c = None     # a width of its own: the new units end here
            break
        if kind in SHARED or kind == "conv1d" and layer.groups > 1:
            return None              # known gaps: see test_known_gaps_weights_shared_across_roles_are_reported
        elif kind == "groupnorm":
            if new_c % layer.groups or new_c // layer.groups < 3:
                return None
            issues.add("normalisation")
        elif kind in ("sdpa", "mha"):
            if new_c % layer.heads:
                return None
            issues.add("attention")
        elif kind == "split":
            layers[n] = replace(layer, sizes=layer.sizes[:-1] + (layer.sizes[-1] + new_c - old_c,))
        elif kind == "layernorm":
            issues.add("normalisation")
        elif kind in ("softmax", "log_softmax"):
            issues.add("softmax")
    if new_c is not None:
        issues.add("new output")
        if "flat" in spec.outputs and _out_tokens(spec) > 1:
            issues.add("moved output")   # (tokens x channels) flattened: wider rows shift the later tokens
    return replace(spec, layers=tuple(layers)), frozenset(issues), (j, old_w, old_w + k)


def _out_tokens(spec) -> int:
    t = sum(i.tokens for i in spec.inputs)
    for layer in spec.layers:
        if layer.kind == "flatten" or layer.kind in ("meanpool", "maxpool") and not layer.residual:
            t = 1
    return t


@st.composite
def widened_linear(draw) -> Case:
    spec = draw(architectures(MAX_LAYERS, MAX_WIDTH))
    layers = spec.layers
    widenable = [j for j, l in enumerate(layers) if l.kind in WIDENED and not l.residual]
    if widenable and draw(st.booleans()):
        j = draw(st.sampled_from(widenable))
    else:  # a Linear keeping the width, inserted at a random place
        j = draw(st.integers(0, len(layers)))
        layers = layers[:j] + (LayerSpec("linear"),) + layers[j:]
    if draw(st.integers(0, 2)):
        # Two times in three, a Linear with a width of its own somewhere after it (as wide as
        # the stream there, so that the layers after it fit as drawn): the new units end there
        # and the outputs keep their shape.
        at = draw(st.integers(j + 1, len(layers)))
        layers = layers[:at] + (LayerSpec("linear", width=_channels(spec.width, layers[:at])),) + layers[at:]
    spec = replace(spec, layers=layers)
    options = [w for w in (_widen(spec, j, k) for k in range(1, 5)) if w is not None]
    assume(options)
    new, issues, widened = draw(st.sampled_from(options))
    return Case(f"widen a {spec.layers[j].kind} layer", spec, new, (), issues=issues, widened=widened)


def _channels(width: int, layers) -> int:
    for layer in layers:
        width = layer.width or width
    return width


# running a case --------------------------------------------------------------------------------

def transplant(case: Case):
    """Builds both models, plans, applies. Returns the plan, the new model's state before apply
    and the SurgeryWarnings the planner gave."""
    old = build(case.old, seed=0)
    new = build(case.new, seed=1)
    if case.zero_column is not None:
        i, r = case.zero_column
        with torch.no_grad():
            old.model.encoders[i].linear.weight[:, r] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fs.SurgeryWarning)
        p = fs.plan(fs.trace(old.model, old.example_inputs, old.features),
                    fs.trace(new.model, new.example_inputs, case.new_features()),
                    new_categories=case.new_categories)
    said = [str(w.message) for w in caught if issubclass(w.category, fs.SurgeryWarning)]
    before = {k: v.clone() for k, v in new.model.state_dict().items()}
    p.apply()
    return p, before, said


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype]) if t.dtype in _BITS else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def element_keys(p, side: str, name: str) -> list[tuple[frozenset, frozenset]]:
    """(labels met, units aligned with) of every element, row-major, as the plan's label tokens
    (equal labels of the old and new model are equal tokens; units through splits and unit maps)."""
    imap = p.old_map if side == "old" else p.new_map
    e = imap.entries[name]
    meets = e.key_meets.dense(imap.pool).reshape(-1).tolist()
    aligned = e.key_aligned.dense(imap.pool).reshape(-1).tolist()
    return [(p.space.tokens(side, m), p.space.tokens(side, a)) for m, a in zip(meets, aligned)]


def _unravel(flat: torch.Tensor, shape) -> list[torch.Tensor]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat = flat // size
    return out[::-1]


def _ravel(coords, shape) -> torch.Tensor:
    flat = torch.zeros_like(coords[0]) if coords else torch.zeros(1, dtype=torch.int64)
    for c, size in zip(coords, shape):
        flat = flat * size + c
    return flat


def plan_sources(m) -> torch.Tensor:
    """The old flat index the plan copies each new element from (row-major), or -1."""
    n = math.prod(m.new_shape)
    if not m.copy or m.old_shape is None or m.unexplained:
        return torch.full((n,), -1, dtype=torch.int64)
    if not m.blocks:
        return torch.arange(n) if m.old_shape == m.new_shape else torch.full((n,), -1, dtype=torch.int64)
    coords = _unravel(torch.arange(n), m.new_shape)
    old_coords = [None] * len(m.new_shape)
    valid = torch.ones(n, dtype=torch.bool)
    for b in m.blocks:
        src = b.index.index_select(0, _ravel([coords[a] for a in b.axes], b.new_shape))
        valid &= src >= 0
        for a, c in zip(b.axes, _unravel(src.clamp(min=0), b.old_shape)):
            old_coords[a] = c
    return torch.where(valid, _ravel(old_coords, m.old_shape), torch.full((n,), -1, dtype=torch.int64))


def check_elements(p, before: dict) -> int:
    """The elements property (module docstring). Returns the number of elements checked."""
    old_sd, new_sd = p.old.model.state_dict(), p.new.model.state_dict()
    new_only, removed, categories = p.space.new_only, p.space.removed, p.space.categories
    checked = 0
    for name, pp in p.params.items():
        got, init = new_sd[name].reshape(-1), before[name].reshape(-1)
        if not pp.in_graph:  # state the graph does not read: by name and shape
            want = old_sd[pp.old_name] if pp.old_name is not None else before[name]
            assert _same(new_sd[name], want), f"{name} (not read by the graph) should be {pp.status}"
            continue
        if pp.match.unexplained:  # re-initialised (and said so): the new model's own values
            assert _same(new_sd[name], before[name]), f"{name} is re-initialised and should keep its values"
            continue
        new_keys = element_keys(p, "new", name)
        src = plan_sources(pp.match).tolist()
        has_old = pp.old_name is not None
        old_keys = element_keys(p, "old", pp.old_name) if has_old else []
        old_count = Counter(old_keys)
        old_val = old_sd[pp.old_name].reshape(-1) if has_old else None
        used: set[int] = set()
        for i, key in enumerate(new_keys):
            meets, aligned = key
            new_met = meets & new_only
            s = src[i]
            where = f"{name}[{i}] (meets {sorted(map(str, map(p.space.label, meets)))})"
            if new_met:
                assert s < 0, f"{where} meets a new label but is copied from old element {s}"
                how = p.new_categories if new_met <= categories else "zero"
                if how == "zero":
                    assert got[i] == 0, f"{where} meets a new label but is {float(got[i])}, not zero"
                elif how == "keep":
                    assert _same(got[i], init[i]), f"{where} is a new category and should keep its value"
            elif s >= 0:
                assert has_old and old_keys[s] == key, f"{where} is copied from an old element with another key"
                assert _same(got[i], old_val[s]), f"{where} differs from the old element {s} it is copied from"
                assert s not in used, f"old element {s} of {pp.old_name} is copied twice"
                used.add(s)
            else:
                assert _same(got[i], init[i]), f"{where} is not copied and should keep the new model's value"
                assert key not in old_count, f"{where} has a key the old {pp.old_name} has, but is not copied"
                assert aligned & new_only, f"{where}: not copied, yet meets and is aligned with no new label"
            checked += 1
        for j, (meets, aligned) in enumerate(old_keys):
            assert j in used or (meets | aligned) & removed, (
                f"old {pp.old_name}[{j}] has no removed label but is not copied anywhere")
    return checked


def check_function(p, case: Case, said: list[str]):
    """The function property (module docstring)."""
    kinds = {i.kind for i in p.issues}
    assert kinds == set(case.issues), f"issues {[str(i) for i in p.issues]}, expected kinds {sorted(case.issues)}"
    unexplained = {n for n, q in p.params.items() if q.match.unexplained}
    if unexplained:  # re-initialised: said by a warning, and not "preserved"
        assert not p.preserves_function
        assert {n for n in unexplained if not any(f"re-initialising {n}:" in w for w in said)} == set()
    v = fs.verify(p)
    if p.preserves_function or (kinds <= {"new output", "moved output", "removed input"} and not unexplained):
        # "new output": old positions compared; "moved output": compared by label; "removed input":
        # verify feeds the old model zero there
        assert v.max <= TOL, f"{case.what}: the new model deviates by {v.max:.3g}:\n{v}"
    return v


def run(case: Case):
    try:
        p, before, said = transplant(case)
    except ValueError as err:  # a changed spec whose layers do not fit (not expected: _widen checks)
        raise AssertionError(f"cannot build the changed model: {err}") from err
    check_elements(p, before)
    check_function(p, case, said)
    return p


# the properties --------------------------------------------------------------------------------

@SETTINGS
@given(added_features())
def test_adding_features_preserves_the_function(case):
    """k new features at random positions of a Linear-encoded input: old columns copied, new
    columns zero, everything else copied unchanged, no issue, deviation <= 1e-5."""
    p = run(case)
    assert p.preserves_function and p.new_labels


@SETTINGS
@given(removed_feature())
def test_removing_a_feature_drops_its_column_and_says_so_when_it_was_not_zero(case):
    """One feature removed: its column dropped, the rest copied; the plan reports the removed
    input exactly when the old column was non-zero; the new model computes what the old one did
    with that feature at zero (what verify feeds it)."""
    p = run(case)
    assert p.removed_labels and not p.new_labels
    assert p.preserves_function == (case.zero_column is not None)


@SETTINGS
@given(reordered_features())
def test_reordering_features_permutes_columns(case):
    """The features of one input permuted: every element copied (the encoder's columns
    permuted), nothing zeroed or dropped, deviation <= 1e-5."""
    p = run(case)
    assert p.preserves_function and not p.new_labels and not p.removed_labels
    assert all(q.match.n_copied() == math.prod(q.match.new_shape) for q in p.params.values() if q.in_graph)


@SETTINGS
@given(added_categories())
def test_adding_categories_preserves_the_function(case):
    """k new categories at random positions: old embedding rows copied, new rows zero, the mean
    of the old rows or kept (new_categories), deviation <= 1e-5 on the old categories."""
    p = run(case)
    assert p.preserves_function
    i = next(k for k, s in enumerate(case.old.inputs) if s.name == case.labels[0][0])
    names = list(case.labels[0][1])
    new_rows = [r for r, n in enumerate(names) if ".new" in n]
    emb = p.new.model.encoders[i].embedding.weight
    if case.new_categories == "mean":
        mean = p.old.model.encoders[i].embedding.weight.mean(0, keepdim=True)
        torch.testing.assert_close(emb[new_rows], mean.expand(len(new_rows), -1), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(widened_linear())
def test_widening_a_linear_layer_zeroes_outgoing_weights_and_reports_what_cannot_be_preserved(case):
    """A Linear (GRU, LSTM) k units wider: old units copied, the new units' incoming weights
    keep their values and their outgoing weights are zero; the plan reports the normalisations, softmaxes
    and attentions over the widened axis and the outputs that gain positions, and nothing else;
    without those, deviation <= 1e-5."""
    p = run(case)
    unexplained = any(q.match.unexplained for q in p.params.values())
    assert p.preserves_function == (not (case.issues - {"new output"}) and not unexplained)
    assert any(l.kind == "unit" for l in p.new_labels)


# teeth ------------------------------------------------------------------------------------------

TEETH = Case(
    "add features",
    ArchSpec(inputs=(InputSpec("x0", n=3), InputSpec("c0", "categories", n=3)), width=4,
             layers=(LayerSpec("linear"), LayerSpec("tanh"), LayerSpec("linear", width=3))),
    ArchSpec(inputs=(InputSpec("x0", n=5), InputSpec("c0", "categories", n=3)), width=4,
             layers=(LayerSpec("linear"), LayerSpec("tanh"), LayerSpec("linear", width=3))),
    (("x0", ("x0.0", "x0.new0", "x0.1", "x0.2", "x0.new1")),))


def test_the_properties_have_teeth(monkeypatch):
    """The same change, correct and with two planted bugs: new feature columns that are not
    zeroed (the planner's zeroing switched off), and two copied columns swapped. Each is caught
    by the elements property, and the first also by the function property on its own."""
    import fxsurgery.surgery.apply as apply_module

    run(TEETH)  # the honest planner passes

    with monkeypatch.context() as m:
        m.setattr(apply_module, "_zero_positions",
                  lambda match, how: [torch.zeros_like(b.zero) for b in match.blocks])
        p, before, said = transplant(TEETH)
        with pytest.raises(AssertionError, match="meets a new label but is"):
            check_elements(p, before)
        with pytest.raises(AssertionError, match="deviates by"):
            check_function(p, TEETH, said)

    def swap(t: torch.Tensor, match) -> torch.Tensor:
        if t.dim() == 2 and t.shape[1] >= 3 and not match.identity:
            t[:, [0, 2]] = t[:, [2, 0]]
        return t

    real_build = apply_module.build

    def swapping_build(match, old, new, new_categories="zero"):   # apply builds every value it writes
        return swap(real_build(match, old, new, new_categories).clone(), match)

    with monkeypatch.context() as m:
        m.setattr("fxsurgery.surgery.planning.build", swapping_build)
        p, before, said = transplant(TEETH)
        with pytest.raises(AssertionError, match="differs from the old element"):
            check_elements(p, before)
        with pytest.raises(AssertionError, match="deviates by"):
            check_function(p, TEETH, said)


# known gaps (bugs) -------------------------------------------------------------------------------

def _silent_and_wrong(case: Case) -> None:
    """What a correct planner satisfies and these cases do not: either the plan reports an issue
    beyond "the outputs gain positions" (or a shape change it cannot explain), or the new model
    computes what the old one did on the old positions."""
    p, _, _ = transplant(case)
    v = fs.verify(p)
    reported = {i.kind for i in p.issues} - {"new output"} or any(q.match.unexplained for q in p.params.values())
    assert reported or v.max <= TOL, (f"{case.what}: {p!r}, issues {[str(i) for i in p.issues]}, "
                                      f"preserves_function={p.preserves_function}, yet deviation {v.max:.3g}")


RAW = ArchSpec(inputs=(InputSpec("x0", n=3, raw=True), InputSpec("x1", n=2)), width=5,
               layers=(LayerSpec("linear"), LayerSpec("tanh")))
RAW4 = replace(RAW, inputs=(InputSpec("x0", n=4, raw=True), InputSpec("x1", n=2)))


def _widened(layers, width=4, inputs=(InputSpec("x0", n=3, entities=3),), k=2) -> Case:
    old = ArchSpec(inputs=inputs, width=width, layers=(LayerSpec("linear"),) + layers)
    new = replace(old, layers=(LayerSpec("linear", width=width + k),) + layers)
    return Case(f"widen a linear layer before {[l.kind for l in layers]}", old, new, ())


KNOWN_GAPS = {
    # x0 is zero-padded into the stream: channel j is feature x0.j for x0's token and unit j of
    # x1's encoder for x1's token, and layers.0.weight[:, j] serves both. A feature inserted in
    # the middle moves x0's features to other channels: columns whose new key the old model
    # lacks are kept at the new model's values (plan: "preserves the function", deviation ~1).
    "raw input, feature inserted": Case("add a feature to a raw input", RAW, RAW4,
                                        (("x0", ("x0.0", "x0.new0", "x0.1", "x0.2")),)),
    # ... one appended lands on channel 3, whose column x1's token still needs: zeroed.
    "raw input, feature appended": Case("add a feature to a raw input", RAW, RAW4,
                                        (("x0", ("x0.0", "x0.1", "x0.2", "x0.new0")),)),
    # ... reordered: every column of x0's channels gets a key the old model lacks: kept.
    "raw input, features reordered": Case("reorder a raw input", RAW, RAW, (("x0", ("x0.2", "x0.0", "x0.1")),)),
    # A Linear across tokens, applied to every channel: its weight meets the new units too and
    # is zeroed whole ("no element keeps its key"), though copying it would preserve the
    # function; only "new output" is reported.
    "mix_tokens after a widened linear": _widened((LayerSpec("mix_tokens", residual=True),)),
    # A Conv2d sliding along the channels: the same, for its kernel.
    "conv2d after a widened linear": _widened((LayerSpec("conv2d", residual=True),)),
    # A grouped Conv1d regroups the widened channels (group 0 was channels 0-1, becomes 0-2):
    # weights pairing an old channel with another group's output are kept at the new model's
    # values (and a head after it hides the output issue: plan "preserves the function").
    "grouped conv1d after a widened linear": _widened((LayerSpec("conv1d", groups=2, width=4),)),
}


@pytest.mark.parametrize("gap", list(KNOWN_GAPS))
def test_known_gaps_weights_shared_across_roles_are_reported(gap):
    """Weights that serve an old and a new (or moved) position at once: the labels cannot tell
    which old element a new one plays the role of. The plan does not fix them, but reports them
    ("unmatched": new elements kept without a new label, old elements lost without a removed
    one) and so no longer claims to preserve the function. The random cases still exclude them
    (`_target`'s raw inputs, `SHARED`, grouped Conv1d), since their elements are not carried over
    exactly."""
    case = KNOWN_GAPS[gap]
    _silent_and_wrong(case)
    p, _, _ = transplant(case)
    assert not p.preserves_function
    assert "unmatched" in {i.kind for i in p.issues}
    assert "[unmatched]" in p.summary()
    assert not any(i.kind == "new output" and i.message.endswith("the old positions are preserved") for i in p.issues)


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_attention_heads_of_size_one(kind):
    """Widening the stream in front of an attention whose heads are one channel wide (3 heads
    over 3 channels -> 3 heads over 6): q/k/v rows must be matched part by part and head by
    head (never by raw row number), and the wider heads change the scores (an
    "attention" issue, as reported when the old heads are wider). Once a known gap: the old
    model's size-one heads were not found as a split (chunk size 1), so the parts disagreed
    between old and new and rows were matched by raw number (new q rows 3-5 got old k rows)."""
    old = ArchSpec(inputs=(InputSpec("x0", n=3, entities=3),), width=3,
                   layers=(LayerSpec("linear"), LayerSpec(kind, heads=3)), outputs=("mean",))
    new = replace(old, layers=(LayerSpec("linear", width=6), LayerSpec(kind, heads=3)))
    p, _, _ = transplant(Case("widen a linear layer before attention", old, new, ()))
    if kind == "mha":
        w_old, w_new = p.old.model.layers[1].attn.in_proj_weight, p.new.model.layers[1].attn.in_proj_weight
    else:
        w_old = torch.cat([getattr(p.old.model.layers[1], n).weight for n in "qkv"])
        w_new = torch.cat([getattr(p.new.model.layers[1], n).weight for n in "qkv"])
    for part in range(3):
        for head in range(3):  # old row: part * 3 + head; new row: part * 6 + head * 2 (its first channel)
            assert torch.equal(w_new[part * 6 + head * 2, :3], w_old[part * 3 + head]), (part, head)
    assert "attention" in {i.kind for i in p.issues}
