"""Surgery on real architectures from Hugging Face transformers, built tiny from their
configurations (random weights, nothing downloaded): GPT-2 gaining tokens with tied
embeddings, BERT with a wider feed-forward layer, a Llama decoder gaining attention heads
(whole key/value groups under grouped-query attention), a ViT gaining an input channel.
Each: the plan preserves the function, fs.verify <= 1e-5 on the old positions, old elements
are copied bit-identically, new ones zeroed where they meet a new label, and the new model
then trains for a few steps. Eager and sdpa attention are spread over the cases (both for
Llama); the whole file runs in about 10 s on 2 cores."""
import math

import pytest
import torch

pytest.importorskip("transformers")

import fxsurgery as fs  # noqa: E402
from real_models import RGB, VOCAB, bert, gpt2, llama, train_steps, vit  # noqa: E402

# Every operator these models lower to has a rule: the sound fallback would blur the keys.
pytestmark = pytest.mark.filterwarnings("error::fxsurgery.UnknownOperatorWarning")

TOL = 1e-5
NEW_TOKENS = ["<sep>", "<user>", "<bot>"]


def transplant(old, new, **plan_kwargs):
    plan = fs.plan(fs.trace(*old), fs.trace(*new), **plan_kwargs)
    assert float(fs.verify(plan)) > 1e-2        # before apply the models differ: verify is not vacuous
    model = plan.apply()
    assert plan.preserves_function, str(plan)
    assert not any(p.match.unexplained for p in plan.params.values()), plan.table()
    assert not [n for n in plan.notes if "no label rule" in n]   # not even run through a decomposition
    deviation = fs.verify(plan)
    assert all(o.compared for o in deviation.outputs), str(deviation)
    assert float(deviation) <= TOL, str(deviation)
    return model, plan


def trains(model, inputs, labels):
    losses = train_steps(model, inputs, labels, steps=3)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses


# GPT-2: new tokens, tied embeddings ---------------------------------------------------------

def test_gpt2_new_tokens_keep_the_tie_and_the_logits_over_the_old_tokens():
    old, new = gpt2(attn="eager"), gpt2(VOCAB + NEW_TOKENS, attn="eager", seed=1)
    model, plan = transplant(old, new)
    V = len(VOCAB)
    wte, old_wte = model.transformer.wte.weight, old.model.transformer.wte.weight
    assert model.lm_head.weight is wte                      # still one tensor
    assert torch.equal(wte[:V], old_wte)                    # old rows copied
    assert torch.equal(wte[V:], torch.zeros(len(NEW_TOKENS), wte.shape[1]))  # new rows zeroed
    for name, t in model.state_dict().items():              # every other parameter copied as is
        if "wte" not in name and "lm_head" not in name:
            assert torch.equal(t, old.model.state_dict()[name]), name
    # The new tokens are a new output (their logits), not an obstacle: the old logits are exact.
    assert [i.kind for i in plan.issues] == ["new output"]
    assert "compared on the old positions" in str(fs.verify(plan))
    trains(model, new.inputs, new.inputs["input_ids"])
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_new_token_rows_as_the_mean_of_the_old_ones():
    old, new = gpt2(attn="sdpa"), gpt2(VOCAB + NEW_TOKENS, attn="sdpa", seed=1)
    model, _ = transplant(old, new, new_categories="mean")
    V = len(VOCAB)
    mean = old.model.transformer.wte.weight.mean(0)
    for k in range(len(NEW_TOKENS)):
        torch.testing.assert_close(model.transformer.wte.weight[V + k], mean)


def test_gpt2_inputs_by_keyword_although_attention_mask_is_not_the_second_parameter():
    # GPT2LMHeadModel.forward(input_ids, past_key_values, attention_mask, ...): passed in order,
    # the mask would land in past_key_values.
    old = gpt2()
    traced = fs.trace(*old)
    assert traced.keywords and traced.input_names == ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = old.model(**old.inputs).logits
        got = traced.call(old.model, tuple(old.inputs.values())).logits
    assert torch.equal(got, want)


# BERT: a wider feed-forward layer -------------------------------------------------------------

