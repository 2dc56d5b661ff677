"""Fixed models whose maps and plans are saved in tests/golden/, so that a change to the label
engine that changes any map or plan is seen (tests/test_engine_golden.py compares).

Regenerate (only when a change of the maps or plans is intended, and say so in the commit):

    python tests/golden_cases.py

Each map is saved as its JSON export, its table, and per parameter a digest of every element's
label set (the paper's map) and key (nearest labels met, units aligned with), written by label
name, so that the digest does not depend on the engine's internal numbering. Each plan is saved
as its table and summary and a digest of the state `apply()` writes into the new model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
if __name__ == "__main__":  # run as a script: this checkout's fxsurgery, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxsurgery as fs  # noqa: E402
from helpers import Block, Causal, Recurrent, WithState  # noqa: E402
from fxsurgery import zoo  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FEATS = ["a", "b", "c"]
VOCAB = [f"tok{i}" for i in range(12)]  # small: the JSON export lists every category per parameter


# models ------------------------------------------------------------------------------------
def _seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


def _five(seed=0, **change):
    cfg = zoo.five_config_small()
    if "allies" in change:  # two features inserted in the middle of a group
        n, names = cfg.groups["allies"]
        cfg.groups["allies"] = (n, names[:2] + tuple(change["allies"]) + names[2:])
    if "core" in change:
        cfg.core = change["core"]
    if "heads" in change:
        cfg.heads = {**cfg.heads, **change["heads"]}
    if "categories" in change:
        cfg.categories = {"enemy_type": cfg.categories["enemy_type"] + change["categories"]}
    torch.manual_seed(seed)
    return zoo._five(cfg, "cpu")


def _real():
    import real_models  # needs transformers
    return real_models


def map_cases():
    """name -> () -> (model, inputs, features)."""
    x = lambda *s: torch.randn(*s, generator=torch.Generator().manual_seed(0))  # noqa: E731
    return {
        "five_small": lambda: _five(),
        "mlp": lambda: _seeded(zoo.mlp),
        "cnn": lambda: _seeded(lambda: (lambda m, i, f: (m.eval(), i, f))(*zoo.small_cnn())),
        "lstm2": lambda: _seeded(lambda: (Recurrent(nn.LSTM(3, 4, num_layers=2, batch_first=True), 4),
                                          (x(2, 5, 3),), {"x": fs.Features(FEATS)})),
        "lstm_proj_bi": lambda: _seeded(lambda: (
            Recurrent(nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True), 4),
            (x(5, 2, 3),), {"x": fs.Features(FEATS)})),
        "gru_state": lambda: _seeded(lambda: (WithState(nn.GRU(3, 4, batch_first=True)),
                                              (x(2, 5, 3), x(1, 2, 4)), {"x": fs.Features(FEATS)})),
        "block_sdpa": lambda: _seeded(lambda: (Block(4, 2, False), (x(2, 5, 3),), {"x": fs.Features(FEATS)})),
        "block_weights": lambda: _seeded(lambda: (Block(4, 2, True), (x(2, 5, 3),), {"x": fs.Features(FEATS)})),
        "causal": lambda: _seeded(lambda: (Causal(5), (x(2, 5, 3),),
                                           {"x": fs.Features([f"t{t}" for t in range(5)], dim=1)})),
        "llama": lambda: _real().llama(vocab=VOCAB),
        "gpt2": lambda: _real().gpt2(VOCAB),
        "vit": lambda: _real().vit(),
    }


def plan_cases():
    """name -> () -> (old (model, inputs, features), new (model, inputs, features))."""
    return {
        "five_features_added": lambda: (_five(0), _five(1, allies=["armor", "speed"])),
        "five_lstm_widened": lambda: (_five(0), _five(1, core=40)),
        "five_head_added": lambda: (_five(0), _five(1, heads={"jump": 3})),
        "five_categories_added": lambda: (_five(0), _five(1, categories=["courier", "roshan"])),
        "llama_heads_added": lambda: (_real().llama(4, 2, vocab=VOCAB), _real().llama(6, 3, vocab=VOCAB, seed=1)),
        "gpt2_tokens_added": lambda: (_real().gpt2(VOCAB), _real().gpt2(VOCAB + ["<a>", "<b>"], seed=1)),
        "bert_wider": lambda: (_real().bert(64, vocab=VOCAB), _real().bert(80, vocab=VOCAB, seed=1)),
    }


# digests -----------------------------------------------------------------------------------
def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _element_digest(imap, terms) -> str:
    """Every element's set, written by label name in row-major order."""
    dense = terms.dense(imap.pool).contiguous().reshape(-1)
    uniq, inverse = torch.unique(dense, return_inverse=True)
    words = [",".join(sorted(str(lab) for lab in imap.pool.labels_in(int(s)))) for s in uniq.tolist()]
    return _sha(";".join(words[i] for i in inverse.tolist()))


def map_digest(imap) -> dict:
    out = {"json": imap.to_json(), "table": imap.table().splitlines(), "elements": {}}
    for name, e in imap.entries.items():
        row = {"deps": _element_digest(imap, e.meets)}
        if e.key_meets is not None:
            row["key_meets"] = _element_digest(imap, e.key_meets)
            row["key_aligned"] = _element_digest(imap, e.key_aligned)
        out["elements"][name] = row
    return out


def plan_digest(plan) -> dict:
    new = plan.apply()
    state = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
             for k, v in sorted(new.state_dict().items())}
    return {"table": plan.table().splitlines(), "summary": plan.summary().splitlines(), "state": state}


def compute_map(name: str, dynamic: bool = False) -> dict:
    model, inputs, features = map_cases()[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return map_digest(fs.interaction_map(fs.trace(model, inputs, features, dynamic=dynamic)))


def compute_plan(name: str, dynamic: bool = False) -> dict:
    (om, oi, of), (nm, ni, nf) = plan_cases()[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_digest(fs.plan(fs.trace(om, oi, of, dynamic=dynamic), fs.trace(nm, ni, nf, dynamic=dynamic)))


def path(kind: str, name: str) -> str:
    return os.path.join(GOLDEN, f"{kind}_{name}.json")


def main() -> None:
    print("fxsurgery from", fs.__file__)
    os.makedirs(GOLDEN, exist_ok=True)
    for name in map_cases():
        with open(path("map", name), "w") as f:
            json.dump(compute_map(name), f, indent=0, sort_keys=True)
        print("map", name)
    for name in plan_cases():
        with open(path("plan", name), "w") as f:
            json.dump(compute_plan(name), f, indent=0, sort_keys=True)
        print("plan", name)


if __name__ == "__main__":
    main()
