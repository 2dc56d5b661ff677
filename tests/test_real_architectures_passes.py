"""The rewriting passes on Hugging Face architectures built tiny from their configurations
(`tests/real_models.py`; random weights, nothing downloaded): GPT-2 gains tokens (input and
output embeddings tied), BERT a wider feed-forward layer, a Llama decoder more attention heads
(whole key/value groups under grouped-query attention, rotary embeddings), a ViT a new input
channel. Each: the pass on the traced model (no new model code, no new config), the function
preserved on the old positions (relative deviation <= 1e-5), the tie kept where there was
one, and three training steps of the rewritten module."""

import pytest
import torch

pytest.importorskip("transformers")

import fxsurgery as fs  # noqa: E402
import real_models as R  # noqa: E402

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("quiet")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def rewritten(built, change):
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    gm = change(fs.trace(built.model, built.inputs, built.features))
    p = gm.meta["fxsurgery"]["plan"]
    assert p.preserves_function, [str(i) for i in p.issues]
    v = fs.verify(p)
    assert v.max <= TOL, str(v)
    assert all(torch.equal(before[k], t) for k, t in built.model.state_dict().items())   # old model untouched
    return gm, p


def train(gm, steps=3):
    """A few AdamW steps on a synthetic loss over the logits: gradients reach every resized
    parameter and the loss stays finite."""
    inputs = gm.meta["fxsurgery"]["inputs"]
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _logits(gm(**inputs)).float().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


def test_gpt2_add_tokens_keeps_the_tied_embedding():
    old = R.gpt2()
    gm, p = rewritten(old, lambda t: fs.passes.add_categories(t, "input_ids", ["<a>", "<b>"]))
    assert gm.transformer.wte.weight is gm.lm_head.weight
    assert gm.transformer.wte.weight.shape == (len(R.VOCAB) + 2, 32)
    assert torch.equal(gm.transformer.wte.weight[:len(R.VOCAB)], old.model.transformer.wte.weight)
    assert torch.count_nonzero(gm.transformer.wte.weight[len(R.VOCAB):]) == 0
    assert _logits(gm(**gm.meta["fxsurgery"]["inputs"])).shape[-1] == len(R.VOCAB) + 2
    train(gm)


def test_bert_widen_the_intermediate_layers():
    old = R.bert()
    gm = fs.trace(old.model, old.inputs, old.features)
    for layer in range(2):
        gm = fs.passes.widen(gm, f"bert.encoder.layer.{layer}.intermediate", 80)
        p = gm.meta["fxsurgery"]["plan"]
        assert p.preserves_function and fs.verify(p).max <= TOL
    sd = gm.state_dict()
    for layer in range(2):
        assert sd[f"bert.encoder.layer.{layer}.intermediate.dense.weight"].shape == (80, 32)
        assert sd[f"bert.encoder.layer.{layer}.output.dense.weight"].shape == (32, 80)
        assert torch.count_nonzero(sd[f"bert.encoder.layer.{layer}.output.dense.weight"][:, 64:]) == 0
    # Composite: both layers widened, compared with the original model directly.
    x = old.inputs
    torch.testing.assert_close(_logits(gm(**x)), _logits(old.model(**x)), rtol=TOL, atol=TOL)
    train(gm)


@pytest.mark.parametrize("heads, kv, n", [(4, 2, 2), (4, 4, 2)])
def test_llama_add_heads_as_whole_key_value_groups(heads, kv, n):
    old = R.llama(heads, kv, attn="sdpa")
    gm, p = rewritten(old, lambda t: fs.passes.add_heads(t, "model.layers.0.self_attn", n))
    sd = gm.state_dict()
    attn = "model.layers.0.self_attn"
    new_kv = kv + n // (heads // kv)
    assert sd[f"{attn}.q_proj.weight"].shape == ((heads + n) * 8, 48)
    assert sd[f"{attn}.k_proj.weight"].shape == (new_kv * 8, 48)
    assert sd[f"{attn}.o_proj.weight"].shape == (48, (heads + n) * 8)
    assert torch.count_nonzero(sd[f"{attn}.o_proj.weight"][:, heads * 8:]) == 0
    assert sd["model.layers.1.self_attn.q_proj.weight"].shape == (heads * 8, 48)   # the other layer untouched
    train(gm)


def test_llama_eager_attention_is_refused_by_add_heads_with_a_clear_error():
    old = R.llama(attn="eager")
    with pytest.raises(fs.passes.PassError, match="no scaled_dot_product_attention in module "
                                                  "'model.layers.0.self_attn'.*matmul \\+ softmax"):
        fs.passes.add_heads(fs.trace(old.model, old.inputs, old.features), "model.layers.0.self_attn", 2)


def test_vit_add_an_input_channel():
    old = R.vit()
    gm, p = rewritten(old, lambda t: fs.passes.add_features(t, "pixel_values", ["depth"]))
    w = gm.state_dict()["vit.embeddings.patch_embeddings.projection.weight"]
    assert w.shape[1] == 4 and torch.count_nonzero(w[:, 3]) == 0
    assert torch.equal(w[:, :3], old.model.vit.embeddings.patch_embeddings.projection.weight)
    train(gm)


@pytest.mark.parametrize("case", [
    "gpt2 widen mlp", "gpt2 insert identity", "gpt2 add heads", "llama widen swiglu", "llama add tokens",
    "bert add heads", "bert insert identity", "vit reorder channels", "vit remove channel"])
