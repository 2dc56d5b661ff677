"""fs.hf.resize: a transformers model grown through its config, the same class back, the
weights carried over, the function preserved.

Every preservation claim is checked twice: by the plan's own `fs.verify` and by this file's
arithmetic (old and new model on the same token ids, the old vocabulary's logits compared).
The old models are perturbed away from their initialisation first (norm weights not one,
biases not zero), so that a new layer is the identity only if resize made it one.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, ViTConfig, ViTForImageClassification)

import fxsurgery as fs  # noqa: E402

transformers.logging.set_verbosity_error()
layers_module = sys.modules["fxsurgery.hf.layers"]
VOCAB = 40


def _trained(model, seed=0):
    """The model with every parameter moved off its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def gpt2(layers=2):
    torch.manual_seed(0)
    return _trained(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=layers,
                                               n_head=4)))


def llama(layers=2):
    torch.manual_seed(0)
    return _trained(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=24)))


def qwen2(layers=2):
    torch.manual_seed(0)
    return _trained(Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=24)))


def bert(layers=2):
    torch.manual_seed(0)
    return _trained(BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                               num_attention_heads=4, intermediate_size=48,
                                               max_position_embeddings=24)))


def vit(layers=2):
    torch.manual_seed(0)
    return _trained(ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=layers,
                                                        num_attention_heads=4, intermediate_size=48, image_size=16,
                                                        patch_size=8, num_labels=5)))


