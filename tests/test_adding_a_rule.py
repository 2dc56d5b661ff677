"""The README's guide to adding a rule, followed step by step (on a test registry, so that the
global table stays as the proofs know it; tests/test_readme_snippets.py runs the guide itself,
on the global table, in a fresh interpreter), and the two ways it used to register nothing."""
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.rules import RuleRegistry, ops
from fxsurgery.rules.helpers import elementwise
from helpers import element


@torch.library.custom_op("fxsurgery_guide::my_activation", mutates_args=())
def my_activation(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@my_activation.register_fake
def _(x):
    return torch.empty_like(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(my_activation(x))


def test_a_rule_written_as_the_guide_says_replaces_the_fallback():
    registry = fs.REGISTRY.copy("guide")

    @registry.register(*ops("fxsurgery_guide::my_activation"), family="elementwise")  # the guide's line
    def my_activation_rule(ctx, x):
        return elementwise(ctx, x)

    op = torch.ops.fxsurgery_guide.my_activation.default
    assert op in registry and op not in fs.REGISTRY
    traced = fs.trace(Net(), (torch.randn(1, 2),), {"x": fs.Features(["a", "b"])})
    imap = fs.interaction_map(traced, registry=registry)
    assert element(imap, "fc.weight", (0, 1)) == {"x:b"}  # exact, where the fallback says {a, b}
    assert not imap.notes


def test_without_the_rule_the_operator_falls_back_and_says_so():
    # What the guide's registration changes: the same model on the table without it.
    traced = fs.trace(Net(), (torch.randn(1, 2),), {"x": fs.Features(["a", "b"])})
    with pytest.warns(fs.UnknownOperatorWarning, match="fxsurgery_guide.my_activation"):
        imap = fs.interaction_map(traced)
    assert element(imap, "fc.weight", (0, 1)) == {"x:a", "x:b"}


@pytest.mark.parametrize("name, pattern", [
    ("my_activation.default", r"ops\('my_activation.default'\): no operator aten::my_activation"),
    ("relu.defualt", r"operator aten::relu has no overload 'defualt'; its overloads are \[.*'default'"),
    ("rleu", r"no operator aten::rleu .*close names: \['relu'"),
    ("fxsurgery_guide::my_activaton", r"no operator fxsurgery_guide::my_activaton.*close names: \['my_activation'\]"),
    ("nolib_here::op", r"nothing is defined in namespace 'nolib_here' yet .*torch.library.custom_op"),
])
def test_a_name_that_does_not_resolve_is_an_error_naming_it(name, pattern):
    with pytest.raises(ValueError, match=pattern):
        ops(name)


def test_names_resolve_in_aten_or_a_namespace_with_default_overload():
    assert ops("relu", "add.Tensor", "fxsurgery_guide::my_activation") == [
        torch.ops.aten.relu.default, torch.ops.aten.add.Tensor, torch.ops.fxsurgery_guide.my_activation.default]


def test_a_registration_for_no_operator_is_an_error():
    registry = RuleRegistry("empty")
    with pytest.raises(ValueError, match="register\\(\\) was given no operator"):
        registry.register(family="elementwise")
    with pytest.raises(TypeError, match="overload packet; register aten.relu.default"):
        registry.register(torch.ops.aten.relu, family="elementwise")
    with pytest.raises(TypeError, match="got 'relu.default'; resolve names with"):
        registry.register("relu.default", family="elementwise")
    assert len(registry) == 0
