"""Streaming surgery of checkpoints: plan on meta-device models, carry a sharded safetensors
checkpoint tensor by tensor into a new one (fxsurgery.surgery.checkpoint)."""
import hashlib
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import fxsurgery as fs  # noqa: E402
from fxsurgery.surgery import checkpoint as ckpt  # noqa: E402
from fxsurgery.surgery.checkpoint import apply_to_checkpoint, transplant_checkpoint  # noqa: E402
from fxsurgery.surgery.checkpoint_files import SAFE_INDEX, parse_size  # noqa: E402
from real_models import VOCAB, llama, tokens  # noqa: E402

NEW_VOCAB = VOCAB + [f"new{i}" for i in range(8)]          # 8 tokens added
OLD_UNITS, NEW_UNITS = 64, 80                              # the MLP widened


def _meta(vocab, intermediate, **kw):
    with torch.device("meta"):
        return llama(vocab=vocab, intermediate=intermediate, **kw)


def _plan(old, new):
    return fs.plan(fs.trace(old.model, old.inputs, old.features), fs.trace(new.model, new.inputs, new.features))


def _const_init(module):
    """A deterministic initialisation, so that the streamed and in-memory routes can be
    compared element for element (0.5 is exact in bf16)."""
    for t in module.parameters(recurse=False):
        t.fill_(0.5)


def _load_dir(path):
    """The state_dict of a checkpoint directory, read through its index when it has one."""
    index = path / SAFE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(path / f))
    return sd


def _digest(path):
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def meta_plan():
    """A plan made on meta-device models only: 8 tokens added, the MLP 64 -> 80 units."""
    return _plan(_meta(VOCAB, OLD_UNITS), _meta(NEW_VOCAB, NEW_UNITS))


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory):
    """The old model (random weights, float32) saved by transformers in several shards."""
    d = tmp_path_factory.mktemp("old") / "llama"
    llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3).model.save_pretrained(d, max_shard_size="20KB")
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) >= 3
    return d


def test_streamed_checkpoint_equals_the_in_memory_route_and_preserves_the_old_model(meta_plan, old_dir, tmp_path):
    out = tmp_path / "new"
    written = meta_plan.apply_to_checkpoint(old_dir, out, init=_const_init, max_shard_size="30KB")
    assert len(written.files) >= 3 and (out / SAFE_INDEX).exists()
    streamed = _load_dir(out)

    # The in-memory route: real models, the new one initialised as the stream initialises.
    old = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3)
    new = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=1)
    with torch.no_grad():
        for m in new.model.modules():
            _const_init(m)
    _plan(old, new).apply()
    expected = new.model.state_dict()
    assert sorted(streamed) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(streamed[name], t), name

    # Loads strictly into the new model and computes what the old one did on the old tokens.
    fresh = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=5).model
    fresh.load_state_dict(streamed, strict=True)
    ids = tokens(len(VOCAB), batch=3, seq=8, seed=7)
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
        assert torch.equal(got, new.model(input_ids=ids).logits)
        torch.testing.assert_close(got[..., :len(VOCAB)], old.model(input_ids=ids).logits)
    # The kept and zeroed positions: new units' rows keep init, the columns meeting them are 0.
    gate, down = streamed["model.layers.0.mlp.gate_proj.weight"], streamed["model.layers.0.mlp.down_proj.weight"]
    assert (gate[OLD_UNITS:] == 0.5).all() and (down[:, OLD_UNITS:] == 0).all()
    assert (streamed["model.embed_tokens.weight"][len(VOCAB):] == 0).all()
    assert (streamed["lm_head.weight"][len(VOCAB):] == 0.5).all()


