"""`resize`: a transformers model grown or shrunk through its config, weights carried over.

    new_model, plan = fs.hf.resize(model, intermediate_size=256, num_hidden_layers=6)

The new model is the old one's class built from the updated config (so `generate`,
`save_pretrained` and `from_pretrained` work on it as on any model of that class); the planner
carries the weights over element by element, exactly as `fs.transplant` does between two
models; each new layer is made to start as the identity (layers.py); and the result is run
against the old model (`fs.verify`), the figures kept in `plan.verification`.
"""
from __future__ import annotations

import copy
import warnings

import torch

from ..capture import trace
from ..interaction_map import interaction_map
from ..surgery.errors import SurgeryError, SurgeryWarning
from ..surgery.issues import Issue
from ..surgery.planning import NEW_CATEGORIES, _non_persistent, plan as make_plan
from ..surgery.verify import verify
from .config import new_config, resolve_changes
from .examples import example, token_names
from ..passes.fuse_norms import fuse_rms_norm
from ..surgery.renames import rename_prefix
from .config import hidden_field, layers_field
from .norms import scaled_epsilons, widen_through_norms
from .layers import NEW_LAYERS, initialise, layer_lists, per_layer_fields, place, renames, writer_aliases

__all__ = ["resize"]

_CHOICES = 8   # how many choices of what a first new layer's writes stand for are planned at most


