"""plan.apply's promises under hostile conditions: the old model is never written, even when
the new model reuses its modules, Parameters or memory; a write that fails midway (an exception
or KeyboardInterrupt) leaves the new model as it was; a plan applied twice, or on a model that
changed since planning, is refused naming the parameter, and writes nothing."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.surgery import SurgeryError
from faults import fail_at, state_hash

OBS = ["hp", "mana", "x", "y"]

pytestmark = pytest.mark.usefixtures("quiet")


class MLP(nn.Module):
    def __init__(self, n_in=4, h=8, norm=False):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(n_in, h), nn.Linear(h, h), nn.Linear(h, 3)
        self.bn = nn.BatchNorm1d(h) if norm else nn.Identity()

    def forward(self, obs):
        return self.head(torch.tanh(self.fc2(torch.relu(self.bn(self.fc1(obs))))))


class Recurrent(nn.Module):
    def __init__(self, n_in=4):
        super().__init__()
        self.enc = nn.Linear(n_in, 6)
        self.core = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, obs):
        return self.head(self.core(torch.relu(self.enc(obs)))[0])


class TiedLM(nn.Module):
    def __init__(self, vocab=5, d=6):
        super().__init__()
        self.body = nn.Module()
        self.body.emb = nn.Embedding(vocab, d)
        self.body.out = nn.Linear(d, vocab, bias=False)
        self.body.out.weight = self.body.emb.weight
        self.mix = nn.Linear(d, d)

    def forward(self, tok):
        return self.body.out(torch.tanh(self.mix(self.body.emb(tok))))


def planned(old, new, old_names=OBS, new_names=OBS, batch=3):
    x, y = torch.randn(batch, len(old_names)), torch.randn(batch, len(new_names))
    return fs.plan(fs.trace(old, {"obs": x}, {"obs": fs.Features(old_names)}),
                   fs.trace(new, {"obs": y}, {"obs": fs.Features(new_names)}))


def outputs(model, x):
    with torch.no_grad():
        return model(x).clone()


# the old model is never written -----------------------------------------------------------------

def reuse_module(old, new):
    new.fc1 = old.fc1


def reuse_parameter(old, new):
    new.fc1.weight = old.fc1.weight


def reuse_storage(old, new):
    new.fc1.weight = nn.Parameter(old.fc1.weight.data)


def reuse_numpy_memory(old, new):
    # Two storages over one buffer: the same bytes, not the same storage object.
    buf = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    old.fc1.weight = nn.Parameter(torch.from_numpy(buf))
    new.fc1.weight = nn.Parameter(torch.from_numpy(buf[:, :]))


@pytest.mark.parametrize("reuse", [reuse_module, reuse_parameter, reuse_storage, reuse_numpy_memory])
def test_a_reused_module_or_tensor_of_the_old_model_is_never_written(reuse):
    torch.manual_seed(0)
    old, new = MLP(), MLP()
    reuse(old, new)
    x = torch.randn(5, 4)
    before, y_old = state_hash(old, objects=True), outputs(old, x)
    p = planned(old, new, OBS, OBS[::-1])          # the features reversed: fc1's columns move
    p.apply()
    assert state_hash(old, objects=True) == before
    assert torch.equal(outputs(old, x), y_old)
    assert fs.verify(p).max <= 1e-5
    assert torch.equal(new.fc1.weight, old.fc1.weight.flip(1))
    with torch.no_grad():                          # and the two share nothing any more
        for t in new.parameters():
            t.add_(1)
    assert torch.equal(outputs(old, x), y_old) and state_hash(old, objects=True) == before


def test_reused_batch_norm_buffers_are_not_written():
    torch.manual_seed(1)
    old, new = MLP(norm=True), MLP(6, norm=True)
    with torch.no_grad():
        old.bn.running_mean.uniform_(-1, 1)
        old.bn.running_var.uniform_(0.5, 2)
    old.eval(), new.eval()
    new.bn = old.bn
    new.fc2 = old.fc2
    before = state_hash(old, objects=True)
    p = planned(old, new, OBS, OBS + ["a", "b"])
    p.apply()
    assert state_hash(old, objects=True) == before
    assert new.bn is not old.bn and new.fc2 is not old.fc2      # the new model's own copies
    new.train()
    new(torch.randn(4, 6))                                      # updates the new running statistics only
    assert state_hash(old, objects=True) == before
    assert not torch.equal(new.bn.running_mean, old.bn.running_mean)


def test_a_reused_recurrent_core_gets_its_own_weights_and_runs_on_them():
    torch.manual_seed(2)
    old, new = Recurrent(), Recurrent()
    new.core = old.core
    x = torch.randn(2, 3, 4)
    before, y_old = state_hash(old, objects=True), outputs(old, x)
    p = fs.plan(fs.trace(old, {"obs": x}, {"obs": fs.Features(OBS)}),
                fs.trace(new, {"obs": x.flip(-1)}, {"obs": fs.Features(OBS[::-1])}))
    p.apply()
    assert state_hash(old, objects=True) == before and new.core is not old.core
    torch.testing.assert_close(outputs(new, x.flip(-1)), y_old, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        new.core.weight_hh_l0.zero_()                # the LSTM's flat weights are the new ones
    assert (outputs(new, x.flip(-1)) - y_old).abs().max() > 1e-3
    assert torch.equal(outputs(old, x), y_old)


def test_ties_inside_the_new_model_stay_ties_when_the_tied_module_is_reused():
    torch.manual_seed(3)
    old, new = TiedLM(), TiedLM()
    new.body = old.body
    tok = torch.tensor([[0, 3, 4]])
    vocab = fs.Categories([f"t{i}" for i in range(5)])
    before = state_hash(old, objects=True)
    p = fs.plan(fs.trace(old, {"tok": tok}, {"tok": vocab}), fs.trace(new, {"tok": tok}, {"tok": vocab}))
    p.apply()
    assert state_hash(old, objects=True) == before
    assert new.body is not old.body and new.body.out.weight is new.body.emb.weight
    assert new.body.emb.weight is not old.body.emb.weight
    assert fs.verify(p).max <= 1e-5


def test_the_old_model_itself_as_the_new_one_is_refused():
    old = MLP()
    p = planned(old, old)
    before = state_hash(old, objects=True)
    with pytest.raises(SurgeryError, match=r"the new model is the old model.*deepcopy.*nothing was written"):
        p.apply()
    assert state_hash(old, objects=True) == before


# all or nothing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, k", [("copy_", 1), ("copy_", 2), ("index_fill_", 1), ("data", 1), ("data", 3),
                                       ("data", 6)])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_write_failing_midway_leaves_the_new_model_as_it_was(method, k, exc):
    torch.manual_seed(4)
    old, new = MLP(), MLP(6)
    p = planned(old, new, OBS, OBS[:2] + ["a", "b"] + OBS[2:])
    old_before, new_before = state_hash(old, objects=True), state_hash(new, objects=True)
    with pytest.raises(exc, match="injected fault"), fail_at(method, k, exc) as calls:
        p.apply()
    assert calls.raised
    assert state_hash(new, objects=True) == new_before and state_hash(old, objects=True) == old_before
    assert not p.applied
    p.apply()                                       # and the plan still applies
    assert fs.verify(p).max <= 1e-5


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_failure_while_replacing_shared_modules_is_taken_back(monkeypatch, k):
    torch.manual_seed(5)
    old, new = MLP(), MLP(6)
    new.fc2, new.head = old.fc2, old.head
    p = planned(old, new, OBS, OBS + ["a", "b"])
    fc2, head = new.fc2, new.head
    old_before, new_before = state_hash(old, objects=True), state_hash(new, objects=True)
    real, calls = nn.Module.__setattr__, []

    def failing(self, name, value):
        calls.append(name)
        if len(calls) == k:
            raise KeyboardInterrupt("injected fault")
        real(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", failing)
    with pytest.raises(KeyboardInterrupt, match="injected fault"):
        p.apply()
    monkeypatch.undo()
    assert state_hash(new, objects=True) == new_before and state_hash(old, objects=True) == old_before
    assert new.fc2 is fc2 and new.head is head


# refused, nothing written ----------------------------------------------------------------------------

def test_applying_twice_is_refused():
    old, new = MLP(), MLP(6)
    p = planned(old, new, OBS, OBS + ["a", "b"])
    p.apply()
    with torch.no_grad():
        new.fc1.weight.add_(1)                       # (training since)
    after = state_hash(new, objects=True)
    with pytest.raises(SurgeryError, match=r"applied already.*plan again.*nothing was written"):
        p.apply()
    assert state_hash(new, objects=True) == after


def test_a_new_model_changed_since_planning_is_refused_naming_the_parameter():
    old, new = MLP(), MLP(6)
    p = planned(old, new, OBS, OBS + ["a", "b"])
    new.extra = nn.Linear(2, 2)                      # a module added since the plan
    before = state_hash(new, objects=True)
    with pytest.raises(SurgeryError, match=r"new model has 'extra.weight', which it did not have.*plan again"):
        p.apply()
    assert state_hash(new, objects=True) == before
    del new.extra
    new.fc2.bias = new.fc1.bias                      # tied since the plan
    before = state_hash(new, objects=True)
    with pytest.raises(SurgeryError, match=r"new model's fc2.bias is now the same tensor as fc1.bias.*plan again"):
        p.apply()
    assert state_hash(new, objects=True) == before


def test_a_tie_broken_since_planning_is_refused_naming_both_names():
    tied = TiedLM()
    tok, vocab = torch.tensor([[0, 3, 4]]), fs.Categories([f"t{i}" for i in range(5)])
    p = fs.plan(fs.trace(TiedLM(), {"tok": tok}, {"tok": vocab}), fs.trace(tied, {"tok": tok}, {"tok": vocab}))
    tied.body.out.weight = nn.Parameter(tied.body.emb.weight.detach().clone())
    before = state_hash(tied, objects=True)
    with pytest.raises(SurgeryError, match=r"body.out.weight and body.emb.weight were one tensor \(tied\).*plan again"):
        p.apply()
    assert state_hash(tied, objects=True) == before
