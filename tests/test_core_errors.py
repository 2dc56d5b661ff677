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


# categories against the tables they index ---------------------------------------------------------

class Lookups(nn.Module):
    """An index input reaching a table the way `how` says (through a reshape, a slice...)."""

    def __init__(self, how, rows=10):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(rows, 4)
        self.table = nn.Parameter(torch.randn(rows, 4))

    def forward(self, tok):
        if self.how == "embedding":
            return self.emb(tok.reshape(-1))
        if self.how == "index_select":
            return torch.index_select(self.table, 0, tok[:, 0])
        if self.how == "gather":
            return torch.gather(self.table, 0, tok[:, :1].expand(-1, 4))
        if self.how == "index":
            return self.table[tok.flatten()]
        return nn.functional.one_hot(tok, 10).float()


@pytest.mark.parametrize("how, table", [("embedding", "parameter 'emb.weight'"), ("index_select", "parameter 'table'"),
                                        ("gather", "parameter 'table'"), ("index", "parameter 'table'"),
                                        ("one_hot", "a one_hot")])
@pytest.mark.parametrize("n", [5, 12])
def test_categories_fewer_or_more_than_the_rows_of_a_table_they_index(how, table, n):
    tok = torch.tensor([[1, 9], [3, 4]])
    with pytest.raises(fs.InputError, match=rf"input 'tok' is described by {n} categories, but it indexes tables "
                                            rf"of another size: {table} \(at node %\w+\) has 10 rows"):
        fs.trace(Lookups(how), (tok,), {"tok": fs.Categories([f"c{i}" for i in range(n)])})
    fs.trace(Lookups(how), (tok,), {"tok": fs.Categories([f"c{i}" for i in range(10)])})   # one per row: fine


def test_every_table_an_input_indexes_is_checked():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(6, 3), nn.Embedding(8, 3)

        def forward(self, tok):
            return self.a(tok) + self.b(tok)

    with pytest.raises(fs.InputError, match=r"8 categories, .* parameter 'a.weight' \(at node %embedding\) has 6 rows"):
        fs.trace(Two(), (torch.tensor([[1, 2]]),), {"tok": fs.Categories([f"c{i}" for i in range(8)])})


def test_an_example_value_that_is_no_category():
    class Mod(nn.Module):    # the remainder hides the table from the check: the values are checked
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, tok):
            return self.emb(tok % 10)

    with pytest.raises(fs.InputError, match=r"input 'tok' holds the value 12, but its 10 categories are the values 0..9"):
        fs.trace(Mod(), (torch.tensor([[1, 12]]),), {"tok": fs.Categories([f"c{i}" for i in range(10)])})


# Hugging Face models with their default configuration ----------------------------------------------

def _default_config_model(arch: str):
    """A tiny model built from a configuration left at its default use_cache=True."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(config)
    assert model.config.use_cache is True
    inputs = {"input_ids": torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))}
    return model.eval(), inputs, {"input_ids": fs.Categories([f"t{i}" for i in range(20)])}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_hugging_face_model_with_its_default_cache_is_captured_and_left_as_it_was(arch):
    model, inputs, features = _default_config_model(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = fs.trace(model, inputs, features)
    assert model.config.use_cache is True                        # the user's configuration is unchanged
    assert [n for n in traced.notes if "use_cache was switched off" in n], traced.notes
    assert not [w for w in caught if "cache" in str(w.message).lower()]   # said once, in the notes
    out = traced.call(model, list(traced.inputs))                # runs as it was captured: no cache object
    assert getattr(out, "past_key_values", None) is None and model.config.use_cache is True
    assert "lm_head.weight" in fs.interaction_map(traced).names or "transformer.wte.weight" in traced.state_shapes()


def test_the_cache_setting_is_restored_when_the_capture_fails():
    model, inputs, features = _default_config_model("gpt2")
    with pytest.raises(fs.CaptureError):
        fs.trace(model, {"input_ids": inputs["input_ids"].float()})   # an embedding of floats: export fails
    assert model.config.use_cache is True


def test_a_pass_on_a_hugging_face_model_with_its_default_cache():
    model, inputs, features = _default_config_model("gpt2")
    gm = fs.passes.add_categories(fs.trace(model, inputs, features), "input_ids", ["<new>"])
    p = gm.meta["fxsurgery"].plan
    assert p.preserves_function and fs.verify(p).max <= 1e-5
    assert model.config.use_cache is True
