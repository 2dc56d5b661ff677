"""Tiny Hugging Face `transformers` models, built from configurations with random weights
(nothing is downloaded), as (model, inputs, features) triples ready for `fs.trace`.

Each factory takes the sizes a surgery changes (vocabulary, intermediate width, attention
heads, input channels), builds the model in eval mode from `torch.manual_seed(seed)`, and
returns a `Built(model, inputs, features)`, which unpacks like the tuples of `fxsurgery.zoo`:

    old = gpt2(VOCAB)                      # old model
    new = gpt2(VOCAB + ["<a>", "<b>"], seed=1)
    fs.transplant(old.model, new.model, old.inputs, new.inputs, old.features, new.features)

`inputs` is a dict by the names of forward's parameters (fs.trace passes them by keyword);
`features` describes them (token names as `fs.Categories`, image channels as `fs.Features`).
Build old and new with different seeds, so that a copied parameter is visibly copied.

transformers is a test-only dependency: importing this module needs it (guard with
`pytest.importorskip("transformers")`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import transformers
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)

import fxsurgery as fs

__all__ = ["Built", "VOCAB", "RGB", "gpt2", "bert", "llama", "vit", "tokens", "train_steps"]

# The config checks warn about GPT-2's default bos/eos ids (50256) lying outside a tiny vocabulary.
transformers.logging.set_verbosity_error()

VOCAB = [f"tok{i}" for i in range(50)]
RGB = ("r", "g", "b")


class Built(NamedTuple):
    model: torch.nn.Module
    inputs: dict          # example inputs by forward's parameter names
    features: dict        # input name -> fs.Features / fs.Categories


def tokens(vocab_size: int, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Token ids in [0, vocab_size), from a private generator."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """An attention mask whose last sequence has two padded positions (so that fs.verify draws
    masks with zeros too: it draws integer inputs within the example's range)."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1 and seq > 2:
        mask[-1, -2:] = 0
    return mask


def gpt2(vocab: Sequence[str] = VOCAB, *, layers: int = 2, width: int = 32, heads: int = 4, positions: int = 16,
         attn: str = "eager", seed: int = 0, batch: int = 2, seq: int = 8) -> Built:
    """GPT2LMHeadModel with one token per name of `vocab` and tied input/output embeddings
    (`lm_head.weight` is `transformer.wte.weight`). Inputs: input_ids (fs.Categories(vocab))
    and attention_mask (passed by keyword: it is forward's third parameter)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                        tie_word_embeddings=True, use_cache=False, attn_implementation=attn)
    model = GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": tokens(len(vocab), batch, seq, seed), "attention_mask": _padding_mask(batch, seq)}
    return Built(model, inputs, {"input_ids": fs.Categories(list(vocab))})


def bert(intermediate: int = 64, *, vocab: Sequence[str] = VOCAB, layers: int = 2, hidden: int = 32,
         heads: int = 4, positions: int = 16, attn: str = "eager", seed: int = 0, batch: int = 2,
         seq: int = 8) -> Built:
    """BertForMaskedLM (its decoder tied to the word embeddings) with `intermediate` units in
    each feed-forward layer. Inputs: input_ids (fs.Categories(vocab)), attention_mask."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=positions, attn_implementation=attn)
    model = BertForMaskedLM(config).eval()
    inputs = {"input_ids": tokens(len(vocab), batch, seq, seed), "attention_mask": _padding_mask(batch, seq)}
    return Built(model, inputs, {"input_ids": fs.Categories(list(vocab))})


def llama(heads: int = 4, kv_heads: int = 2, *, vocab: Sequence[str] = VOCAB, hidden: int = 48, head_dim: int = 8,
          intermediate: int = 64, layers: int = 2, positions: int = 16, attn: str = "eager", seed: int = 0,
          batch: int = 2, seq: int = 8) -> Built:
    """LlamaForCausalLM with `heads` query heads sharing `kv_heads` key/value heads (grouped-query
    attention when fewer) of `head_dim` each, rotary position embeddings, untied output.
    The hidden size must be a multiple of `heads` (a LlamaConfig check, although q_proj is
    heads * head_dim wide): the default 48 admits 4, 6 and 8 heads. Inputs: input_ids
    (fs.Categories(vocab)), attention_mask."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         intermediate_size=intermediate, max_position_embeddings=positions, use_cache=False,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": tokens(len(vocab), batch, seq, seed), "attention_mask": _padding_mask(batch, seq)}
    return Built(model, inputs, {"input_ids": fs.Categories(list(vocab))})


def vit(channels: Sequence[str] = RGB, *, image: int = 16, patch: int = 4, hidden: int = 32, layers: int = 2,
        heads: int = 4, intermediate: int = 64, classes: int = 3, attn: str = "eager", seed: int = 0,
        batch: int = 2) -> Built:
    """ViTForImageClassification over images with one input channel per name of `channels`.
    Input: pixel_values, fs.Features(channels, dim=1)."""
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image, patch_size=patch, num_channels=len(channels), hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                       num_labels=classes, attn_implementation=attn)
    model = ViTForImageClassification(config).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = {"pixel_values": torch.randn(batch, len(channels), image, image, generator=g)}
    return Built(model, inputs, {"pixel_values": fs.Features(list(channels), dim=1)})


def train_steps(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, steps: int = 3,
                lr: float = 1e-3) -> list[float]:
    """A few AdamW steps on the model's own loss (`labels=` passed to forward); returns the
    losses. Leaves the model in eval mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
