"""Inserting a new layer that starts as the identity: fc1 -> relu -> fc2 becomes
fc1 -> relu -> mid -> fc2 (optionally with a relu after mid), with mid = nn.Linear(H, H) built
as weight = I, bias = 0. `units={"mid": "fc1"}` declares mid an inserted layer whose unit j
stands for fc1's unit j: fc2's columns are copied, mid keeps its identity weights, and the
function is preserved to 1e-5."""
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.surgery.errors import SurgeryError

H = 8
OBS = ["hp", "mana", "x", "y"]


class Old(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(len(OBS), H)
        self.fc2 = nn.Linear(H, 3)

    def forward(self, obs):
        return self.fc2(torch.relu(self.fc1(obs)))


class Inserted(nn.Module):
    def __init__(self, relu_after=False):
        super().__init__()
        self.fc1 = nn.Linear(len(OBS), H)
        self.mid = nn.Linear(H, H)
        self.fc2 = nn.Linear(H, 3)
        self.relu_after = relu_after
        with torch.no_grad():
            self.mid.weight.copy_(torch.eye(H))
            self.mid.bias.zero_()

    def forward(self, obs):
        h = self.mid(torch.relu(self.fc1(obs)))
        if self.relu_after:
            h = torch.relu(h)
        return self.fc2(h)


def _plan(relu_after=False, **kwargs):
    torch.manual_seed(0)
    old, new = Old(), Inserted(relu_after)
    x = (torch.randn(2, len(OBS)),)
    features = {"obs": fs.Features(OBS)}
    return old, new, fs.plan(fs.trace(old, x, features), fs.trace(new, x, features), **kwargs)


@pytest.mark.parametrize("relu_after", [False, True])
def test_an_identity_layer_inserted_with_an_alias_preserves_the_function(relu_after):
    old, new, p = _plan(relu_after, units={"mid": "fc1"})
    assert p.preserves_function, p.issues
    assert not any(i.kind == "unmatched" for i in p.issues)
    assert not p.new_labels and not p.removed_labels
    before = {k: v.clone() for k, v in new.state_dict().items()}
    p.apply()
    v = fs.verify(p)
    assert v.ok(1e-5) and v.max <= 1e-5, v
    sd_old, sd_new = old.state_dict(), new.state_dict()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(sd_new[name], sd_old[name]), name          # bit-identical
        assert p.params[name].status == "copied"
    assert torch.equal(sd_new["mid.weight"], torch.eye(H))
    assert torch.equal(sd_new["mid.bias"], torch.zeros(H))
    assert torch.equal(sd_new["mid.weight"], before["mid.weight"])
    for name in ("mid.weight", "mid.bias"):
        assert p.params[name].inserted == ("mid",)
        assert p.params[name].old_name is None
    table = p.table()
    mid_rows = [line for line in table.splitlines() if line.startswith("mid.")]
    assert len(mid_rows) == 2 and all("inserted layer (mid = fc1): keeps the values it was built with" in r
                                      for r in mid_rows), table
    assert any("mid is an inserted layer standing for fc1" in n for n in p.notes)


def test_the_old_group_name_can_be_aliased_through_a_rename():
    torch.manual_seed(0)

    class OldRenamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(len(OBS), H)
            self.fc2 = nn.Linear(H, 3)

        def forward(self, obs):
            return self.fc2(torch.relu(self.enc(obs)))

    old, new = OldRenamed(), Inserted()
    x = (torch.randn(2, len(OBS)),)
    features = {"obs": fs.Features(OBS)}
    p = fs.plan(fs.trace(old, x, features), fs.trace(new, x, features), rename={"enc": "fc1"},
                units={"mid": "enc"})
    assert p.preserves_function, p.issues
    p.apply()
    assert fs.verify(p).max <= 1e-5
    assert torch.equal(new.fc2.weight, old.fc2.weight)


def test_without_the_alias_the_inserted_layer_is_not_claimed_to_preserve_the_function():
    """Without units={"mid": "fc1"}, mid's units are new labels: fc2's columns meet them and are
    zeroed (nothing of the old fc2.weight is copied), and the plan says so with an "unmatched"
    issue on fc2.weight (its old elements hold no removed label yet are not copied)."""
    old, new, p = _plan()
    assert not p.preserves_function
    assert {lab.group for lab in p.new_labels} == {"mid"}
    kinds = {(i.kind, i.where) for i in p.issues}
    assert ("unmatched", "fc2.weight") in kinds
    fc2 = p.params["fc2.weight"]
    assert fc2.match.n_copied() == 0 and fc2.match.n_zeroed() == 3 * H
    assert "meets new 8 units of mid (zeroed)" in p.table()
    p.apply()
    assert torch.equal(new.fc2.weight, torch.zeros(3, H))
    assert fs.verify(p).max > 1e-3


@pytest.mark.parametrize("units, words", [
    ({"mid": "nope"}, ["'nope'", "'mid'", "old model has no hidden axis"]),
    ({"mid": "fc2"}, ["'mid'", "'fc2'", "8 units", "3", "sizes must be equal"]),
    ({"nope": "fc1"}, ["'nope'", "'fc1'", "new model has no hidden axis"]),
    ({"fc1": "fc2"}, ["'fc1'", "hidden axis of the old model too"]),
    ({"mid": "mid"}, ["cannot stand for itself"]),
])
def test_a_bad_alias_is_a_clear_error(units, words):
    with pytest.raises(SurgeryError) as err:
        _plan(units=units)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_transplant_accepts_the_alias():
    torch.manual_seed(1)
    old, new = Old(), Inserted(relu_after=True)
    x = (torch.randn(2, len(OBS)),)
    features = {"obs": fs.Features(OBS)}
    model, p = fs.transplant(old, new, x, x, features, features, units={"mid": "fc1"})
    assert model is new and p.preserves_function
    assert fs.verify(p).max <= 1e-5


class TwoInserted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.a, self.b, self.fc2 = nn.Linear(len(OBS), H), nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, 3)
        with torch.no_grad():
            for m in (self.a, self.b):
                m.weight.copy_(torch.eye(H))
                m.bias.zero_()

    def forward(self, obs):
        return self.fc2(self.b(self.a(torch.relu(self.fc1(obs)))))


def test_two_inserted_layers_chain_their_aliases_and_a_cycle_is_an_error():
    torch.manual_seed(2)
    old, new = Old(), TwoInserted()
    x = (torch.randn(2, len(OBS)),)
    features = {"obs": fs.Features(OBS)}
    told, tnew = fs.trace(old, x, features), fs.trace(new, x, features)
    p = fs.plan(told, tnew, units={"b": "a", "a": "fc1"})
    assert p.space.unit_aliases == {"a": "fc1", "b": "fc1"} and p.preserves_function
    p.apply()
    assert fs.verify(p).max <= 1e-5
    assert torch.equal(new.fc2.weight, old.fc2.weight)
    with pytest.raises(SurgeryError, match="form a cycle"):
        fs.plan(told, tnew, units={"b": "a", "a": "b"})
