"""`fxsurgery transplant` and `fxsurgery rewrite` with `-o DIR`: the models are built on the meta
device and the old checkpoint is streamed into DIR shard by shard. The factories below are
referred to as `test_streaming_cli:<name>` (pytest puts tests/ on sys.path)."""
import hashlib
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import fxsurgery as fs  # noqa: E402
from fxsurgery.cli import main  # noqa: E402
from fxsurgery.surgery import checkpoint as ckpt  # noqa: E402
from helpers import TwoLayer as MLP  # noqa: E402
from real_models import VOCAB, llama, tokens  # noqa: E402

NEW_VOCAB = VOCAB + ["<a>", "<b>", "<c>"]
OLD_UNITS, NEW_UNITS = 64, 80
BUILT = []          # the device each factory's model was built on, in call order

pytestmark = pytest.mark.usefixtures("quiet")


def _noted(built):
    BUILT.append(next(built.model.parameters()).device.type)
    return built


def old_llama():
    return _noted(llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3))


def new_llama():
    return _noted(llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=1))


def cpu_new_llama():
    """A factory that builds on the CPU whatever the default device (as one loading weights
    would): the command moves its model to meta."""
    with torch.device("cpu"):
        return _noted(llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=1))


def mlp():
    return MLP(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(["hp", "mana", "x", "y"])}


def _digest(path):
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory):
    """The old model saved by transformers in several shards, and the model itself."""
    d = tmp_path_factory.mktemp("old") / "llama"
    model = llama(vocab=VOCAB, intermediate=OLD_UNITS, seed=3).model
    model.save_pretrained(d, max_shard_size="20KB")
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) >= 3
    return d, model


def _transplant(src, out, *extra, new="test_streaming_cli:new_llama"):
    return main(["transplant", "--old", "test_streaming_cli:old_llama", "--new", new, "--old-weights", str(src),
                 "-o", str(out), *extra])


def _old_logits_preserved(new_model, old_model):
    ids = tokens(len(VOCAB), batch=3, seq=8, seed=7)
    with torch.no_grad():
        got = new_model(input_ids=ids).logits[..., :len(VOCAB)]
        torch.testing.assert_close(got, old_model(input_ids=ids).logits)


def test_transplant_streams_into_a_directory_that_from_pretrained_loads(old_dir, tmp_path, capsys):
    src, old_model = old_dir
    out = tmp_path / "new"
    BUILT.clear()
    assert _transplant(src, out, "--quiet") == 0
    assert BUILT == ["meta", "meta"]                 # neither model ever had weights
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "config.json" in captured.out
    assert "writing checkpoint" not in captured.err  # no bar: not a terminal, and --quiet
    assert sorted(os.listdir(tmp_path)) == ["new"]   # no temporary left next to it
    assert "config.json" in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)

    loaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.vocab_size == len(NEW_VOCAB) and loaded.config.intermediate_size == NEW_UNITS
    _old_logits_preserved(loaded.eval(), old_model)

    sd = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            sd.update(load_file(out / f))
    fresh = llama(vocab=NEW_VOCAB, intermediate=NEW_UNITS, seed=9).model
    fresh.load_state_dict(sd, strict=True)
    _old_logits_preserved(fresh, old_model)
    # New units' rows take the model's own init (normal, std 0.02), the columns meeting them are 0.
    gate = sd["model.layers.0.mlp.gate_proj.weight"]
    assert gate[OLD_UNITS:].std() > 0.005 and (sd["model.layers.0.mlp.down_proj.weight"][:, OLD_UNITS:] == 0).all()


def test_a_factory_with_weights_is_moved_to_meta_and_single_files_stream_too(old_dir, tmp_path, capsys):
    src, old_model = old_dir
    single = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old_model.state_dict().items() if k != "lm_head.weight"} |
              {"lm_head.weight": old_model.lm_head.weight.detach().clone()}, single)
    torch.save(old_model.state_dict(), tmp_path / "old.pt")
    for i, path in enumerate([single, tmp_path / "old.pt"]):
        BUILT.clear()
        assert _transplant(path, tmp_path / f"new{i}", "--quiet", new="test_streaming_cli:cpu_new_llama") == 0
        assert BUILT == ["meta", "cpu"]
        loaded = LlamaForCausalLM.from_pretrained(tmp_path / f"new{i}").eval()
        _old_logits_preserved(loaded, old_model)


class _Boom(OSError):
    pass


