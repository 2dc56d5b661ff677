"""The passes' public arguments are checked before anything is traced: a wrong type or value is
an error naming the pass, the argument and the value (never a bare TypeError from deep inside,
never a silent coercion such as keeping unit 2 for 2.7). Also: the map's element lookups name
the parameter and its shape, and a pass says nothing (no warning) on a small model."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.passes import PassError
from helpers import TwoLayer


class Net(nn.Module):
    """obs -> fc1 -> relu -> fc2, plus an embedded index input: every pass has something to act on."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 8)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, obs, tok):
        return self.fc2(torch.relu(self.fc1(obs) + self.emb(tok).sum(1)))


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    return fs.trace(Net().eval(), {"obs": torch.randn(2, 4), "tok": torch.tensor([[0, 2], [1, 1]])},
                    {"obs": fs.Features(["hp", "mana", "x", "y"]), "tok": fs.Categories(["a", "b", "c"])})


P = fs.passes
BAD = [  # (pass, its arguments after the model, the argument named, the value shown)
    (P.widen, ("fc1", "12"), "size", "'12'"),
    (P.widen, ("fc1", 10.5), "size", "10.5"),
    (P.widen, ("fc1", True), "size", "True"),
    (P.widen, ("fc1",), "by", "2.0", {"by": 2.0}),
    (P.widen, (3, 12), "group", "3"),
    (P.widen, ("fc1", 0), "size", "0"),
    (P.prune_units, ("fc1", [0.5, 2.7]), "keep", "0.5"),
    (P.prune_units, ("fc1", [0, True]), "keep", "True"),
    (P.prune_units, ("fc1", 3), "keep", "3"),
    (P.prune_units, ("fc1", "012"), "keep", "'012'"),
    (P.add_features, ("obs", ["armor", 3]), "names", "3"),
    (P.add_features, ("obs", ["armor"], 1.0), "at", "1.0"),
    (P.add_features, ("obs", ["armor"], False), "at", "False"),
    (P.add_features, (0, ["armor"]), "input", "0"),
    (P.remove_features, ("obs", [1]), "names", "1"),
    (P.remove_features, ("obs", None), "names", "None"),
    (P.reorder_features, ("obs", "hpmanaxy"), "order", "'hpmanaxy'"),
    (P.reorder_features, ("obs", ["hp", "mana", "x", 4]), "order", "4"),
    (P.add_categories, ("tok", [b"d"]), "names", "b'd'"),
    (P.add_categories, ("tok", ["d"]), "new_categories", "'average'", {"new_categories": "average"}),
    (P.insert_identity_layer, (None,), "after", "None"),
    (P.insert_identity_layer, ("fc1", 7), "name", "7"),
    (P.insert_identity_layer, ("fc1", "my layer"), "name", "'my layer'"),
    (P.add_heads, ("attn", 1.5), "n", "1.5"),
    (P.add_heads, ("attn", True), "n", "True"),
    (P.add_heads, ("attn", 0), "n", "0"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: f"{c[0].__name__}-{c[2]}={c[3]}")
def test_a_wrong_argument_is_an_error_naming_it_and_its_value(traced, case):
    fn, args, arg, shown = case[:4]
    kwargs = case[4] if len(case) > 4 else {}
    before = {k: v.clone() for k, v in traced.model.state_dict().items()}
    with pytest.raises((TypeError, ValueError)) as info:
        fn(traced, *args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, PassError), f"{type(info.value).__name__}: {message}"
    assert arg in message and shown in message, message
    assert all(torch.equal(before[k], v) for k, v in traced.model.state_dict().items())


def test_a_wrong_type_is_a_type_error_too(traced):
    # Code that catches TypeError for a wrong type keeps working; PassError for any refusal.
    with pytest.raises(TypeError, match=r"widen\('fc1'\): size='12' \(str\): must be an integer"):
        P.widen(traced, "fc1", "12")


def test_numpy_integers_are_integers(traced):
    gm = P.widen(traced, "fc1", np.int64(10))
    assert tuple(gm.fc1.weight.shape) == (10, 4)
    gm = P.prune_units(traced, "fc1", np.array([0, 3, 5]))
    assert tuple(gm.fc1.weight.shape) == (3, 4)
    gm = P.prune_units(traced, "fc1", torch.tensor([1, 2]))
    assert tuple(gm.fc1.weight.shape) == (2, 4)
    gm = P.add_features(traced, "obs", ["armor"], at=np.int32(1))
    assert gm.meta["fxsurgery"]["features"]["obs"].names == ("hp", "armor", "mana", "x", "y")


def test_features_that_are_not_a_dict_are_refused():
    with pytest.raises(fs.InputError, match="features must be a dict .* got list"):
        fs.trace(TwoLayer(), (torch.randn(1, 4),), [fs.Features(["a", "b", "c", "d"])])


# the map's element lookups ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def imap(traced):
    return fs.interaction_map(traced)


@pytest.mark.parametrize("index, error, pattern", [
    ((9, 0), IndexError, r"index 9 is out of range for axis 0 of fc1.weight \(shape \(8, 4\)\): valid are -8..7"),
    ((0, -5), IndexError, r"index -5 is out of range for axis 1 of fc1.weight \(shape \(8, 4\)\)"),
    ((0,), IndexError, r"fc1.weight \(shape \(8, 4\)\) has 2 axes; the index \(0,\) gives 1"),
    ((0, 1, 2), IndexError, r"has 2 axes; the index \(0, 1, 2\) gives 3"),
    ((0.0, 1), TypeError, r"index into fc1.weight \(shape \(8, 4\)\) must be a tuple of integers, got \(0.0, 1\)"),
    ((True, 1), TypeError, r"must be a tuple of integers"),
])
def test_an_element_index_that_does_not_fit_names_the_parameter_and_its_shape(imap, index, error, pattern):
    with pytest.raises(error, match=pattern):
        imap.key_of("fc1.weight", index)
    with pytest.raises(error, match=pattern):
        imap.element_labels("fc1.weight", index)


def test_an_element_index_may_be_numpy_or_negative(imap):
    assert imap.key_of("fc1.weight", (np.int64(7), -1)) == imap.key_of("fc1.weight", (7, 3))
    assert imap.key_of("fc1.bias", 7) == imap.key_of("fc1.bias", (7,))


def test_an_unknown_parameter_lists_close_names(imap):
    with pytest.raises(KeyError, match=r"no parameter or buffer named 'fc1.wieght'; did you mean \['fc1.weight'"):
        imap.key_of("fc1.wieght", (0, 0))


# noise -----------------------------------------------------------------------------------------

def test_a_chain_of_passes_on_a_small_model_emits_no_warning(traced):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = P.add_features(traced, "obs", ["armor"])
        gm = P.remove_features(gm, "obs", ["hp"])
        gm = P.reorder_features(gm, "obs", ["y", "x", "mana", "armor"])
        gm = P.add_categories(gm, "tok", ["d"])
        gm = P.widen(gm, "fc1", 10)
        gm = P.prune_units(gm, "fc1", [0, 2, 4])
        gm = P.insert_identity_layer(gm, "fc1")
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
