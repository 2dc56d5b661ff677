"""Faults injected into every file the command line writes: whatever fails, and wherever, a file
that existed before keeps its bytes, a file that did not stays absent, no temporary file is left
behind, the user's checkpoint is untouched, and the exit status is 2 (130 for an interrupt).

The faults: the k-th write to the temporary file, its fsync, the k-th rename into place (with two
outputs, the second rename fails after the first succeeded), and torch.save writing half a file
before failing (what an interrupt during a save looks like)."""
import os

import pytest
import torch

import fxsurgery.cli.files as files
from faults import fail_at
from fxsurgery.cli import main
from test_rewrite_cli import mlp as rewrite_mlp
from test_surgery_cli import old_mlp

PREVIOUS = b"the previous file"


class FailAt:
    """Replaces `owner.name` by a wrapper that raises `exc` at its k-th call (once) and calls
    the original otherwise; `calls` counts the calls, so a test can check the fault fired."""

    def __init__(self, monkeypatch, owner, name, k, exc):
        self.original, self.k, self.exc, self.calls = getattr(owner, name), k, exc, 0
        monkeypatch.setattr(owner, name, self)

    def __get__(self, obj, objtype=None):  # patched onto a class: bind like a method
        return self if obj is None else (lambda *a, **kw: self(obj, *a, **kw))

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise self.exc
        return self.original(*args, **kwargs)


def _torch_save_writes_half(exc):
    """A torch.save that writes the start of a file, then fails."""
    def save(obj, f, *args, **kwargs):
        save.calls += 1
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as opened:
                opened.write(b"PK\x03\x04 half a checkpoint")
        else:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise exc
    save.calls = 0
    return save


def _writer(name, tmp_path):
    """The command line and the files it writes, for one writer."""
    old = tmp_path / "old.pt"
    torch.save((rewrite_mlp if name.startswith("rewrite") else old_mlp)()[0].state_dict(), old)
    if name == "transplant -o":
        out = [tmp_path / "new.pt"]
        args = ["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
                "--old-weights", str(old), "-o", str(out[0]), "--quiet"]
    elif name == "map --json":
        out = [tmp_path / "map.json"]
        args = ["map", "fxsurgery.zoo:mlp", "--json", str(out[0])]
    elif name == "rewrite -o":
        out = [tmp_path / "new.pt"]
        args = ["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--widen", "fc1=9", "--verify", "0",
                "-o", str(out[0]), "--quiet"]
    else:  # rewrite -o with --features-out: two files, both or neither
        out = [tmp_path / "new.pt", tmp_path / "features.json"]
        args = ["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--add-features", "obs:armor",
                "--verify", "0", "-o", str(out[0]), "--features-out", str(out[1]), "--quiet"]
    return args, out, old


WRITERS = ["transplant -o", "map --json", "rewrite -o", "rewrite --features-out"]
OUTPUTS = {"rewrite --features-out": 2}
FAULTS = [("write", 1), ("write", 2), ("write", 7), ("fsync", 1), ("replace", 1), ("replace", 2),
          ("torch.save", 1)]
# (exception, exit status, whether the outputs existed before)
OUTCOMES = [(OSError(28, "No space left on device"), 2, True), (RuntimeError("injected"), 2, False),
            (KeyboardInterrupt(), 130, True), (KeyboardInterrupt(), 130, False)]
CASES = [pytest.param(w, f, k, exc, status, existing,
                      id=f"{w}-{f}#{k}-{type(exc).__name__}-{'over a previous file' if existing else 'new file'}")
         for w in WRITERS for f, k in FAULTS for exc, status, existing in OUTCOMES
         if not (f == "torch.save" and w == "map --json")          # map writes no torch file
         and not (f == "replace" and k > OUTPUTS.get(w, 1))]       # one output: one rename


def _inject(monkeypatch, fault, k, exc):
    if fault == "write":
        return FailAt(monkeypatch, files.AtomicFile, "_write", k, exc)
    if fault == "fsync":
        return FailAt(monkeypatch, os, "fsync", k, exc)
    if fault == "replace":
        return FailAt(monkeypatch, os, "replace", k, exc)
    save = _torch_save_writes_half(exc)
    monkeypatch.setattr(torch, "save", save)
    return save


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("writer, fault, k, exc, status, existing", CASES)
def test_a_failed_write_leaves_every_file_as_it_was(tmp_path, monkeypatch, capsys, writer, fault, k, exc, status,
                                                    existing):
    args, outputs, old = _writer(writer, tmp_path)
    if existing:
        for path in outputs:
            path.write_bytes(PREVIOUS)
    checkpoint = old.read_bytes()
    before = sorted(os.listdir(tmp_path))
    injected = _inject(monkeypatch, fault, k, exc)

    assert main(args) == status
    assert injected.calls >= k, f"the fault was not reached ({injected.calls} calls)"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fxsurgery {args[0]}: "), err
    assert sorted(os.listdir(tmp_path)) == before          # no temporary file, no new output
    for path in outputs:
        if existing:
            assert path.read_bytes() == PREVIOUS, path
        else:
            assert not path.exists(), path
    assert old.read_bytes() == checkpoint


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("writer", WRITERS)
def test_without_a_fault_every_output_is_written_and_nothing_else(tmp_path, capsys, writer):
    """The same command lines succeed when nothing fails (so the faults above are what fails)."""
    args, outputs, old = _writer(writer, tmp_path)
    for path in outputs:
        path.write_bytes(PREVIOUS)
    before = sorted(os.listdir(tmp_path))
    assert main(args) == 0
    assert sorted(os.listdir(tmp_path)) == before
    assert all(path.read_bytes() != PREVIOUS for path in outputs)


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("k", [1, 3])
def test_an_interrupt_during_the_job_writes_nothing(tmp_path, capsys, k):
    args, (out,), old = _writer("transplant -o", tmp_path)
    out.write_bytes(PREVIOUS)
    with fail_at("write", k, KeyboardInterrupt) as calls:      # loading or applying the plan
        assert main(args) == 130
    assert calls.raised
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == PREVIOUS and sorted(os.listdir(tmp_path)) == ["new.pt", "old.pt"]
