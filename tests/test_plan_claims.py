"""The plan never claims preservation wrongly, and verify never reports a deviation as zero.

Three classes of wrong claim, each with the case that exposed it:
- NaN and Inf: a removed feature whose weights are NaN, outputs that are NaN or infinite on one
  side only, are deviations, never zeros;
- an operator without a label rule (the sound fallback): the positions after it are not matched
  element by element, so a change that reaches it is reported and preservation not claimed;
- output positions that move (raw features reordered into a flattened output): reported, and
  verify says it compared by label.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.propagate import UnknownOperatorWarning

ABCD = ["a", "b", "c", "d"]


def features(names, dim=-1):
    return {"obs": fs.Features(names, dim=dim)}


class Linear(nn.Module):
    def __init__(self, n_in=4, n_out=3):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, obs):
        return self.fc(obs)


def planned(old, new, old_names, new_names, shape=(2,), **kw):
    ot = fs.trace(old, (torch.randn(*shape, len(old_names)),), features(old_names))
    nt = fs.trace(new, (torch.randn(*shape, len(new_names)),), features(new_names))
    return fs.plan(ot, nt, **kw)


# NaN and Inf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_removed_feature_with_non_finite_weights_is_reported(bad):
    old, new = Linear(4), Linear(3)
    with torch.no_grad():
        old.fc.weight[:, 3] = 0.0
        old.fc.weight[1, 3] = bad           # max(0.0, nan) is 0.0: the NaN must not read as zero
    p = planned(old, new, ABCD, ABCD[:3])
    assert not p.preserves_function
    issue = next(i for i in p.issues if i.kind == "removed input")
    assert issue.where == "fc.weight" and "obs: d" in issue.message
    assert ("NaN" if math.isnan(bad) else "inf") in issue.message, issue.message


def test_removed_feature_with_zero_weights_is_still_preserved():
    old, new = Linear(4), Linear(3)
    with torch.no_grad():
        old.fc.weight[:, 3] = 0.0
    p = planned(old, new, ABCD, ABCD[:3])
    assert p.preserves_function, p.issues
    p.apply()
    assert fs.verify(p).ok()


def identity_plan():
    torch.manual_seed(0)
    old, new = Linear(4), Linear(4)
    p = planned(old, new, ABCD, ABCD)
    p.apply()
    return old, new, p


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_verify_non_finite_on_one_side_is_a_deviation(bad):
    old, new, p = identity_plan()
    with torch.no_grad():
        new.fc.bias[1] = bad                # new output non-finite where the old one is finite
    v = fs.verify(p)
    assert not v.ok()
    assert math.isnan(v.max) if math.isnan(bad) else v.max == math.inf, str(v)
    o = v.outputs[0]
    assert o.mismatched > 0 and ("NaN" if math.isnan(bad) else "inf") in str(v)


def test_verify_old_side_non_finite_is_a_deviation():
    old, new, p = identity_plan()
    with torch.no_grad():
        old.fc.bias[0] = float("inf")       # max |old| = inf must not divide the deviation to 0
    v = fs.verify(p)
    assert not v.ok() and v.max == math.inf, str(v)


def test_verify_equal_non_finite_values_in_both_count_as_equal():
    """Decided: a NaN in both outputs at the same position, or the same infinity, is the old
    model's value reproduced; it is counted equal (torch.testing's equal_nan) and said."""
    old, new, p = identity_plan()
    with torch.no_grad():
        for m in (old, new):
            m.fc.bias[0] = float("nan")
            m.fc.bias[2] = -float("inf")
    v = fs.verify(p)
    assert v.ok() and v.max == 0.0, str(v)
    assert v.outputs[0].scale < math.inf    # the scale is the largest finite |old|
    assert "non-finite in both" in str(v)


def test_verification_max_is_nan_whatever_the_order_of_outputs():
    from fxsurgery.surgery.verify import OutputDeviation, Verification
    a = OutputDeviation(0, (2,), (2,), compared=2, max_abs=0.1, scale=1.0)
    b = OutputDeviation(1, (2,), (2,), compared=2, scale=1.0, mismatched=1, nan=True)
    for outs in ([a, b], [b, a]):
        v = Verification(outputs=outs, trials=1)
        assert math.isnan(v.max) and not v.ok()


class Wider(nn.Module):
    def __init__(self, h=4):
        super().__init__()
        self.fc1, self.head = nn.Linear(4, h), nn.Linear(h, 2)

    def forward(self, obs):
        return self.head(torch.tanh(self.fc1(obs)))


@pytest.mark.parametrize("where", ["kept", "copied", "zeroed"])
def test_non_finite_values_the_new_model_keeps_are_reported(where):
    """A new unit's incoming weights keep the new model's values and its outgoing weights are
    zeroed: preservation rests on 0 * value = 0, false for NaN. A NaN that the plan overwrites
    (a copied or zeroed element) does not matter."""
    torch.manual_seed(0)
    old, new = Wider(4), Wider(5)
    with torch.no_grad():
        if where == "kept":
            new.fc1.weight[4, 1] = float("nan")      # the new unit's incoming weight: kept
        elif where == "copied":
            new.fc1.weight[2, 1] = float("nan")      # an old unit's: copied over
        else:
            new.head.weight[0, 4] = float("nan")     # the new unit's outgoing weight: zeroed
    p = planned(old, new, ABCD, ABCD)
    bad = [i for i in p.issues if i.kind == "non-finite"]
    if where != "kept":
        assert not bad and p.preserves_function, [str(i) for i in p.issues]
        return
    assert [i.where for i in bad] == ["fc1.weight"] and "NaN" in bad[0].message
    assert not p.preserves_function
    p.apply()
    assert not fs.verify(p).ok()                     # the claim would have been wrong


# An operator without a label rule ------------------------------------------------------------

@torch.library.custom_op("plan_claims::roll", mutates_args=())
def _roll(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 1, -1)


@_roll.register_fake
def _(x):
    return torch.empty_like(x)


class RollRaw(nn.Module):
    """The feature axis rolled by an operator with no label rule, then a layer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, obs):
        return self.head(torch.ops.plan_claims.roll(obs))