def test_bert_wider_intermediate_layer_preserves_the_function():
    old, new = bert(64, attn="sdpa"), bert(80, attn="sdpa", seed=1)
    model, plan = transplant(old, new)
    for i in range(2):
        layer, old_layer = model.bert.encoder.layer[i], old.model.bert.encoder.layer[i]
        assert torch.equal(layer.intermediate.dense.weight[:64], old_layer.intermediate.dense.weight)
        assert torch.equal(layer.intermediate.dense.bias[:64], old_layer.intermediate.dense.bias)
        assert torch.equal(layer.output.dense.weight[:, :64], old_layer.output.dense.weight)
        assert torch.equal(layer.output.dense.weight[:, 64:], torch.zeros(32, 16))  # new units' outgoing weights
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # position_ids / token_type_ids are non-persistent buffers: not state, kept as built.
    for name in ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids"):
        assert not plan.params[name].persistent and plan.params[name].status == "kept"
        assert "non-persistent" in plan.table()
    assert not plan.dropped
    trains(model, new.inputs, new.inputs["input_ids"])


# Llama: more attention heads ------------------------------------------------------------------

def _check_heads(model, old_model, heads, kv_heads, head_dim=8):
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(2):
        a, b = model.model.layers[i].self_attn, old_model.model.layers[i].self_attn
        assert torch.equal(a.q_proj.weight[:q], b.q_proj.weight)      # old heads: rows copied head by head
        assert torch.equal(a.k_proj.weight[:kv], b.k_proj.weight)
        assert torch.equal(a.v_proj.weight[:kv], b.v_proj.weight)
        assert torch.equal(a.o_proj.weight[:, :q], b.o_proj.weight)
        assert torch.equal(a.o_proj.weight[:, q:], torch.zeros(a.o_proj.weight.shape[0], a.o_proj.weight.shape[1] - q))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_more_heads_as_whole_kv_groups_preserves_the_function(attn):
    old, new = llama(4, 2, attn=attn), llama(6, 3, attn=attn, seed=1)
    model, plan = transplant(old, new)
    _check_heads(model, old.model, 4, 2)
    # The projections' rows were matched as (head, position in head), read off the reshape.
    splits = plan.space.unit_splits["new"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert splits[f"model.layers.0.self_attn.{proj}"] == [8]
    # The rotary frequencies are non-persistent buffers, which every head meets: kept, not zeroed.
    assert torch.equal(model.model.rotary_emb.inv_freq, old.model.model.rotary_emb.inv_freq)
    trains(model, new.inputs, new.inputs["input_ids"])


def test_llama_without_gqa_more_heads_preserves_the_function():
    old, new = llama(4, 4, attn="sdpa"), llama(6, 6, attn="sdpa", seed=1)
    model, _ = transplant(old, new)
    _check_heads(model, old.model, 4, 4)
    trains(model, new.inputs, new.inputs["input_ids"])


def test_llama_heads_regrouped_onto_the_same_kv_heads_is_reported_not_preserved():
    # 4 query heads over 2 kv heads -> 6 over 2: old query head 2 moves to kv group 1 at new
    # position 3, which positions cannot tell. The plan says so instead of claiming preservation.
    old, new = llama(4, 2), llama(6, 2, seed=1)
    plan = fs.plan(fs.trace(*old), fs.trace(*new))
    assert not plan.preserves_function
    assert any(i.kind == "unmatched" and "o_proj" in str(i) for i in plan.issues)



# ViT: a new input channel -----------------------------------------------------------------------

def test_vit_new_input_channel_preserves_the_function():
    old, new = vit(attn="eager"), vit(RGB + ("depth",), attn="eager", seed=1)
    model, plan = transplant(old, new)
    conv, old_conv = model.vit.embeddings.patch_embeddings.projection, old.model.vit.embeddings.patch_embeddings.projection
    assert torch.equal(conv.weight[:, :3], old_conv.weight)
    assert torch.equal(conv.weight[:, 3], torch.zeros_like(conv.weight[:, 3]))
    assert torch.equal(conv.bias, old_conv.bias)
    assert [str(lab) for lab in plan.new_labels] == ["pixel_values:depth"]
    trains(model, new.inputs, torch.tensor([0, 2]))
