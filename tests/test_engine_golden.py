"""The maps and plans of fixed models equal those saved in tests/golden/ (see golden_cases.py):
a change to how the label engine stores labels and sets must not change any of them."""
import json

import pytest

from golden_cases import compute_map, compute_plan, map_cases, path, plan_cases

REAL = {"llama", "gpt2", "vit", "llama_heads_added", "gpt2_tokens_added", "bert_wider"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(kind, name):
    with open(path(kind, name)) as f:
        return json.load(f)


def _check(got: dict, want: dict) -> None:
    # Compared part by part, so that a failure says which parameter or row changed.
    assert got.keys() == want.keys()
    for part in want:
        if isinstance(want[part], dict):
            for k in sorted(set(want[part]) | set(got[part])):
                assert got[part].get(k) == want[part].get(k), (part, k)
        assert got[part] == want[part], part


# dynamic=True: a capture with free sizes, concretised (fxsurgery.sizes), must label exactly as
# the static capture does.
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "free_sizes"])
@pytest.mark.parametrize("name", list(map_cases()))
def test_map_equals_golden(name, dynamic):
    if name in REAL:
        pytest.importorskip("transformers")
    _check(json.loads(json.dumps(compute_map(name, dynamic))), _saved("map", name))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "free_sizes"])
@pytest.mark.parametrize("name", list(plan_cases()))
def test_plan_equals_golden(name, dynamic):
    if name in REAL:
        pytest.importorskip("transformers")
    _check(json.loads(json.dumps(compute_plan(name, dynamic))), _saved("plan", name))


def test_the_digest_sees_a_changed_map():
    # A golden comparison that cannot fail is no check: one label renamed changes the digest.
    from golden_cases import map_digest
    import fxsurgery as fs
    from fxsurgery import zoo
    model, inputs, features = zoo.mlp()
    a = map_digest(fs.interaction_map(fs.trace(model, inputs, features)))
    names = list(features["obs"].names)
    names[2] = "renamed"
    b = map_digest(fs.interaction_map(fs.trace(model, inputs, {"obs": fs.Features(names)})))
    assert a["elements"]["0.weight"] != b["elements"]["0.weight"]
    assert a["elements"]["0.bias"] == b["elements"]["0.bias"]