def test_more_passes_on_the_real_architectures(case):
    """The other passes on the same models: widening GPT-2's feed-forward layer (a Conv1D,
    weight stored [in, out]), an identity layer inserted, heads added to GPT-2's fused q/k/v
    projection and to BERT, Llama's gated feed-forward widened (gate and up projections are
    multiplied: they widen together), tokens added to Llama (untied), ViT's channels reordered
    and one removed (the function with that channel at zero)."""
    model, change, check = {
        "gpt2 widen mlp": (lambda: R.gpt2(), lambda t: fs.passes.widen(t, "transformer.h.0.mlp.c_fc", by=16),
                           lambda sd: sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 144)),
        "gpt2 insert identity": (lambda: R.gpt2(), lambda t: fs.passes.insert_identity_layer(t, "transformer.h.0.mlp.c_fc"),
                                 lambda sd: sd["transformer_h_0_mlp_c_fc_identity.weight"].shape == (128, 128)),
        "gpt2 add heads": (lambda: R.gpt2(attn="sdpa"), lambda t: fs.passes.add_heads(t, "transformer.h.0.attn", 2),
                           lambda sd: sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 3 * 48)),
        "llama widen swiglu": (lambda: R.llama(attn="sdpa"),
                               lambda t: fs.passes.widen(t, "model.layers.1.mlp.gate_proj", by=16),
                               lambda sd: sd["model.layers.1.mlp.up_proj.weight"].shape == (80, 48)
                               and sd["model.layers.1.mlp.down_proj.weight"].shape == (48, 80)),
        "llama add tokens": (lambda: R.llama(attn="sdpa"), lambda t: fs.passes.add_categories(t, "input_ids", ["<x>"]),
                             lambda sd: sd["model.embed_tokens.weight"].shape == (len(R.VOCAB) + 1, 48)),
        "bert add heads": (lambda: R.bert(attn="sdpa"), lambda t: fs.passes.add_heads(t, "bert.encoder.layer.1.attention", 2),
                           lambda sd: sd["bert.encoder.layer.1.attention.self.query.weight"].shape == (48, 32)),
        "bert insert identity": (lambda: R.bert(attn="sdpa"),
                                 lambda t: fs.passes.insert_identity_layer(t, "bert.encoder.layer.0.intermediate.dense"),
                                 lambda sd: sd["bert_encoder_layer_0_intermediate_dense_identity.weight"].shape == (64, 64)),
        "vit reorder channels": (lambda: R.vit(), lambda t: fs.passes.reorder_features(t, "pixel_values", ["b", "r", "g"]),
                                 lambda sd: True),
        "vit remove channel": (lambda: R.vit(), lambda t: fs.passes.remove_features(t, "pixel_values", ["g"]),
                               lambda sd: sd["vit.embeddings.patch_embeddings.projection.weight"].shape[1] == 2),
    }[case]
    built = model()
    gm = change(fs.trace(built.model, built.inputs, built.features))
    p = gm.meta["fxsurgery"]["plan"]
    assert check(gm.state_dict()), {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    if case == "vit remove channel":
        assert [i.kind for i in p.issues] == ["removed input"]
        x = gm.meta["fxsurgery"]["inputs"]["pixel_values"]
        x_old = torch.stack([x[:, 0], torch.zeros_like(x[:, 0]), x[:, 1]], 1)
        torch.testing.assert_close(_logits(gm(pixel_values=x)), _logits(built.model(pixel_values=x_old)),
                                   rtol=TOL, atol=TOL)
    else:
        assert p.preserves_function, [str(i) for i in p.issues]
        assert fs.verify(p).max <= TOL
    train(gm, steps=2)


def test_rewritten_llama_runs_on_another_batch_size():
    """The rewritten module's batch size follows its inputs (export had fixed it at 2)."""
    old = R.llama(attn="sdpa")
    gm, p = rewritten(old, lambda t: fs.passes.add_heads(t, "model.layers.0.self_attn", 2))
    assert gm.meta["fxsurgery"]["batch"].startswith("free")
    x = {"input_ids": R.tokens(len(R.VOCAB), batch=3, seed=5), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    torch.testing.assert_close(_logits(gm(**x)), _logits(old.model(**x)), rtol=TOL, atol=TOL)


def test_bert_prune_intermediate_units_keeps_exactly_the_survivors():
    """Pruning a feed-forward layer by a units map: the surviving units' weights are carried
    bit for bit, in the asked order; the plan says the pruned units had weight."""
    old = R.bert()
    keep = list(range(0, 64, 2))[::-1]
    gm = fs.passes.prune_units(fs.trace(old.model, old.inputs, old.features),
                               "bert.encoder.layer.1.intermediate.dense", keep)
    p = gm.meta["fxsurgery"]["plan"]
    assert {i.kind for i in p.issues} == {"pruned units"}
    sd, layer = gm.state_dict(), old.model.bert.encoder.layer[1]
    assert torch.equal(sd["bert.encoder.layer.1.intermediate.dense.weight"], layer.intermediate.dense.weight[keep])
    assert torch.equal(sd["bert.encoder.layer.1.intermediate.dense.bias"], layer.intermediate.dense.bias[keep])
    assert torch.equal(sd["bert.encoder.layer.1.output.dense.weight"], layer.output.dense.weight[:, keep])
    train(gm, steps=2)
