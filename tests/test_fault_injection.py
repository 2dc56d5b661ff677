"""Fault injection: the k-th tensor write (copy_, index_fill_, index_copy_, zero_, fill_,
__setitem__, set_, an assignment to .data, ...) raises, an ordinary exception or
KeyboardInterrupt, inside plan.apply, fs.transplant and every rewriting pass. The error
propagates, the user's models are bit for bit and object for object what they were, and the
new model of a failed apply is too."""
import contextlib

import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from faults import WRITE_METHODS, count_calls, fail_at, state_hash
from helpers import SelfAttention as Attention
from helpers import ThreeLayer as MLP

OBS = ["hp", "mana", "x", "y"]

pytestmark = pytest.mark.usefixtures("quiet")


class TiedLM(nn.Module):
    def __init__(self, vocab=6, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.mix(self.emb(tok))))


def traced_mlp():
    m = MLP().eval()
    return m, fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})


def traced_lm():
    m = TiedLM().eval()
    return m, fs.trace(m, {"tok": torch.tensor([[0, 3, 5]])}, {"tok": fs.Categories([f"t{i}" for i in range(6)])})


def traced_attention():
    m = Attention().eval()
    return m, fs.trace(m, {"x": torch.randn(2, 3, 8)}, {"x": fs.Features(list("abcdefgh"))})


PASSES = {
    "add_features": (traced_mlp, lambda tr: fs.passes.add_features(tr, "obs", ["armor"], at=1)),
    "remove_features": (traced_mlp, lambda tr: fs.passes.remove_features(tr, "obs", ["mana"])),
    "reorder_features": (traced_mlp, lambda tr: fs.passes.reorder_features(tr, "obs", ["y", "hp", "x", "mana"])),
    "add_categories": (traced_lm, lambda tr: fs.passes.add_categories(tr, "tok", ["n0"], new_categories="mean")),
    "widen": (traced_mlp, lambda tr: fs.passes.widen(tr, "fc1", 12)),
    "prune_units": (traced_mlp, lambda tr: fs.passes.prune_units(tr, "fc2", [6, 1, 3])),
    "insert_identity_layer": (traced_mlp, lambda tr: fs.passes.insert_identity_layer(tr, "fc1")),
    "add_heads": (traced_attention, lambda tr: fs.passes.add_heads(tr, "", 1)),
}


def writes(run) -> int:
    with count_calls("write") as calls:
        run()
    return calls.count


def ks(n: int) -> list[int]:
    """The first, second and last writes."""
    return sorted({1, min(2, n), n})


def check_fails(run, method, k, exc, *models):
    """`run` raises the injected fault at the k-th `method` call (itself, or as the cause of the
    error it raises), and leaves `models` as they were."""
    before = [state_hash(m, objects=True) for m in models]
    with pytest.raises(BaseException) as info, fail_at(method, k, exc) as calls:
        run()
    assert calls.raised
    err = info.value
    while err is not None and not (isinstance(err, exc) and "injected fault" in str(err)):
        err = err.__cause__
    assert err is not None, f"the injected {exc.__name__} was lost: {info.value!r}"
    for m, b in zip(models, before):
        changed = sorted(n for n, h in state_hash(m, objects=True).items() if b.get(n) != h)
        assert state_hash(m, objects=True) == b, f"{type(m).__name__} changed at write {k} of {method}: {changed}"


# plan.apply and fs.transplant --------------------------------------------------------------------

def apply_case():
    torch.manual_seed(0)
    old, new = MLP(), MLP(6, h=10)       # features added (copy, zero) and fc1 widened (new units kept)
    p = fs.plan(fs.trace(old, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}),
                fs.trace(new, {"obs": torch.randn(2, 6)}, {"obs": fs.Features(OBS[:2] + ["a", "b"] + OBS[2:])}))
    return old, new, p


def test_apply_every_write_method_at_its_first_second_and_last_call():
    old, new, p = apply_case()
    with contextlib.ExitStack() as stack:          # every method counted in one apply of a twin plan
        twin = apply_case()[2]
        counters = {m: stack.enter_context(count_calls(m)) for m in WRITE_METHODS}
        twin.apply()
    per_method = {m: c.count for m, c in counters.items() if c.count}
    assert {"copy_", "data"} <= set(per_method), per_method    # the module sees apply's writes
    for method, n in per_method.items():
        for k in ks(n):
            for exc in (RuntimeError, KeyboardInterrupt):
                check_fails(p.apply, method, k, exc, old, new)
                assert not p.applied
    p.apply()                                       # the plan is intact: it still applies
    assert fs.verify(p).max <= 1e-5


def shared_case():
    torch.manual_seed(1)
    old, new = MLP(), MLP(6)
    new.fc2, new.fc3 = old.fc2, old.fc3             # reused: the new model gets copies of its own
    p = fs.plan(fs.trace(old, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}),
                fs.trace(new, {"obs": torch.randn(2, 6)}, {"obs": fs.Features(OBS + ["a", "b"])}))
    return old, new, p


def test_apply_with_modules_shared_with_the_old_model():
    old, new, p = shared_case()
    n = writes(shared_case()[2].apply)
    for k in ks(n):
        for exc in (RuntimeError, KeyboardInterrupt):
            check_fails(p.apply, "write", k, exc, old, new)
    assert new.fc2 is old.fc2                       # nothing replaced by the failed applies
    p.apply()
    assert new.fc2 is not old.fc2 and fs.verify(p).max <= 1e-5


def test_transplant():
    def case():
        torch.manual_seed(2)
        old, new = MLP(), MLP(5)
        return old, new, lambda: fs.transplant(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 5)},
                                               {"obs": fs.Features(OBS)}, {"obs": fs.Features(["z"] + OBS)})
    n = writes(case()[2])
    assert n > 0
    for k in ks(n):
        for exc in (RuntimeError, KeyboardInterrupt):
            old, new, run = case()
            check_fails(run, "write", k, exc, old, new)


# the rewriting passes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PASSES))
def test_pass(name):
    make, run = PASSES[name]
    torch.manual_seed(3)
    m, tr = make()
    run(tr)                                         # (what the first run caches is not counted)
    n = writes(lambda: run(tr))
    assert n > 0
    # The first and second writes with either exception; the last with both.
    for k, exc in [(1, RuntimeError), (min(2, n), KeyboardInterrupt), (n, RuntimeError), (n, KeyboardInterrupt)]:
        check_fails(lambda: run(tr), "write", k, exc, m)
    gm = run(tr)                                    # and the pass still works on the same input
    assert fs.verify(gm.meta["fxsurgery"]["plan"]).trials > 0
