"""Streamed checkpoints byte for byte against the in-memory route (SurgeryPlan.apply on loaded
models), in bf16 and float32, for a surgery whose tensors take every route of the stream:
rows gathered (a reordered vocabulary), rows zero-filled and rows newly initialised (tokens
added), columns zero-filled (units added), whole tensors copied unchanged."""
import json
import time

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import fxsurgery as fs  # noqa: E402
from fxsurgery.surgery import checkpoint as ckpt  # noqa: E402
from fxsurgery.surgery.checkpoint_files import SAFE_INDEX  # noqa: E402
from real_models import VOCAB, llama  # noqa: E402

# Tokens reordered (rows gathered), 5 dropped, 8 added; the MLP widened 64 -> 80 units.
NEW_VOCAB = list(reversed(VOCAB[5:])) + [f"new{i}" for i in range(8)]
OLD_UNITS, NEW_UNITS = 64, 80


def _init(module):
    """Deterministic, so that both routes give the same new elements (0.5 is exact in bf16)."""
    for t in module.parameters(recurse=False):
        t.fill_(0.5)


def _plan(old, new):
    return fs.plan(fs.trace(old.model, old.inputs, old.features), fs.trace(new.model, new.inputs, new.features))


def _load_dir(path):
    files = sorted(set(json.loads((path / SAFE_INDEX).read_text())["weight_map"].values()))
    sd = {}
    for f in files:
        sd.update(load_file(path / f))
    return sd, files


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def meta_plan():
    with torch.device("meta"):
        old, new = llama(vocab=VOCAB, intermediate=OLD_UNITS), llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS)
    return _plan(old, new)


def _expected(dtype):
    old = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3)
    old.model.to(dtype)
    new = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=1)
    new.model.to(dtype)
    with torch.no_grad():
        for m in new.model.modules():
            _init(m)
    _plan(old, new).apply()
    return old.model.state_dict(), new.model.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("init_rows", [True, False])
def test_streamed_bytes_equal_the_in_memory_route(meta_plan, tmp_path, dtype, init_rows):
    src = tmp_path / "old"
    old_model = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3).model.to(dtype)
    old_model.save_pretrained(src, max_shard_size="20KB")
    written = meta_plan.apply_to_checkpoint(src, tmp_path / "new", init=_init, init_rows=init_rows,
                                            max_shard_size="30KB")
    streamed, files = _load_dir(tmp_path / "new")
    assert len(files) >= 3 and files == written.files
    old, expected = _expected(dtype)
    assert sorted(streamed) == sorted(expected)
    for name, t in expected.items():
        got = streamed[name]
        assert got.dtype == dtype and got.shape == t.shape, name
        assert torch.equal(_bytes(got), _bytes(t)), name

    # Each route was taken: the test would not hold if the surgery were a plain copy.
    emb, old_emb = streamed["model.embed_tokens.weight"], old["model.embed_tokens.weight"]
    order = [VOCAB.index(tok) for tok in NEW_VOCAB[:-8]]
    assert torch.equal(emb[:-8], old_emb[order])                    # gathered rows
    assert (emb[-8:] == 0).all()                                    # new tokens' input rows: zero
    # The output rows carry no labels here (no output features): matched by position, the
    # rows past the old vocabulary's newly initialised.
    head = streamed["lm_head.weight"]
    assert torch.equal(head[:len(VOCAB)], old["lm_head.weight"]) and (head[len(VOCAB):] == 0.5).all()
    gate, down = streamed["model.layers.1.mlp.gate_proj.weight"], streamed["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(gate[:OLD_UNITS], old["model.layers.1.mlp.gate_proj.weight"])
    assert (gate[OLD_UNITS:] == 0.5).all()                          # new units' rows: initialised
    assert torch.equal(down[:, :OLD_UNITS], old["model.layers.1.mlp.down_proj.weight"])
    assert (down[:, OLD_UNITS:] == 0).all()                         # the columns meeting them: zero
    assert torch.equal(streamed["model.layers.1.self_attn.q_proj.weight"],
                       old["model.layers.1.self_attn.q_proj.weight"])    # unchanged, copied whole


def test_a_tensor_being_written_is_never_overwritten_by_the_next(meta_plan, tmp_path, monkeypatch):
    """Writes run on a thread of their own while the next tensor is built: slow writes (each
    delayed before it starts) must still write what was built for them."""
    src = tmp_path / "old"
    llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3).model.to(torch.bfloat16).save_pretrained(src)
    meta_plan.apply_to_checkpoint(src, tmp_path / "fast", init=_init, init_rows=True)   # rows built in scratch
    real = ckpt.ShardWriter.write

    def slow(self, name, value):
        time.sleep(0.02)      # not a timing assertion: it lets the builder run ahead if it could
        real(self, name, value)
    monkeypatch.setattr(ckpt.ShardWriter, "write", slow)
    meta_plan.apply_to_checkpoint(src, tmp_path / "slow", init=_init, init_rows=True)
    fast = load_file(tmp_path / "fast" / "model.safetensors")
    slow_sd = load_file(tmp_path / "slow" / "model.safetensors")
    assert sorted(fast) == sorted(slow_sd)
    for name in fast:
        assert torch.equal(_bytes(fast[name]), _bytes(slow_sd[name])), name


def test_stretches_merge_where_one_continues_the_previous_in_both_tensors():
    from fxsurgery.surgery.checkpoint_ranges import _merge, _true_runs

    def reference(d, s, n):          # one stretch at a time
        out = []
        for a, b, c in zip(d, s, n):
            if out and out[-1][0] + out[-1][2] == a and out[-1][1] + out[-1][2] == b:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + c)
            else:
                out.append((a, b, c))
        return out
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        k = int(torch.randint(1, 40, (), generator=g))
        n = torch.randint(1, 5, (k,), generator=g)
        gaps = torch.randint(0, 2, (k,), generator=g) * torch.randint(1, 4, (k,), generator=g)
        d = torch.cumsum(n + gaps, 0) - n               # sorted, sometimes touching
        s = torch.cumsum(n + gaps.flip(0), 0) - n        # touching elsewhere
        assert _merge(d, s, n) == reference(d.tolist(), s.tolist(), n.tolist())
    mask = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert _true_runs(mask) == [(1, 2), (4, 1), (7, 1)] and _true_runs(mask, limit=2) is None
    assert _true_runs(torch.zeros(3, dtype=torch.bool)) == []


def test_short_reads_of_stretches_are_resumed_where_they_stopped(meta_plan, tmp_path, monkeypatch):
    from fxsurgery.surgery import checkpoint_ranges
    src = tmp_path / "old"
    llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3).model.save_pretrained(src)
    meta_plan.apply_to_checkpoint(src, tmp_path / "whole", init=_init)
    real, calls = checkpoint_ranges.os.preadv, []

    def short(fd, views, offset):     # at most 6 bytes a call, as a signal or a pipe may leave it
        calls.append(len(views))
        return real(fd, [memoryview(views[0])[:6]], offset)
    monkeypatch.setattr(checkpoint_ranges.os, "preadv", short)
    meta_plan.apply_to_checkpoint(src, tmp_path / "short", init=_init)
    assert max(calls) > 1              # several stretches per call were asked for
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "short" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(_bytes(a[k]), _bytes(b[k])) for k in a)
