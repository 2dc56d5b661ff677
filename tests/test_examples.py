"""The rewriting example runs end to end: six chained passes, each verified (the script exits 1
if a change its plan calls preserving deviates), then training at another batch size."""
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