def resize(model, *, tokenizer=None, add_tokens=None, new_tokens: str = "mean", layers_at=None,
           new_layers: str = "copy", inputs=None, features=None, tol: float = 1e-5, **changes):
    """A model of `model`'s class built from its config with `changes` applied, carrying the
    old weights. Returns (new_model, plan); `model` (and `tokenizer`, if the resize fails) is
    left as it was. `plan.config_changes` is {config attribute: (old value, new value)},
    `plan.verification` what `fs.verify` measured.

    changes: config fields by their usual names (vocab_size, hidden_size, intermediate_size,
        num_attention_heads, num_key_value_heads, num_hidden_layers, head_dim, num_channels) or
        by the names the model's config uses (GPT-2's n_embd, n_inner, n_head, n_layer). A name
        the config does not have is an error naming it. Heads are added at the old head width.
    tokenizer, add_tokens: new tokens by name. With a tokenizer the embedding rows are matched
        by token and the tokens are added to it (`tokenizer.add_tokens`) once the model is
        built, at the ids it gives them; without one, after the old rows.
    new_tokens: new embedding rows (and output rows) are the "mean" of the old ones (as
        `resize_token_embeddings(mean_resizing=True)` centres them), "zero", or "keep" the new
        model's initialisation.
    layers_at: the positions, in the new model, of the layers added (default: after the last).
    new_layers: each added layer is a "copy" of the layer before it with its writes into the
        residual stream zeroed (it starts as the identity, and trains), "fresh" (the new
        model's initialisation, writes zeroed), or "stack" (a whole copy: not the identity,
        and the plan says so).
    inputs, features: example inputs and their description for `fs.trace`, for a model that
        reads something other than input_ids or pixel_values (default: made from the config).
    tol: the largest relative deviation `fs.verify` may find where the plan says the function
        is preserved; beyond it the plan gains a blocking issue, and a SurgeryWarning is given
        whenever the new model does not compute what the old one did.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise SurgeryError("fs.hf.resize needs transformers (pip install transformers)") from e
    if not isinstance(model, PreTrainedModel):
        raise SurgeryError(f"resize expects a transformers PreTrainedModel, got {type(model).__name__}; for other "
                           "models build the new one and call fs.transplant")
    if new_layers not in NEW_LAYERS:
        raise SurgeryError(f"resize: new_layers must be one of {NEW_LAYERS}, got {new_layers!r}")
    if new_tokens not in NEW_CATEGORIES:
        raise SurgeryError(f"resize: new_tokens must be one of {NEW_CATEGORIES}, got {new_tokens!r}")
    config = model.config
    fields = resolve_changes(config, changes)
    old_names, new_names, added_ids = _vocabularies(config, fields, tokenizer, add_tokens)
    if new_names is not None and len(new_names) != getattr(config, "vocab_size", None):
        fields["vocab_size"] = len(new_names)
    if not fields:
        raise SurgeryError("resize: no change given (pass config fields, e.g. intermediate_size=..., or add_tokens=)")

    layers = layers_field(config, fields)
    extra = {}
    if layers is not None:   # per-layer config entries follow the layers (before the model is built)
        old_n, new_n = getattr(config, layers), fields[layers]
        extra = per_layer_fields(config, old_n, place(layers, old_n, new_n, layers_at))
    hidden = hidden_field(config, fields)
    widened = hidden is not None and fields[hidden] > getattr(config, hidden)
    if widened:   # LEMON: the norms' epsilon scales with the stream's width (norms.py)
        extra.update(scaled_epsilons(config, getattr(config, hidden) / fields[hidden]))
    new = _build(model, new_config(config, {**fields, **extra}), fields)
    lists = [place(n, o, k, layers_at) for n, o, k in layer_lists(model, new)]
    if layers_at is not None and not lists:
        raise SurgeryError(f"resize: layers_at={layers_at!r} but no layer list changes length")
    rename = renames(lists)

    old_inputs, old_features, new_inputs, new_features = _examples(model, new, old_names, new_names, inputs, features)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_flat_weights.*")
            old_t = trace(model, old_inputs, old_features)
            new_t = trace(new, new_inputs, new_features)
            fused = [fuse_rms_norm(t.graph_module) for t in (old_t, new_t)]
            old_map, new_map = interaction_map(old_t), interaction_map(new_t)
        choices = writer_aliases(new_map, old_map, lists, rename, _non_persistent(new) | _non_persistent(model))
        first = None
        for aliases in choices[:_CHOICES]:
            p = make_plan(old_t, new_t, rename=rename, units=aliases, new_categories=new_tokens,
                          old_map=old_map, new_map=new_map)
            first = first or (p, aliases)
            if not any(i.kind == "unmatched" for i in p.issues):
                break
        else:   # none matched everything: the first choice, whose plan says where
            p, aliases = first
        p.apply()
        p.issues += initialise(new, lists, aliases, new_layers)
        if aliases:
            made = "zeroed" if new_layers != "stack" else "copied whole (stack)"
            p.notes = [n for n in p.notes if " is an inserted layer standing for " not in n]
            p.notes.append(f"resize added layer(s) {', '.join(ll.prefix(j) for ll in lists for j in ll.inserted)}: "
                           f"their writes into the residual stream ({', '.join(sorted(aliases))}) were {made}, "
                           f"the rest is {'a copy of the layer before' if new_layers != 'fresh' else 'as built'}")
        if widened:
            back = {v: k for k, v in rename.items()}
            p.notes += widen_through_norms(p, new, model, getattr(config, hidden), fields[hidden],
                                           lambda n: rename_prefix(n, back))
        if any(fused):
            p.notes.append(f"{fused[1]} RMSNorm(s) written element-wise were fused into aten.rms_norm for the "
                           "analysis (passes/fuse_norms.py), so that the stream's positions stay apart")
        p.verification = verify(p)
        p.config_changes = {k: (getattr(config, k, None), v) for k, v in fields.items()}
    finally:
        model.train(was_training)
    new.train(was_training)
    if p.preserves_function and not p.verification.ok(tol):
        p.issues.append(Issue("verify", "outputs", f"fs.verify finds a relative deviation of {p.verification.max:.3g} "
                              f"(tolerance {tol:g}) although no operator or parameter was found to change the "
                              "function (a new layer after a norm that renormalises the stream is one way)"))
    if not p.preserves_function:
        why = [str(i) for i in p.issues if i.blocking]
        why += [f"{q.name}: re-initialised ({q.match.unexplained})" for q in p.params.values() if q.match.unexplained]
        why = "; ".join(why)[:600]
        warnings.warn(f"resize: the new {type(new).__name__} does not compute what the old one did: {why}",
                      SurgeryWarning, stacklevel=2)
    if added_ids:
        _add_tokens(tokenizer, add_tokens, added_ids)
    return new, p


def _vocabularies(config, fields: dict, tokenizer, add_tokens):
    """(old row names, new row names, the ids the added tokens get), or Nones for a model
    without a vocabulary."""
    if add_tokens is not None:
        if isinstance(add_tokens, str) or not all(isinstance(t, str) for t in add_tokens):
            raise SurgeryError(f"resize: add_tokens must be a list of token strings, got {add_tokens!r}")
        add_tokens = list(add_tokens)
        if len(set(add_tokens)) != len(add_tokens):
            raise SurgeryError(f"resize: add_tokens names a token twice: {add_tokens!r}")
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        if add_tokens or tokenizer is not None:
            raise SurgeryError(f"resize: {type(config).__name__} has no vocab_size, so tokens cannot be added")
        return None, None, []
    old = token_names(vocab, tokenizer)
    target = fields.get("vocab_size")
    if not add_tokens:
        if target is None:
            return old, None, []
        filler = "<unused {}>" if tokenizer is not None else "<id {}>"
        return old, old[:target] + [filler.format(i) for i in range(vocab, target)], []
    for t in add_tokens:
        if t in old:
            raise SurgeryError(f"resize: token {t!r} is already row {old.index(t)} of the vocabulary")
    first = len(tokenizer) if tokenizer is not None else vocab
    if first > vocab:
        raise SurgeryError(f"resize: the tokenizer has {first} tokens but the model's vocab_size is {vocab}")
    ids = list(range(first, first + len(add_tokens)))
    size = max(vocab, ids[-1] + 1)
    if target is not None and target != size:
        raise SurgeryError(f"resize: vocab_size={target} disagrees with add_tokens, which makes the vocabulary "
                           f"{size} rows; give one of them")
    new = list(old) + [f"<unused {i}>" for i in range(vocab, size)]
    for i, t in zip(ids, add_tokens):
        new[i] = t
    return old, new, ids


def _build(model, config, fields):
    """The new model, in the old one's dtype and device, without touching the caller's random
    state (a model's initialisation draws from it)."""
    with torch.random.fork_rng(devices=[]):
        try:
            new = type(model)(config)
        except Exception as e:
            raise SurgeryError(f"resize: {type(model).__name__} cannot be built with "
                               f"{', '.join(f'{k}={v}' for k, v in fields.items())}: {e}") from e
    new = new.to(dtype=model.dtype, device=model.device)
    if getattr(model, "generation_config", None) is not None and getattr(new, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def _examples(model, new, old_names, new_names, inputs, features):
    if inputs is not None:
        if features is None:
            raise SurgeryError("resize: inputs= needs features= (what each input holds, for fs.trace)")
        return inputs, features, inputs, features
    vocab = len(old_names) if old_names else None
    old_inputs, old_features = example(model, old_names, high=vocab)
    channels = None
    if "pixel_values" in old_features:
        old_ch = list(old_features["pixel_values"].names)
        n = getattr(new.config, "num_channels", len(old_ch))
        channels = old_ch[:n] + [f"channel {i}" for i in range(len(old_ch), n)]
    new_inputs, new_features = example(new, new_names or old_names, channels, high=vocab)
    return old_inputs, old_features, new_inputs, new_features


def _add_tokens(tokenizer, tokens, ids):
    if tokenizer is None:
        return
    tokenizer.add_tokens(tokens)
    got = tokenizer.convert_tokens_to_ids(tokens)
    if list(got) != list(ids):
        raise SurgeryError(f"resize: the tokenizer gave the added tokens ids {got}, not the rows {ids} the model was "
                           "planned with")