def _deviation(old, new, batch=3, seq=11, seed=1):
    """Largest relative deviation of the new model's outputs from the old one's, at a batch
    and length other than the ones resize traced at, on the old vocabulary and channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if getattr(old, "main_input_name", "") == "pixel_values":
            n, size = old.config.num_channels, old.config.image_size
            x = torch.randn(batch, new.config.num_channels, size, size, generator=g)
            x[:, n:] = 0                              # new channels hold nothing yet
            a, b = old(pixel_values=x[:, :n]).logits, new(pixel_values=x).logits
        else:
            ids = torch.randint(0, old.config.vocab_size, (batch, seq), generator=g)
            mask = torch.ones(batch, seq, dtype=torch.int64)
            mask[-1, -3:] = 0
            a = old(input_ids=ids, attention_mask=mask).logits
            b = new(input_ids=ids, attention_mask=mask).logits[..., :a.shape[-1]]
    return ((a - b).abs().max() / a.abs().max()).item()


def _resize(model, **changes):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.SurgeryWarning)   # a preserving resize warns of nothing
        return fs.hf.resize(model, **changes)


PRESERVING = [
    (gpt2, dict(intermediate_size=256)),
    (gpt2, dict(num_hidden_layers=4)),
    (gpt2, dict(n_layer=3, layers_at=0)),
    (gpt2, dict(num_hidden_layers=5, layers_at=[0, 2, 4])),
    (gpt2, dict(hidden_size=64, num_attention_heads=8)),        # the stream 2x through LayerNorm
    (gpt2, dict(n_embd=48, n_head=6)),                          # ... 1.5x
    (gpt2, dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=4)),   # width and depth at once
    (llama, dict(hidden_size=64)),                              # the stream 2x through RMSNorm
    (llama, dict(hidden_size=48, num_hidden_layers=3, intermediate_size=64,
                 num_attention_heads=6, num_key_value_heads=3)),  # 1.5x, and everything else at once
    (qwen2, dict(hidden_size=64, num_hidden_layers=4, layers_at=[0, 2])),
    (llama, dict(intermediate_size=96)),
    (llama, dict(num_attention_heads=8, num_key_value_heads=4)),
    (llama, dict(num_hidden_layers=4, layers_at=[1, 3])),
    (llama, dict(num_hidden_layers=3, intermediate_size=64, vocab_size=VOCAB + 5)),
    (qwen2, dict(num_hidden_layers=3)),                 # layer_types follows the layers
    (qwen2, dict(num_attention_heads=6, num_key_value_heads=3)),
    (bert, dict(intermediate_size=64, vocab_size=VOCAB + 2)),
    (vit, dict(num_hidden_layers=3, intermediate_size=64)),
    (vit, dict(num_channels=4)),
]


@pytest.mark.parametrize("factory,changes", PRESERVING, ids=lambda v: getattr(v, "__name__", None) or
                         ",".join(f"{k}={v}" for k, v in v.items()))
def test_resize_preserves_the_function(factory, changes):
    old = factory()
    before = {k: v.clone() for k, v in old.state_dict().items()}
    new, plan = _resize(old, **changes)
    assert type(new) is type(old)
    for attr, (was, now) in plan.config_changes.items():
        assert getattr(new.config, attr) == now and getattr(old.config, attr) == was
    assert len(plan.config_changes) == len(set(changes) - {"layers_at"})
    assert plan.preserves_function, plan.summary()
    assert plan.verification.ok(1e-5), str(plan.verification)
    assert _deviation(old, new) <= 1e-5
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())   # the old model is untouched


def test_new_layers_copy_their_neighbour_and_write_nothing():
    old = llama()
    new, plan = _resize(old, num_hidden_layers=3, layers_at=1)
    o, n = old.state_dict(), new.state_dict()
    writers = {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, value in n.items():
        if name.startswith("model.layers.1."):
            if name in writers:
                assert not value.any(), name
            else:                                         # a copy of old layer 0, the one before
                assert torch.equal(value, o["model.layers.0." + name[len("model.layers.1."):]]), name
        elif name.startswith("model.layers.2."):         # old layer 1, moved
            assert torch.equal(value, o["model.layers.1." + name[len("model.layers.2."):]]), name
    assert any("model.layers.1" in note for note in plan.notes)


def test_new_layers_train():
    old = gpt2()
    new, _ = _resize(old, num_hidden_layers=3)
    new.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    loss = new(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = new.transformer.h[2].mlp.c_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0      # the zeroed writes learn from the first step


def test_fresh_layers_preserve_and_stacked_ones_are_reported():
    old = gpt2()
    new, plan = _resize(old, num_hidden_layers=3, new_layers="fresh")
    assert plan.preserves_function and _deviation(old, new) <= 1e-5
    with pytest.warns(fs.SurgeryWarning, match="stacked layer"):
        new, plan = fs.hf.resize(old, num_hidden_layers=3, new_layers="stack")
    assert not plan.preserves_function
    assert any(i.kind == "stacked layer" for i in plan.issues)
    assert _deviation(old, new) > 1e-3


def test_a_post_norm_layer_is_caught_by_the_verification():
    # BERT renormalises the stream after each layer: a layer that writes nothing still applies
    # a norm with trained weights, so it is not the identity; the plan cannot see that, the
    # verification does.
    old = bert()
    with pytest.warns(fs.SurgeryWarning, match="does not compute what the old one did"):
        new, plan = fs.hf.resize(old, num_hidden_layers=3)
    assert not plan.preserves_function
    assert [i.kind for i in plan.issues if i.blocking] == ["verify"]
    assert _deviation(old, new) > 1e-3


def test_planted_bug_writes_not_zeroed_is_caught(monkeypatch):
    """The checks above catch a construction that leaves a new layer's writes in place."""
    real = layers_module.initialise

    def keeps_writes(new_model, lists, aliases, how):
        return real(new_model, lists, {}, how)
    monkeypatch.setattr(sys.modules["fxsurgery.hf.resize"], "initialise", keeps_writes)
    old = llama()
    with pytest.warns(fs.SurgeryWarning):
        new, plan = fs.hf.resize(old, num_hidden_layers=3)
    assert not plan.preserves_function
    assert _deviation(old, new) > 1e-3


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("factory", [gpt2, llama])
def test_add_tokens_with_a_tokenizer(factory):
    old, tok = factory(), _tokenizer()
    new, plan = _resize(old, tokenizer=tok, add_tokens=["<tool>", "</tool>"])
    assert len(tok) == VOCAB + 2 and tok.convert_tokens_to_ids(["<tool>", "</tool>"]) == [VOCAB, VOCAB + 1]
    assert new.config.vocab_size == VOCAB + 2
    emb_old, emb_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert torch.equal(emb_new[:VOCAB], emb_old)
    assert torch.allclose(emb_new[VOCAB:], emb_old.mean(0).expand(2, -1), atol=1e-6)   # mean_resizing
    assert _deviation(old, new) <= 1e-5
    ids = torch.tensor([tok.convert_tokens_to_ids(["w1", "<tool>", "w3", "</tool>"])])
    out = new.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    if factory is gpt2:
        assert new.lm_head.weight is new.transformer.wte.weight    # still tied


