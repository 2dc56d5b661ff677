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
