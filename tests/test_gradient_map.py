"""The gradient mapping (autodiff alone, no label rule) against the boolean mapping (the rules).

At generic points the two are equal; the gradient map is contained in the boolean map
everywhere (the rules over-approximate soundly), and strictly where a value is zero by
coincidence. Those coincidences are named here, one test each, as data with their reason.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings

import fxsurgery as fs
from fxsurgery.gradient_map import (GradientMapError, dependence_difference, gradient_dependence,
                                    gradient_interaction_map)
from fxsurgery.label_tensor import LabelTensor
from fxsurgery.testing import models

aten = torch.ops.aten

pytestmark = [pytest.mark.filterwarnings("ignore:.*_flat_weights.*"),
              pytest.mark.filterwarnings("ignore::fxsurgery.UnknownOperatorWarning")]


# models ---------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


class Embed(nn.Module):
    """Two Categories inputs, one moved (sliced, reshaped) before its lookup, and a float input."""
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(6, 4), nn.Embedding(3, 4)
        self.fc = nn.Linear(4 + 2, 2)

    def forward(self, tok, kind, x):
        h = self.tok(tok[:, 1:].reshape(-1, 3)) + self.pos(kind).unsqueeze(1)
        return self.fc(torch.cat([h.mean(1), x], -1))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, img):
        return self.fc(self.bn(self.conv(img)).relu().mean((2, 3)))


class RNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.fc = nn.Embedding(5, 3), nn.LSTM(3 + 2, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, tok, obs):
        h, _ = self.lstm(torch.cat([self.emb(tok), obs], -1))
        return self.fc(h[:, -1])


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 8), nn.Linear(8, d)

    def forward(self, x):
        h = self.ln1(x + self.mha(x, x, x, need_weights=False)[0])
        return self.ln2(h + self.ff2(F.gelu(self.ff1(h))))


ABC = {"x": fs.Features(["a", "b", "c"])}

CASES = {
    "mlp_layernorm": lambda: (MLP(), (torch.randn(2, 4),), {"x": fs.Features(["a", "b", "c", "d"])}),
    "embedding_categories": lambda: (
        Embed(), (torch.randint(0, 6, (2, 4)), torch.randint(0, 3, (2,)), torch.randn(2, 2)),
        {"tok": fs.Categories(["<pad>", "the", "a", "cat", "dog", "<eos>"]),
         "kind": fs.Categories(["p", "q", "r"]), "x": fs.Features(["u", "v"])}),
    "cnn_batchnorm_eval": lambda: (CNN().eval(), (torch.randn(2, 3, 6, 6),),
                                   {"img": fs.Features(["r", "g", "b"], dim=1)}),
    "cnn_batchnorm_train": lambda: (CNN().train(), (torch.randn(2, 3, 6, 6),),
                                    {"img": fs.Features(["r", "g", "b"], dim=1)}),
    "lstm": lambda: (RNN(), (torch.randint(0, 5, (2, 3)), torch.randn(2, 3, 2)),
                     {"tok": fs.Categories(list("abcde")), "obs": fs.Features(["hp", "mana"])}),
    "transformer_block": lambda: (Block().eval(), (torch.randn(2, 3, 4),),
                                  {"x": fs.Features(["a", "b", "c", "d"])}),
}


def _trace(case):
    model, inputs, features = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fs.trace(model, inputs, features)


class TwoStreams(nn.Module):
    """Tokens of two inputs stacked along a token axis, then a LayerNorm over channels."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.ln = nn.Linear(2, 4), nn.Linear(3, 4), nn.LayerNorm(4)

    def forward(self, x, y):
        return self.ln(torch.stack([self.a(x), self.b(y)], 1))


CASES["layernorm_over_stacked_streams"] = lambda: (
    TwoStreams(), {"x": torch.randn(2, 2), "y": torch.randn(2, 3)},
    {"x": fs.Features(["p", "q"]), "y": fs.Features(["r", "s", "t"])})