def test_add_tokens_zero_and_without_a_tokenizer():
    old = llama()
    new, plan = _resize(old, add_tokens=["<a>"], new_tokens="zero")
    assert new.config.vocab_size == VOCAB + 1
    assert not new.get_input_embeddings().weight[VOCAB].any()
    assert plan.space is not None and _deviation(old, new) <= 1e-5


@pytest.mark.parametrize("factory,changes", [
    (gpt2, dict(num_hidden_layers=3, intermediate_size=192)),
    (llama, dict(num_hidden_layers=3, intermediate_size=64)),
    (bert, dict(intermediate_size=64, vocab_size=VOCAB + 4)),
    (vit, dict(num_hidden_layers=3, num_channels=4)),
], ids=["gpt2", "llama", "bert", "vit"])
def test_save_reload_and_generate(tmp_path, factory, changes):
    old = factory()
    new, _ = fs.hf.resize(old, **changes)
    new.save_pretrained(tmp_path)
    again = type(new).from_pretrained(tmp_path).eval()
    if factory is vit:
        x = {"pixel_values": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    else:
        x = {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        assert torch.equal(again(**x).logits, new(**x).logits)
    if hasattr(new, "generate") and new.can_generate():
        a = old.generate(x["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = new.generate(x["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)                           # the same function generates the same text


def test_the_callers_random_state_is_untouched():
    old = gpt2()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _resize(old, intermediate_size=256)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("changes,message", [
    (dict(num_channels=4), "GPT2Config has no field 'num_channels'"),
    (dict(intermediate_size=-3), "intermediate_size must be a positive integer"),
    (dict(n_layer=3, num_hidden_layers=4), "both set GPT2Config.n_layer"),
    (dict(num_hidden_layers=4, layers_at=[0]), "must name 2 distinct position"),
    (dict(num_hidden_layers=3, layers_at=[7]), "0..2"),
    (dict(intermediate_size=256, layers_at=1), "no layer list changes length"),
    (dict(add_tokens=["w3"]), "'w3' is already row 3"),
    (dict(add_tokens=["<a>"], vocab_size=VOCAB + 3), "vocab_size=43 disagrees with add_tokens"),
    (dict(num_attention_heads=5), "cannot be built with n_head=5"),
    (dict(new_layers="zeros", num_hidden_layers=3), "new_layers must be one of"),
    (dict(), "no change given"),
])
def test_bad_changes_name_the_field_and_change_nothing(changes, message):
    old, tok = gpt2(), _tokenizer()
    before = {k: v.clone() for k, v in old.state_dict().items()}
    with pytest.raises(fs.SurgeryError, match=message.replace("(", r"\(").replace(".", r"\.")):
        fs.hf.resize(old, tokenizer=tok, **changes)
    assert len(tok) == VOCAB
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())


def test_not_a_transformers_model():
    with pytest.raises(fs.SurgeryError, match="expects a transformers PreTrainedModel, got Linear"):
        fs.hf.resize(torch.nn.Linear(2, 2), hidden_size=4)


def test_a_change_that_cannot_preserve_says_so():
    old = gpt2()
    with pytest.warns(fs.SurgeryWarning, match="scores sum over old and new head dimensions"):
        new, plan = fs.hf.resize(old, hidden_size=64)     # wider heads: every score changes
    assert type(new) is GPT2LMHeadModel and not plan.preserves_function
    with pytest.warns(fs.SurgeryWarning, match="re-initialised"):
        new, plan = fs.hf.resize(vit(), hidden_size=64, num_attention_heads=8)   # a class token's labels
    assert not plan.preserves_function


def test_element_wise_rms_norms_are_fused_for_the_analysis():
    from fxsurgery.hf.examples import example, token_names
    from fxsurgery.passes.fuse_norms import fuse_rms_norm
    old = llama()
    inputs, features = example(old, token_names(VOCAB))
    t = fs.trace(old, inputs, features)
    assert t.graph_module is t.program.graph_module
    before = t.program.module()(*[inputs[n] for n in t.input_names])
    assert fuse_rms_norm(t.graph_module) == 5              # two per layer and the final one
    ops = [n.target for n in t.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.rms_norm.default) == 5 and torch.ops.aten.rsqrt.default not in ops
    after = t.program.module()(*[inputs[n] for n in t.input_names])
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert fuse_rms_norm(t.graph_module) == 0              # nothing left to fuse


def test_the_optimizer_follows_the_layers():
    """Adam's state carried through a resize that moves layers (old layer 1 becomes layer 2) and
    widens the MLP: the next step moves every copied element as the old model's next step does."""
    old = llama()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam(old.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        old(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    new, plan = _resize(old, num_hidden_layers=3, layers_at=1, intermediate_size=64)
    new_opt = plan.carry_optimizer(opt, torch.optim.Adam(new.parameters(), lr=1e-3))
    for model, o in ((old, opt), (new, new_opt)):
        o.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        o.step()
    from fxsurgery.surgery.apply import build
    sd_old, sd_new = old.state_dict(), new.state_dict()
    masks = plan.masks()
    moved = 0
    for name, m in masks.items():
        p = plan.params[name]
        if p.old_name is None:
            continue
        expected = build(p.match, sd_old[p.old_name], torch.zeros_like(sd_new[name]))
        assert torch.allclose(sd_new[name][m.copied], expected[m.copied], atol=1e-6), name
        moved += name.startswith("model.layers.2.")
    assert moved > 0                                       # the moved layer was checked too


def test_a_widened_stream_trains():
    old = gpt2()
    new, plan = _resize(old, hidden_size=64, num_attention_heads=8)
    assert new.config.layer_norm_epsilon == pytest.approx(old.config.layer_norm_epsilon / 2)
    assert any("LEMON" in n and "drawn at random" in n for n in plan.notes)
    # The readers of the new coordinates are drawn (zero readers would leave them no gradient).
    assert new.transformer.h[0].attn.c_attn.weight[32:].abs().min() > 0
    assert new.transformer.h[1].mlp.c_fc.weight[32:].abs().min() > 0
    new.train()
    opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = new(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_planted_bug_zeros_for_layer_norm_are_caught(monkeypatch):
    """Filling the stream's new coordinates with zeros (RMSNorm's choice) under a LayerNorm
    moves its mean: the verification and this file's comparison both catch it."""
    norms = sys.modules["fxsurgery.hf.norms"]
    real = norms._fill
    monkeypatch.setattr(norms, "_fill", lambda value, axis, old, fill: real(value, axis, old, "zero"))
    old = gpt2()
    with pytest.warns(fs.SurgeryWarning, match="verify"):
        new, plan = fs.hf.resize(old, hidden_size=64, num_attention_heads=8)
    assert not plan.preserves_function and _deviation(old, new) > 1e-3


def test_a_post_norm_stream_is_not_claimed():
    old = bert()
    with pytest.warns(fs.SurgeryWarning, match="verify"):
        new, plan = fs.hf.resize(old, hidden_size=64, num_attention_heads=8)
    assert not plan.preserves_function and _deviation(old, new) > 1e-3


def test_a_widened_rms_norm_stream_gets_gradients_at_its_new_coordinates():
    old = llama()
    new, plan = _resize(old, hidden_size=64)
    assert new.model.layers[0].self_attn.q_proj.weight[:, 32:].abs().min() > 0
    assert not new.model.embed_tokens.weight[:, 32:].any()          # RMSNorm: the new coordinates are zero
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    new.train()
    new(input_ids=ids, labels=ids).loss.backward()
    grad = new.model.embed_tokens.weight.grad[:, 32:]
    assert grad.abs().sum() > 0
    # ... and not the same gradient at every new coordinate: they can learn apart.
    assert not torch.allclose(grad[:, :1].expand_as(grad), grad)


def test_planted_bug_zero_readers_leave_the_new_coordinates_without_gradient(monkeypatch):
    monkeypatch.setattr(sys.modules["fxsurgery.hf.norms"], "_wake_readers", lambda *a, **k: [])
    new, _ = _resize(llama(), hidden_size=64)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    new.train()
    new(input_ids=ids, labels=ids).loss.backward()
    assert not new.model.embed_tokens.weight.grad[:, 32:].any()    # what the test above rules out


def test_the_norms_scale_offset_is_measured():
    """Gemma's RMSNorm multiplies by (1 + weight): widening scales the scale, not the weight."""
    norms = sys.modules["fxsurgery.hf.norms"]
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    assert norms._offset(GemmaRMSNorm(6, eps=1e-6)) == 1.0
    assert norms._offset(LlamaRMSNorm(6, eps=1e-6)) == 0.0
    assert norms._offset(torch.nn.LayerNorm(7)) == 0.0
