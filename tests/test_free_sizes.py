"""Free sizes: `fs.trace(..., dynamic=True)` captures once with torch.export dynamic shapes; the
analyses see the concretised static graph (the golden maps and plans are equal under it, see
test_engine_golden.py), and a rewriting pass builds a module that runs at every free size
(batch, sequence length, image size) without capturing the old model again."""
import sympy
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.passes import free_sizes as F

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _logits(out):
    return getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)


@pytest.fixture(scope="module")
def R():
    pytest.importorskip("transformers")
    import real_models
    return real_models


def _runs_like_the_old_model(gm, old, make_inputs, sizes, vocab_rows=None):
    for size in sizes:
        x = make_inputs(*size)
        got, want = _logits(gm(**x)), _logits(old(**x))
        if vocab_rows is not None:
            got = got[..., :vocab_rows]
        assert got.shape == want.shape, size
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


# --- the capture --------------------------------------------------------------------------

def test_a_free_size_capture_names_its_free_and_fixed_sizes(R):
    b = R.gpt2()
    t = fs.trace(b.model, b.inputs, b.features, dynamic=True)
    assert t.sizes is not None
    assert t.sizes.free(t.input_names) == ["input_ids[0]", "input_ids[1]"]
    # input_ids and attention_mask share both sizes: one symbol each, every axis recorded.
    assert sorted(len(v) for v in t.sizes.axes.values()) == [2, 2]
    assert t.sizes.fixed == []                   # attention_mask's axes are free too, not fixed
    assert t.sizes.literals                      # views and expands that spelled B and T
    # The analysis graph is static: no symbolic size is left in any value's metadata.
    for node in t.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(s, int) for s in val.shape), node.name
        assert node.target is not torch.ops.aten.sym_size.int, node.name


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)

    def forward(self, obs):
        return self.rnn(self.fc(obs))[0].sum(1)


def test_sizes_the_graph_or_the_example_fixes_are_named():
    t = fs.trace(LSTMHead(), {"obs": torch.randn(1, 3, 4)}, dynamic=True)
    fixed = {(name, axis): why for name, axis, _, why in t.sizes.fixed}
    assert "the example has 1 position" in fixed[("obs", 0)]
    assert fixed[("obs", 1)] == "the graph fixes it"         # the LSTM's sequence length
    assert ("obs", 2) in fixed                                # the Linear's features


def test_a_capture_that_fails_with_free_sizes_falls_back_to_a_static_one(monkeypatch):
    real = torch.export.export

    def no_dynamic(*args, **kwargs):
        if kwargs.get("dynamic_shapes") is not None:
            raise RuntimeError("planted")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", no_dynamic)
    t = fs.trace(LSTMHead(), {"obs": torch.randn(2, 3, 4)}, dynamic=True)
    assert t.sizes is None
    assert any("could not capture with free sizes" in n and "planted" in n for n in t.notes)


# --- the rewritten module -----------------------------------------------------------------