class SpatialBatchNorm(nn.Module):
    """Labels that vary over space but not over channels, through a batch norm."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(3).eval(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(x))


CASES["batchnorm_over_spatial_labels"] = lambda: (
    SpatialBatchNorm().eval(), {"x": torch.randn(2, 3, 4)},
    {"x": fs.Features(["s0", "s1", "s2", "s3"], dim=2)})


# equality at generic points -------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_map_equals_boolean_map(case):
    t = _trace(case)
    boolean, gradient = fs.interaction_map(t), gradient_interaction_map(t, trials=4, seed=0)
    assert gradient.source == "gradient" and all(e.key_meets is None for e in gradient.entries.values())
    assert set(gradient.entries) == set(boolean.entries)
    assert gradient == boolean, f"{case}:\n{fs.compare(gradient, boolean)}\n{gradient.notes}"


@pytest.mark.parametrize("case", ["mlp_layernorm", "embedding_categories", "transformer_block", "lstm"])
def test_gradient_dependence_equals_boolean_dependence(case):
    # Every node's value, not only the parameters: D(v) from forward derivatives against the
    # "deps" label tensors the boolean mapping leaves in node.meta. Many trials, because with
    # few an element after a ReLU may sit on its zero branch at every point (a coincidence).
    t = _trace(case)
    boolean = fs.interaction_map(t)
    dep = gradient_dependence(t, trials=12, seed=1)
    assert len(dep.masks) > 3
    assert dependence_difference(dep, t, boolean.pool) == []


def test_labels_and_entries_are_the_boolean_maps():
    t = _trace("embedding_categories")
    g = gradient_interaction_map(t)
    assert fs.Label("category", "tok", "cat", 3) in g.pool.labels
    assert g.labels_of("tok.weight") == {fs.Label("category", "tok", n, i)
                                         for i, n in enumerate(["<pad>", "the", "a", "cat", "dog", "<eos>"])}
    # Row c of an embedding meets category c (the one-hot coordinate c), nothing else.
    assert g.element_labels("tok.weight", (3, 0)) == {fs.Label("category", "tok", "cat", 3)}
    assert g.element_labels("pos.weight", (1, 2)) == {fs.Label("category", "kind", "q", 1)}
    assert g.params_for("u")["fc.weight"][:, 4].all() and not g.params_for("u")["fc.weight"][:, :4].any()


def test_meta_device_model():
    with torch.device("meta"):
        model = MLP()
    t = fs.trace(model, (torch.empty(2, 4, device="meta"),), {"x": fs.Features(["a", "b", "c", "d"])})
    g, b = gradient_interaction_map(t), fs.interaction_map(t)
    assert g == b, str(fs.compare(g, b))


def test_tied_weights_keep_their_aliases():
    from helpers import Tied
    t = fs.trace(Tied(), (torch.randint(0, 4, (2, 5)),), {"tok": fs.Categories(list("wxyz"))})
    g, b = gradient_interaction_map(t), fs.interaction_map(t)
    assert g == b, str(fs.compare(g, b))
    assert set(g.entries["emb.weight"].aliases) == {"emb.weight", "out.weight"}
    assert g.labels_of("out.weight") == g.labels_of("emb.weight")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True, phases=[Phase.generate])  # fixed examples, no shrinking (time)
@given(models(max_layers=3))
def test_gradient_map_is_contained_in_boolean_map(built):
    # Soundness on random architectures: whatever a rule says, autodiff never finds a
    # meeting the rules missed (equality is not asserted: max-pooling and a zero initial
    # recurrent state are coincidences, see below).
    model, inputs, features = built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = fs.trace(model, inputs, features)
        boolean = fs.interaction_map(t)
    gradient = gradient_interaction_map(t, trials=3)
    assert gradient.issubset(boolean), str(fs.compare(gradient, boolean, subset=True))


# named divergences: zero by coincidence, the gradient map is strictly smaller ---------------
def _strict_subset(model, inputs, features, **kw):
    t = fs.trace(model, inputs, features)
    boolean, gradient = fs.interaction_map(t), gradient_interaction_map(t, **kw)
    assert gradient.issubset(boolean), str(fs.compare(gradient, boolean, subset=True))
    assert gradient != boolean
    return gradient, boolean


def test_divergence_exact_cancellation():
    # x - x is exactly zero: fc never sees x; the rule for sub does not compare its operands.
    class Cancel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x - x)

    g, b = _strict_subset(Cancel(), (torch.randn(2, 3),), ABC)
    assert g.labels_of("fc.weight") == set() and b.labels_of("fc.weight") == set(map(b.resolve, "abc"))


def test_divergence_explicit_zero_weight_row():
    # The gradient map draws random parameters, so a zero must be in the graph itself: a
    # constant zero row concatenated to a weight. Hidden unit 2 is always 0, so the next
    # layer's column 2 meets nothing; the boolean mapping only knows the row is label-free.
    class ZeroRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(F.linear(x, torch.cat([self.w, torch.zeros(1, 3)])))

    g, b = _strict_subset(ZeroRow(), (torch.randn(2, 3),), ABC)
    assert not g.params_for("a")["fc.weight"][:, 2].any()
    assert g.params_for("a")["fc.weight"][:, :2].all()
    assert b.params_for("a")["fc.weight"].all()


def test_divergence_inactive_relu_branch():
    # relu(h - 1000) is never positive at random points: everything after it meets nothing.
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x) - 1000.0))

    g, b = _strict_subset(Dead(), (torch.randn(2, 3),), ABC)
    assert g.labels_of("fc2.weight") == set() and len(b.labels_of("fc2.weight")) == 3
    assert g.labels_of("fc1.weight") == b.labels_of("fc1.weight")


def test_divergence_max_pool_over_labelled_entities():
    # Entities are labelled along the pooled axis: at one point, each pooled unit comes from
    # one entity, so with a single trial fc meets one entity's label per column. With enough
    # trials every entity wins somewhere and the maps agree.
    class MaxEntities(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.fc = nn.Linear(2, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.enc(x).max(dim=1).values)

    args = (MaxEntities(), (torch.randn(1, 3, 2),), {"x": fs.Features(["p", "q", "r"], dim=1)})
    g, b = _strict_subset(*args, trials=1)
    for j in range(4):
        assert len(g.element_labels("fc.weight", (0, j))) == 1
    t = fs.trace(*args)
    assert gradient_interaction_map(t, trials=24) == fs.interaction_map(t)


def test_divergence_zero_initial_state_single_step():
    # One LSTM step from h0 = c0 = 0: W_hh multiplies zeros, and the forget gate (rows H..2H)
    # scales c0 = 0. Over three steps the maps agree (test_gradient_map_equals_boolean_map).
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 2, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    g, b = _strict_subset(Step(), (torch.randn(2, 1, 3),), ABC)
    assert g.labels_of("lstm.weight_hh_l0") == set()
    forget = g.params_for("a")["lstm.weight_ih_l0"]
    assert not forget[2:4].any() and forget[:2].all() and forget[4:].all()


# a wrong rule is caught -----------------------------------------------------------------
def _forgets_multiplicand(ctx, a, b, *rest, **kwargs):
    """aten.mul.Tensor, broken: the result depends on the multiplier only, and a parameter
    operand meets nothing."""
    shape = ctx.out_shape()
    ids = a.ids if isinstance(a, LabelTensor) else torch.zeros((), dtype=torch.int64)
    return LabelTensor(ids.reshape([1] * (len(shape) - ids.dim()) + list(ids.shape)), shape)


def test_broken_rule_is_caught():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x, y):
            return self.fc((x * y) * self.gain)

    t = fs.trace(Gated(), {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}, ABC)
    broken = fs.REGISTRY.copy("broken")
    broken.replace(aten.mul.Tensor, _forgets_multiplicand)
    gradient = gradient_interaction_map(t)
    assert gradient == fs.interaction_map(t)
    wrong = fs.interaction_map(t, registry=broken)
    diff = fs.compare(gradient, wrong, subset=True)
    assert diff, "the comparison did not see the broken rule"
    assert not gradient.issubset(wrong)
    missed = {(name, str(lab)) for name, _, only_gradient, _ in diff.rows for lab in only_gradient}
    assert ("fc.weight", "y") in missed          # the forgotten multiplicand's label
    assert ("gain", "x:a") in missed             # the parameter operand that met nothing


# bad input ------------------------------------------------------------------------------
def test_integer_input_without_categories_is_refused():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, tok):
            return self.emb(tok)

    t = fs.trace(Lookup(), (torch.randint(0, 5, (2, 4)),))
    with pytest.raises(GradientMapError, match=r"integer input 'tok' reaches aten.embedding at node %embedding"
                                               r".*fs.Categories"):
        gradient_interaction_map(t)


def test_non_movement_index_of_categories_is_refused():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3)

        def forward(self, tok):
            return self.emb(tok + 1)

    t = fs.trace(Shifted(), (torch.randint(0, 5, (2, 4)),), {"tok": fs.Categories(list("abcde"))})
    with pytest.raises(GradientMapError, match=r"aten.embedding at node %embedding.*Categories input 'tok' "
                                               r"by aten.add"):
        gradient_interaction_map(t)


def test_non_tensor_output_is_refused():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), 3

    t = fs.trace(Pair(), (torch.randn(2, 3),))
    with pytest.raises(GradientMapError, match=r"model output 1 is int 3.*not a tensor"):
        gradient_interaction_map(t)


def test_operator_without_forward_derivative_is_named():
    class Dist(nn.Module):
        def __init__(self):
            super().__init__()
            self.centres = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.cdist(x, self.centres)

    t = fs.trace(Dist(), (torch.randn(5, 3),), ABC)
    with pytest.raises(GradientMapError, match=r"aten.cdist at node %cdist could not be differentiated"):
        gradient_interaction_map(t)
