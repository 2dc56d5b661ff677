"""A pass hands the old model's map to `fs.plan` instead of mapping it again; the plan must be
the one a fresh map gives, and a map that is no longer the graph's last is never reused."""
import importlib

import torch

import fxsurgery as fs
from fxsurgery.interaction_map import current_map

im_mod = importlib.import_module("fxsurgery.interaction_map")   # the package exports the function under this name

from helpers import ThreeLayer


def _traced():
    torch.manual_seed(0)
    return fs.trace(ThreeLayer(), (torch.randn(2, 4),), {"obs": fs.Features(["a", "b", "c", "d"])})


def _count_maps(monkeypatch):
    calls = []
    real = im_mod.interaction_map

    def counting(traced, *a, **k):
        calls.append(traced)
        return real(traced, *a, **k)
    monkeypatch.setattr("fxsurgery.surgery.planning.interaction_map", counting)
    return calls


def test_a_current_map_is_reused_and_gives_the_same_plan(monkeypatch):
    old, new = _traced(), _traced()
    fresh = fs.plan(old, new).summary()
    imap = fs.interaction_map(old)
    assert current_map(old, imap)
    calls = _count_maps(monkeypatch)
    reused = fs.plan(old, new, old_map=imap).summary()
    assert [c is old for c in calls] == [False]      # only the new model was mapped
    assert reused == fresh


def test_a_map_overwritten_by_a_later_run_is_made_again(monkeypatch):
    old, new = _traced(), _traced()
    imap = fs.interaction_map(old)
    fs.interaction_map(old, keys=False)            # the nodes now hold another run's labels
    assert not current_map(old, imap)
    calls = _count_maps(monkeypatch)
    fs.plan(old, new, old_map=imap)
    assert calls[0] is old


def test_a_map_whose_pool_gained_labels_is_made_again():
    old = _traced()
    imap = fs.interaction_map(old)
    imap.pool.label_range("unit", "extra", 3)
    assert not current_map(old, imap)


def test_a_pass_maps_the_old_model_once(monkeypatch):
    old = _traced()
    seen = []
    real = im_mod.interaction_map

    def counting(traced, *a, **k):
        seen.append(traced.model)
        return real(traced, *a, **k)
    monkeypatch.setattr("fxsurgery.passes.driver.interaction_map", counting)
    monkeypatch.setattr("fxsurgery.passes.resize.interaction_map", counting)
    monkeypatch.setattr("fxsurgery.surgery.planning.interaction_map", counting)
    gm = fs.passes.add_features(old, "obs", ["e"])
    assert sum(m is old.model for m in seen) == 1
    assert fs.verify(gm.meta["fxsurgery"].plan).ok()