def test_bf16_in_bf16_out_and_the_default_init_is_the_modules_own(meta_plan, tmp_path):
    old = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3)
    old.model.to(torch.bfloat16).save_pretrained(tmp_path / "old", max_shard_size="10KB")
    written = meta_plan.apply_to_checkpoint(tmp_path / "old", tmp_path / "new")
    sd = _load_dir(tmp_path / "new")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert len(written.files) >= 3   # sharded like the source (max_shard_size defaults to its largest file)
    # nn.Linear.reset_parameters: uniform within 1/sqrt(fan_in), not all equal.
    rows = sd["model.layers.1.mlp.up_proj.weight"][OLD_UNITS:].float()
    assert rows.abs().max() <= 48 ** -0.5 + 1e-2 and rows.std() > 0.05
    fresh = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS).model.to(torch.bfloat16)
    fresh.load_state_dict(sd, strict=True)
    ids = tokens(len(VOCAB), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits[..., :len(VOCAB)], old.model(input_ids=ids).logits)


def test_initialising_only_the_new_rows_gives_what_initialising_the_module_gives(meta_plan, old_dir, tmp_path):
    for rows in (True, False):
        meta_plan.apply_to_checkpoint(old_dir, tmp_path / str(rows), init=_const_init, init_rows=rows)
    a, b = _load_dir(tmp_path / "True"), _load_dir(tmp_path / "False")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (a["model.layers.1.mlp.up_proj.weight"][OLD_UNITS:] == 0.5).all()


def test_dtype_converts_one_tensor_at_a_time(meta_plan, old_dir, tmp_path):
    meta_plan.apply_to_checkpoint(old_dir, tmp_path / "f32", init=_const_init)
    meta_plan.apply_to_checkpoint(old_dir, tmp_path / "bf16", init=_const_init, dtype=torch.bfloat16)
    a, b = _load_dir(tmp_path / "f32"), _load_dir(tmp_path / "bf16")
    assert {t.dtype for t in a.values()} == {torch.float32} and {t.dtype for t in b.values()} == {torch.bfloat16}
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)


def test_source_layouts_single_file_and_state_dict_give_the_same_checkpoint(meta_plan, old_dir, tmp_path):
    sd = _load_dir(old_dir)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.save(sd, tmp_path / "old.pt")
    ref = meta_plan.apply_to_checkpoint(old_dir, tmp_path / "a", init=_const_init, max_shard_size="1GB")
    assert ref.files == ["model.safetensors"] and not (tmp_path / "a" / SAFE_INDEX).exists()
    want = load_file(tmp_path / "a" / "model.safetensors")
    for src in (tmp_path / "model.safetensors", tmp_path / "old.pt", old_dir / SAFE_INDEX):
        out = tmp_path / f"from_{src.name}"
        meta_plan.apply_to_checkpoint(src, out, init=_const_init, max_shard_size="1GB")
        got = load_file(out / "model.safetensors")
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), src


