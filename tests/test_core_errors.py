"""Bad input gets a clear error naming what is wrong; unknown operators fall back soundly."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.rules import RuleRegistry
from helpers import element, names


class Lin(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.fc = nn.Linear(n, 2)

    def forward(self, obs):
        return self.fc(obs)


def test_feature_list_whose_length_does_not_match_the_axis():
    with pytest.raises(fs.InputError, match=r"'obs' name 2 features, but axis -1 .* size 3"):
        fs.trace(Lin(), (torch.randn(1, 3),), {"obs": fs.Features(["a", "b"])})


def test_feature_dim_out_of_range():
    with pytest.raises(fs.InputError, match="'obs' label dim 4"):
        fs.trace(Lin(), (torch.randn(1, 3),), {"obs": fs.Features(["a", "b", "c"], dim=4)})


def test_duplicate_labels():
    with pytest.raises(ValueError, match="duplicate label 'a' at positions 0 and 2"):
        fs.Features(["a", "b", "a"])
    with pytest.raises(ValueError, match="duplicate label"):
        fs.Categories(["x", "x"])


def test_features_for_an_argument_the_model_does_not_have():
    with pytest.raises(fs.InputError, match=r"\['state'\], which is not an input of Lin; its tensor inputs are \['obs'\]"):
        fs.trace(Lin(), (torch.randn(1, 3),), {"state": fs.Features(["a", "b", "c"])})


def test_an_input_that_is_not_a_tensor():
    with pytest.raises(fs.InputError, match="example input 0 is a list, not a tensor"):
        fs.trace(Lin(), ([1.0, 2.0, 3.0],))


def test_categories_on_a_float_input():
    with pytest.raises(fs.InputError, match="'obs' is described by Categories but holds torch.float32"):
        fs.trace(Lin(), (torch.randn(1, 3),), {"obs": fs.Categories(["a", "b", "c"])})


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


def test_a_model_that_cannot_be_captured_says_why_and_what_to_try():
    with pytest.raises(fs.CaptureError, match=r"could not capture Branchy: .*Try: ") as err:
        fs.trace(Branchy(), (torch.randn(3),))
    assert err.value.__cause__ is not None  # the exporter's own error is kept


def test_not_a_module():
    with pytest.raises(fs.InputError, match="expects a torch.nn.Module"):
        fs.trace(lambda x: x, (torch.randn(3),))


class Kron(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.fc(torch.kron(a, b))


def test_operator_without_rule_is_run_through_its_decomposition():
    traced = fs.trace(Kron(), (torch.randn(1, 2), torch.randn(1, 2)),
                      {"a": fs.Features(["a0", "a1"]), "b": fs.Features(["b0", "b1"])})
    assert any("kron" in str(n.target) for n in traced.graph.nodes)
    imap = fs.interaction_map(traced)
    # kron(a, b)[0, 0] = a0 * b0: exact, through aten.kron's decomposition.
    assert element(imap, "fc.weight", (0, 0)) == {"a:a0", "b:b0"}
    assert element(imap, "fc.weight", (0, 3)) == {"a:a1", "b:b1"}
    assert any("aten.kron" in n and "decomposition" in n for n in imap.notes)


@torch.library.custom_op("fxsurgery_test::pairsum", mutates_args=())
def pairsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b.flip(-1)


@pairsum.register_fake
def _(a, b):
    return torch.empty_like(a)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, a, b):
        return self.fc(pairsum(a, b))


def test_operator_without_rule_or_decomposition_falls_back_soundly_and_warns():
    traced = fs.trace(Custom(), (torch.randn(1, 2), torch.randn(1, 2)),
                      {"a": fs.Features(["a0", "a1"]), "b": fs.Features(["b0", "b1"])})
    with pytest.warns(fs.UnknownOperatorWarning, match=r"no label rule for fxsurgery_test.pairsum.default at node %pairsum"):
        imap = fs.interaction_map(traced)
    # Sound: every element depends on everything the operands depend on (a superset of the
    # exact {a0, b1} / {a1, b0}).
    assert element(imap, "fc.weight", (0, 0)) == {"a:a0", "a:a1", "b:b0", "b:b1"}
    assert any("pairsum" in n for n in imap.notes)


def test_rule_returning_the_wrong_shape_is_caught_by_the_driver():
    registry = fs.REGISTRY.copy("broken-shape")
    from fxsurgery.label_tensor import LabelTensor
    registry.replace(torch.ops.aten.relu.default, lambda ctx, x: LabelTensor.empty((7,)))

    class R(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    with pytest.raises(fs.RuleError, match=r"aten.relu.default returned labels of shape \(7,\).*node %relu"):
        fs.interaction_map(fs.trace(R(), (torch.randn(2, 3),)), registry=registry)


def test_duplicate_rule_registration_is_refused():
    registry = RuleRegistry("t")
    registry.add(torch.ops.aten.relu.default, lambda ctx, x: x, "elementwise")
    with pytest.raises(ValueError, match="already registered"):
        registry.add(torch.ops.aten.relu.default, lambda ctx, x: x, "elementwise")
    with pytest.raises(TypeError, match="keyed by ATen overload"):
        registry.add(torch.relu, lambda ctx, x: x, "elementwise")


def test_unknown_label_and_parameter_names_are_explained():
    imap = fs.interaction_map(fs.trace(Lin(), (torch.randn(1, 3),), {"obs": fs.Features(["a", "b", "c"])}))
    with pytest.raises(KeyError, match="no label 'zz'; labels are"):
        imap.params_for("zz")
    with pytest.raises(KeyError, match="no parameter or buffer named 'fc.nope'"):
        imap.labels_of("fc.nope")