class RollHidden(nn.Module):
    """The roll after a layer: its input is the layer's units, which a reordering of the input
    features does not move (the layer's columns absorb it)."""

    def __init__(self, h=4):
        super().__init__()
        self.enc, self.head = nn.Linear(4, h), nn.Linear(h, 2)

    def forward(self, obs):
        return self.head(torch.ops.plan_claims.roll(self.enc(obs)))


class RollOther(nn.Module):
    """Two inputs; the roll reads only the second."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, obs, aux):
        return self.a(obs) + self.b(torch.ops.plan_claims.roll(aux))


def reorder(model, inputs, descs, order):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOperatorWarning)
        t = fs.trace(model, inputs, descs)
        gm = fs.passes.reorder_features(t, "obs", order)
    return gm.meta["fxsurgery"]["plan"]


def no_rule(p):
    return [i for i in p.issues if i.kind == "no rule"]


def test_change_through_an_operator_without_rule_is_not_claimed():
    torch.manual_seed(0)
    p = reorder(RollRaw(), (torch.randn(2, 4),), features(ABCD), ABCD[::-1])
    assert not p.preserves_function
    [issue] = no_rule(p)
    assert "plan_claims.roll.default" in str(issue) and "%roll" in issue.where
    assert "not matched element by element" in issue.message and "reaches" in issue.message
    assert fs.verify(p).max > 1e-3      # the claim would have been wrong: the outputs moved


def test_operator_without_rule_that_no_change_reaches_is_reported_not_blocking():
    torch.manual_seed(0)
    p = reorder(RollHidden(), (torch.randn(2, 4),), features(ABCD), ABCD[::-1])
    [issue] = no_rule(p)
    assert "plan_claims.roll.default" in issue.message and issue.where == "%roll"
    assert "no change reaches it" in issue.message
    assert p.preserves_function, [str(i) for i in p.issues]
    assert fs.verify(p).max <= 1e-5


def test_operator_without_rule_on_another_input_is_not_blocking():
    torch.manual_seed(0)
    descs = {"obs": fs.Features(ABCD), "aux": fs.Features(["u", "v", "w"])}
    p = reorder(RollOther(), (torch.randn(2, 4), torch.randn(2, 3)), descs, ABCD[::-1])
    assert p.preserves_function and len(no_rule(p)) == 1, [str(i) for i in p.issues]
    assert fs.verify(p).max <= 1e-5


def test_widening_into_an_operator_without_rule_is_not_claimed():
    torch.manual_seed(0)
    old, new = RollHidden(4), RollHidden(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOperatorWarning)
        p = planned(old, new, ABCD, ABCD)
    assert not p.preserves_function
    [issue] = no_rule(p)
    assert "reaches" in issue.message and "2x4 -> 2x5" in issue.message, issue


def test_fallback_is_recorded_per_node():
    from fxsurgery.propagate import fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOperatorWarning)
        t = fs.trace(RollHidden(), (torch.randn(2, 4),), features(ABCD))
        fs.interaction_map(t)
    found = fallbacks(t.graph)
    assert [(n, op) for n, op, _ in found] == [("roll", "plan_claims.roll.default")]


# Output positions that move ------------------------------------------------------------------

class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, obs):
        return (obs * self.scale).flatten(1)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, obs):
        return torch.cat([obs, self.fc(obs)], -1)


def moved(p):
    return [i for i in p.issues if i.kind == "moved output" and "positions moved" in i.message]


def test_flattened_raw_features_reordered_move_the_output():
    torch.manual_seed(0)
    old, new = Flat(), Flat()
    ot = fs.trace(old, (torch.randn(2, 3, 4),), features(ABCD))
    nt = fs.trace(new, (torch.randn(2, 3, 4),), features(["b", "a", "c", "d"]))
    p = fs.plan(ot, nt)
    [issue] = moved(p)
    assert issue.where == "output 0" and "0 -> 1" in issue.message and "1 -> 0" in issue.message, issue
    assert not p.preserves_function
    p.apply()
    v = fs.verify(p)
    assert v.outputs[0].by == "label" and "by label" in str(v) and "by label" in repr(v)
    assert v.max <= 1e-6 and v.outputs[0].by_position > 0.1, str(v)   # by position, columns swapped


def test_reordered_features_in_a_concatenated_output_move_it():
    torch.manual_seed(0)
    p = reorder(Concat(), (torch.randn(2, 4),), features(ABCD), ["b", "a", "c", "d"])
    [issue] = moved(p)
    assert "axis 1" in issue.message
    assert not p.preserves_function


def test_output_of_a_layer_that_absorbs_a_reordering_does_not_move():
    torch.manual_seed(0)
    old, new = Linear(4, 3), Linear(4, 3)
    ot = fs.trace(old, (torch.randn(2, 4),), features(ABCD))
    nt = fs.trace(new, (torch.randn(2, 4),), features(ABCD[::-1]))
    p = fs.plan(ot, nt)                 # the columns of fc absorb the reordering
    assert not moved(p) and p.preserves_function
    p.apply()
    v = fs.verify(p)
    assert v.outputs[0].by == "position" and "by position" in str(v) and v.ok()


def test_features_added_before_concatenated_positions_move_them():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = fs.trace(Concat(), (torch.randn(2, 4),), features(ABCD))
        gm = fs.passes.add_features(t, "obs", ["e"])
    p = gm.meta["fxsurgery"]["plan"]
    assert any(i.kind == "new output" for i in p.issues)
    [issue] = moved(p)                  # fc's outputs moved from columns 4, 5 to 5, 6
    assert "4 -> 5" in issue.message and not p.preserves_function