def test_shards_respect_max_shard_size_and_the_index_is_right(meta_plan, old_dir, tmp_path):
    written = meta_plan.apply_to_checkpoint(old_dir, tmp_path / "new", max_shard_size=25_000)
    index = json.loads((tmp_path / "new" / SAFE_INDEX).read_text())
    sd = {}
    for f in written.files:
        part = load_file(tmp_path / "new" / f)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 25_000 or len(part) == 1, f
        assert all(index["weight_map"][k] == f for k in part)
        sd.update(part)
    assert written.files == [f"model-{i:05d}-of-{len(written.files):05d}.safetensors"
                             for i in range(1, len(written.files) + 1)]
    assert sorted(index["weight_map"]) == sorted(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_failure_while_writing_leaves_no_checkpoint_and_the_source_unchanged(meta_plan, old_dir, tmp_path,
                                                                               monkeypatch, fail_at):
    before = _digest(old_dir)
    opened = []

    class Failing(ckpt.ShardWriter):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opened.append(self)

        def write(self, name, tensor):
            if len(opened) - 1 == fail_at and self._next == len(self.order) - 1:
                raise _Boom(f"disk full while writing shard {fail_at}")
            super().write(name, tensor)

    monkeypatch.setattr(ckpt, "ShardWriter", Failing)
    with pytest.raises(_Boom):
        meta_plan.apply_to_checkpoint(old_dir, tmp_path / "new", max_shard_size="20KB")
    assert len(opened) == fail_at + 1
    assert os.listdir(tmp_path) == []          # neither dst nor its temporary sibling
    assert _digest(old_dir) == before


def test_a_failure_keeps_an_existing_destination_whole(meta_plan, old_dir, tmp_path, monkeypatch):
    dst = tmp_path / "new"
    meta_plan.apply_to_checkpoint(old_dir, dst, max_shard_size="20KB")
    before = _digest(dst)
    with pytest.raises(fs.SurgeryError, match="exists; pass overwrite=True"):
        meta_plan.apply_to_checkpoint(old_dir, dst)
    monkeypatch.setattr(ckpt, "write_index", lambda *a: (_ for _ in ()).throw(_Boom("index")))
    with pytest.raises(_Boom):
        meta_plan.apply_to_checkpoint(old_dir, dst, overwrite=True, max_shard_size="20KB")
    assert _digest(dst) == before and os.listdir(tmp_path) == ["new"]
    monkeypatch.undo()
    meta_plan.apply_to_checkpoint(old_dir, dst, overwrite=True, max_shard_size="1GB")
    assert os.listdir(dst) == ["model.safetensors"] and os.listdir(tmp_path) == ["new"]


def test_a_failed_final_rename_puts_the_existing_destination_back(meta_plan, old_dir, tmp_path, monkeypatch):
    dst = tmp_path / "new"
    meta_plan.apply_to_checkpoint(old_dir, dst, max_shard_size="20KB")
    before = _digest(dst)
    rename = os.rename

    def failing(a, b):
        if str(a).endswith(".partial"):
            raise _Boom("rename")
        rename(a, b)
    monkeypatch.setattr(ckpt.os, "rename", failing)
    with pytest.raises(_Boom):
        meta_plan.apply_to_checkpoint(old_dir, dst, overwrite=True, max_shard_size="1GB")
    monkeypatch.undo()
    assert _digest(dst) == before and os.listdir(tmp_path) == ["new"]


def _broken(old_dir, tmp_path, edit):
    sd = _load_dir(old_dir)
    edit(sd)
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     r"has no tensor model\.layers\.1\.mlp\.up_proj\.weight, which the plan copies"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(48, 72)),
     r"model\.layers\.0\.mlp\.down_proj\.weight \(in broken\.safetensors\) has shape \(48, 72\)"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)),
     r"does not have: model\.extra\.weight \(in broken\.safetensors\)"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensor_and_nothing_is_written(
        meta_plan, old_dir, tmp_path, edit, message):
    src = _broken(old_dir, tmp_path, edit)
    with pytest.raises(fs.SurgeryError, match=message):
        meta_plan.apply_to_checkpoint(src, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


def test_extra_tensors_are_ignored_when_not_strict(meta_plan, old_dir, tmp_path):
    src = _broken(old_dir, tmp_path, lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)))
    meta_plan.apply_to_checkpoint(src, tmp_path / "new", strict=False)
    assert "model.extra.weight" not in _load_dir(tmp_path / "new")


def test_tied_embeddings_are_written_once_as_transformers_does(tmp_path):
    old = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3)
    old.model.config.tie_word_embeddings = True
    old.model.tie_weights()
    old.model.save_pretrained(tmp_path / "old")
    assert "lm_head.weight" not in _load_dir(tmp_path / "old")
    with torch.device("meta"):
        new = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS)
        meta_old = llama(vocab=VOCAB, intermediate=OLD_UNITS)
    for m in (new.model, meta_old.model):
        m.config.tie_word_embeddings = True
        m.tie_weights()
    p, written = transplant_checkpoint(meta_old.model, new.model, meta_old.inputs, new.inputs, meta_old.features,
                                       new.features, tmp_path / "old", tmp_path / "new")
    sd = _load_dir(tmp_path / "new")
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    fresh = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS).model
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    result = fresh.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ids = tokens(len(VOCAB), seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits[..., :len(VOCAB)], old.model(input_ids=ids).logits)


def test_progress_callable_sees_every_byte(meta_plan, old_dir, tmp_path):
    seen = []
    written = meta_plan.apply_to_checkpoint(old_dir, tmp_path / "new", progress=lambda *a: seen.append(a))
    assert [n for n, _, _ in seen] and seen[-1][1] == seen[-1][2] == written.total_size
    assert all(a[1] < b[1] for a, b in zip(seen, seen[1:]))