@pytest.mark.parametrize("change", ["widen", "tokens", "heads"])
def test_a_rewritten_gpt2_runs_at_every_batch_and_length(R, change):
    b = R.gpt2(attn="sdpa")
    t = fs.trace(b.model, b.inputs, b.features, dynamic=True)
    gm = {"widen": lambda: fs.passes.widen(t, "transformer.h.0.mlp.c_fc", by=8),
          "tokens": lambda: fs.passes.add_categories(t, "input_ids", ["<a>", "<b>"]),
          "heads": lambda: fs.passes.add_heads(t, "transformer.h.1.attn", 2)}[change]()
    rec = gm.meta["fxsurgery"]
    assert rec.sizes.startswith("free (input_ids[0], input_ids[1]"), rec.sizes
    assert rec.batch.startswith("free"), rec.batch
    assert rec.plan.preserves_function

    def inputs(batch, seq):
        return {"input_ids": R.tokens(len(R.VOCAB), batch, seq, seed=batch + seq),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    _runs_like_the_old_model(gm, b.model, inputs, [(2, 8), (3, 5), (1, 12), (4, 16)], len(R.VOCAB))


def test_a_rewritten_llama_runs_at_another_length(R):
    b = R.llama(attn="sdpa")
    t = fs.trace(b.model, b.inputs, b.features, dynamic=True)
    gm = fs.passes.add_heads(t, "model.layers.0.self_attn", 2)
    assert gm.meta["fxsurgery"].sizes.startswith("free"), gm.meta["fxsurgery"].sizes

    def inputs(batch, seq):
        return {"input_ids": R.tokens(len(R.VOCAB), batch, seq, seed=3), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    _runs_like_the_old_model(gm, b.model, inputs, [(3, 5), (1, 13)])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, image):
        h = torch.relu(self.conv(image))
        return self.head(h.flatten(2).mean(2))


def test_a_widened_conv_net_runs_at_another_image_size():
    torch.manual_seed(0)
    m = ConvNet().eval()
    t = fs.trace(m, {"image": torch.randn(2, 3, 10, 10)}, {"image": fs.Features(["r", "g", "b"], dim=1)},
                 dynamic=True)
    assert t.sizes.free(t.input_names) == ["image[0]", "image[2]", "image[3]"]
    gm = fs.passes.widen(t, "conv", by=4)
    assert gm.meta["fxsurgery"].sizes.startswith("free"), gm.meta["fxsurgery"].sizes
    for shape in [(3, 3, 7, 12), (1, 3, 16, 16)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), m(x), rtol=TOL, atol=TOL)


def test_a_pass_on_a_free_size_capture_does_not_capture_the_old_model_again(monkeypatch, R):
    b = R.gpt2()
    calls = []
    real = torch.export.export

    def counting(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    for dynamic, old_captures in [(True, 0), (False, 1)]:
        t = fs.trace(b.model, b.inputs, b.features, dynamic=dynamic)
        calls.clear()
        fs.passes.widen(t, "transformer.h.0.mlp.c_fc", by=8)
        # The new module is traced once for planning; a static capture of the old model needs
        # one more capture (at batch + 1) to free the batch size.
        assert calls.count("GPT2LMHeadModel") == old_captures, (dynamic, calls)
        assert calls.count("GraphModule") == 1, (dynamic, calls)


def test_the_check_at_other_sizes_catches_a_literal_left_fixed(monkeypatch, R):
    """Planted bug: the size expressions written as their example values. The module would run
    at the example's sizes only; the check at grown sizes sees it and keeps the sizes fixed."""
    b = R.gpt2()
    t = fs.trace(b.model, b.inputs, b.features, dynamic=True)
    real = F._emit
    monkeypatch.setattr(F, "_emit", lambda graph, expr, sizes: int(F.size_value(expr, t.sizes.hints))
                        if not expr.is_Integer else real(graph, expr, sizes))
    gm = fs.passes.widen(t, "transformer.h.0.mlp.c_fc", by=8)
    assert gm.meta["fxsurgery"].sizes.startswith("fixed (with input_ids[0], input_ids[1] free the module fails")
    x = b.inputs
    torch.testing.assert_close(_logits(gm(**x)), _logits(b.model(**x)), rtol=TOL, atol=TOL)   # still right at 2 x 8


# --- a literal the pass changed ------------------------------------------------------------

def test_a_changed_literal_keeps_its_size_rule():
    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    hints = {"s0": 2, "s1": 8}
    assert F._adjusted(64 * s0 * s1, 1024, 1536, hints) == 96 * s0 * s1     # a width inside B*T*D
    assert F._adjusted(s1 + 1, 9, 11, hints) == s1 + 3                     # two more tokens
    assert F._adjusted(s0 * s1, 16, 16, hints) == s0 * s1                  # unchanged
    assert F._adjusted(64 * s0, 128, 129, hints) is None                   # not a multiple: stays fixed