@pytest.mark.parametrize("error, status", [(_Boom(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_a_failure_leaves_no_half_checkpoint_and_an_existing_one_whole(old_dir, tmp_path, capsys, monkeypatch,
                                                                         error, status):
    src, _ = old_dir
    out = tmp_path / "new"
    assert _transplant(src, out, "--quiet") == 0
    (out / "model-00009-of-00009.safetensors").write_bytes(b"a stale shard of an older run")
    before, source = _digest(out), _digest(src)
    writes = []

    class Failing(ckpt.ShardWriter):
        def write(self, name, value):
            writes.append(name)
            if len(writes) == 7:
                raise error
            super().write(name, value)

    monkeypatch.setattr(ckpt, "ShardWriter", Failing)
    assert _transplant(src, out, "--quiet") == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("No space left" in err[0] if status == 2 else "interrupted" in err[0])
    assert _digest(out) == before and _digest(src) == source and sorted(os.listdir(tmp_path)) == ["new"]
    monkeypatch.undo()
    # A run that succeeds replaces the directory whole: the stale shard is gone.
    assert _transplant(src, out, "--quiet") == 0
    assert "model-00009-of-00009.safetensors" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["new"]


def _fails(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    return captured


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensor_and_nothing_is_written(old_dir, tmp_path,
                                                                                           capsys):
    src, old_model = old_dir
    sd = {k: v.contiguous() for k, v in old_model.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    args = ["transplant", "--old", "test_streaming_cli:old_llama", "--new", "test_streaming_cli:new_llama",
            "--old-weights", str(tmp_path / "broken.safetensors"), "-o", str(tmp_path / "new"), "--quiet"]
    _fails(capsys, args, "has no tensor model.layers.1.mlp.up_proj.weight, which the plan copies")
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


def test_the_output_directory_is_checked_before_the_work(old_dir, tmp_path, capsys):
    src, _ = old_dir
    base = ["transplant", "--old", "test_streaming_cli:old_llama", "--new", "test_streaming_cli:new_llama",
            "--quiet", "--old-weights"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    BUILT.clear()
    _fails(capsys, base + [str(src), "-o", str(tmp_path / "mine")], "holds files that are not a checkpoint's (notes.txt)")
    _fails(capsys, base + [str(src), "-o", str(tmp_path / "missing" / "new")], "does not exist; create it first")
    for inside in (src, src.parent):
        _fails(capsys, base + [str(src), "-o", str(inside)], "holds the old checkpoint (--old-weights)")
    _fails(capsys, base + [str(src), "-o", str(tmp_path / "new"), "--verify", "2"], "--verify needs both models")
    _fails(capsys, base + [str(src), "-o", str(tmp_path / "new.pt")], "is a checkpoint directory: give -o a directory")
    _fails(capsys, base + [str(tmp_path / "nothing"), "-o", str(tmp_path / "new")], "does not exist")
    assert BUILT == [] and sorted(os.listdir(tmp_path)) == ["mine"]       # no model built, nothing written
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_progress_bar_is_on_a_terminal_only_and_off_with_quiet(old_dir, tmp_path, capsys, monkeypatch):
    src, _ = old_dir
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _transplant(src, tmp_path / "a") == 0
    assert "writing checkpoint" in capsys.readouterr().err
    assert _transplant(src, tmp_path / "b", "--quiet") == 0
    assert "writing checkpoint" not in capsys.readouterr().err


def test_rewrite_streams_every_change_into_a_directory(tmp_path, capsys):
    torch.manual_seed(0)
    model = mlp()[0]
    save_file(model.state_dict(), tmp_path / "old.safetensors")
    out, feats = tmp_path / "new", tmp_path / "features.json"
    changes = ["--add-features", "obs:armor,speed@mana", "--widen", "fc1=12"]
    assert main(["rewrite", "test_streaming_cli:mlp", "--weights", str(tmp_path / "old.safetensors"), *changes,
                 "-o", str(out), "--features-out", str(feats), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.index("== 1. --add-features") < text.index("== 2. --widen") and f"wrote {out}" in text
    assert sorted(os.listdir(tmp_path)) == ["features.json", "new", "old.safetensors"]   # no intermediate left
    assert os.listdir(out) == ["model.safetensors"]          # a GraphModule has no config.json
    sd = load_file(out / "model.safetensors")

    # The same command writing a file (models in memory) gives the same copied and zeroed weights,
    # and the GraphModule it describes loads the streamed ones strictly and computes the old function.
    assert main(["rewrite", "test_streaming_cli:mlp", "--weights", str(tmp_path / "old.safetensors"), *changes,
                 "-o", str(tmp_path / "new.pt"), "--quiet", "--verify", "0"]) == 0
    capsys.readouterr()
    ref = torch.load(tmp_path / "new.pt", weights_only=True)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    assert torch.equal(sd["fc1.weight"][:8], ref["fc1.weight"][:8]) and torch.equal(sd["fc2.bias"], ref["fc2.bias"])
    assert torch.equal(sd["fc2.weight"][:, :8], ref["fc2.weight"][:, :8]) and (sd["fc2.weight"][:, 8:] == 0).all()
    _, inputs, features = mlp()
    model.eval()
    gm = fs.passes.widen(fs.passes.add_features(fs.trace(model, inputs, features), "obs", ["armor", "speed"],
                                                at="mana"), "fc1", 12)
    gm.load_state_dict(sd, strict=True)
    x = torch.randn(5, 4)
    y = gm(torch.cat([x[:, :2], torch.randn(5, 2), x[:, 2:]], 1))
    torch.testing.assert_close(y[0] if isinstance(y, (tuple, list)) else y, model(x), atol=1e-5, rtol=1e-5)
    assert json.loads(feats.read_text())["obs"]["features"] == ["hp", "mana", "armor", "speed", "x", "y"]


def test_rewrite_into_a_directory_needs_weights_and_no_verify(tmp_path, capsys):
    base = ["rewrite", "test_streaming_cli:mlp", "--widen", "fc1=12", "-o", str(tmp_path / "new"), "--quiet"]
    _fails(capsys, base, "which is missing")
    save_file(MLP().state_dict(), tmp_path / "old.safetensors")
    _fails(capsys, base + ["--weights", str(tmp_path / "old.safetensors"), "--verify", "4"], "--verify needs the models")
    assert sorted(os.listdir(tmp_path)) == ["old.safetensors"]