def test_a_module_without_reset_parameters_needs_init(tmp_path):
    class Rows(torch.nn.Module):             # a linear layer of its own, with no reset_parameters
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n, 3))

        def forward(self, x):
            return x @ self.weight.T

    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.rows, self.out = Rows(n), torch.nn.Linear(n, 2)

        def forward(self, x):
            return self.out(torch.relu(self.rows(x)))

    feats = {"x": fs.Features(["a", "b", "c"])}
    with torch.device("meta"):
        old, new = Net(4), Net(6)
    p = fs.plan(fs.trace(old, (torch.zeros(2, 3, device="meta"),), feats),
                fs.trace(new, (torch.zeros(2, 3, device="meta"),), feats))
    save_file(Net(4).state_dict(), tmp_path / "old.safetensors")
    with pytest.raises(fs.SurgeryError, match=r"module rows \(Rows\).*has no reset_parameters.*pass init="):
        p.apply_to_checkpoint(tmp_path / "old.safetensors", tmp_path / "new")
    assert os.listdir(tmp_path) == ["old.safetensors"]
    p.apply_to_checkpoint(tmp_path / "old.safetensors", tmp_path / "new", init=_const_init, max_shard_size="1GB")
    sd = load_file(tmp_path / "new" / "model.safetensors")
    assert sd["rows.weight"].tolist() == [[1.0] * 3] * 4 + [[0.5] * 3] * 2
    assert (sd["out.weight"][:, 4:] == 0).all()
    assert all(t.device.type == "meta" for t in new.state_dict().values())   # the user's model is untouched


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 << 30 and parse_size(123) == 123
    with pytest.raises(fs.SurgeryError, match="max_shard_size"):
        parse_size("lots")


def test_copied_stretches_never_pass_through_torch(meta_plan, old_dir, tmp_path, monkeypatch):
    """Every tensor of this surgery (unchanged, rows added, columns added) is carried as byte
    ranges of the source: the same checkpoint whichever way the ranges are copied."""
    from fxsurgery.surgery import checkpoint_files, checkpoint_ranges
    meta_plan.apply_to_checkpoint(old_dir, tmp_path / "torch", init=_const_init, max_shard_size="30KB",
                                  dtype=torch.float64)    # a conversion: the torch route, for reference
    expected = {k: v.to(torch.float32) for k, v in _load_dir(tmp_path / "torch").items()}

    def no_torch(self, name):
        raise AssertionError(f"{name} was read through torch")
    monkeypatch.setattr(checkpoint_files.Source, "read", no_torch)
    calls = []
    real = os.copy_file_range

    def counting(*a):
        calls.append(a[2])
        return real(*a)
    monkeypatch.setattr(checkpoint_ranges.os, "copy_file_range", counting)
    digests = []
    for i, (file_copy_min, refuse) in enumerate([(1 << 20, False), (0, False), (0, True), (1 << 40, False)]):
        monkeypatch.setattr(checkpoint_ranges, "FILE_COPY_MIN", file_copy_min)
        if refuse:       # a file system without copy_file_range: read and write instead
            monkeypatch.setattr(checkpoint_ranges.os, "copy_file_range",
                                lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
        calls.clear()
        meta_plan.apply_to_checkpoint(old_dir, tmp_path / str(i), init=_const_init, max_shard_size="30KB")
        assert bool(calls) == (i in (0, 1))   # the kernel copies whole tensors (and old rows at 0), until refused
        got = _load_dir(tmp_path / str(i))
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)
        digests.append(_digest(tmp_path / str(i)))
    assert all(d == digests[0] for d in digests)


def test_a_truncated_shard_is_refused_before_anything_is_written(meta_plan, old_dir, tmp_path):
    import shutil
    src = tmp_path / "old"
    shutil.copytree(old_dir, src)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(fs.SurgeryError, match=rf"{shard.name} is shorter than its header says.*truncated"):
        meta_plan.apply_to_checkpoint(src, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["old"]
