"""The examples run end to end: the rewriting example (six chained passes, each verified, then
training at another batch size; the script exits 1 if a change its plan calls preserving
deviates), and the growth example at a tiny size."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_rewrite_five_example(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rewrite_five.py"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "rewrite_five.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("verify: max relative deviation") == 6
    assert "training step 2" in out and "'core.weight_hh_l0': (256, 64)" in out


def test_grow_gpt2_example(capsys, monkeypatch, tmp_path):
    """The growth example, tiny: the loss just after growth is the loss just before (the script
    exits 1 otherwise), and the grown model trains on."""
    monkeypatch.setattr(sys, "argv", ["grow_gpt2.py", "--quick", "--plot", str(tmp_path / "curves.png")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "grow_gpt2.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "preserves function: True" in out and "final held-out loss after 20 steps: grown" in out and "small never grown" in out
