"""The command line, as a pipeline would call it."""
import json

from fxsurgery.cli import main


def test_map_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "map.json"
    assert main(["map", "fxsurgery.zoo:mlp", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0.weight" in text and "obs: x, y, vx, vy, angle, spin" in text
    data = json.loads(out.read_text())
    assert data["parameters"]["0.weight"]["labels"]["obs:vx"]["positions"][1] == [2]
    assert data["parameters"]["0.bias"]["labels"] == {}


def test_map_with_a_features_file_and_explicit_inputs(tmp_path, capsys):
    feats = tmp_path / "f.json"
    feats.write_text(json.dumps({"input": ["a", "b", "c", "d", "e", "f"]}))
    assert main(["map", "torch.nn:Identity", "--input", "input=2x6", "--features", str(feats)]) == 0
    assert "parameter" in capsys.readouterr().out


def test_map_bad_input_exits_non_zero_with_a_message(tmp_path, capsys):
    feats = tmp_path / "f.json"
    feats.write_text(json.dumps({"obs": ["a", "b"]}))
    assert main(["map", "fxsurgery.zoo:mlp", "--features", str(feats)]) == 2
    assert "'obs' name 2 features, but axis -1" in capsys.readouterr().err
    assert main(["map", "fxsurgery.zoo:missing"]) == 2
    assert "has no 'missing'" in capsys.readouterr().err
    assert main(["map", "fxsurgery.zoo:mlp", "--input", "obs=2xq"]) == 2
    assert "is not like 2x3x5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Every failure is one line on stderr and exit status 2.

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxsurgery

MODELS = textwrap.dedent('''
    import torch
    import fxsurgery as fs

    class MLP(torch.nn.Module):
        def __init__(self, n=4):
            super().__init__()
            self.fc = torch.nn.Linear(n, 3)

        def forward(self, obs):
            return self.fc(obs)

    def build():
        return MLP(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(["a", "b", "c", "d"])}

    def positional():
        return MLP(), (torch.randn(2, 4),), {"obs": fs.Features(["a", "b", "c", "d"])}

    def bare():
        return MLP()

    def broken():
        raise RuntimeError("no such checkpoint server")

    def interrupted():
        raise KeyboardInterrupt
''')


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A module of factories in the current directory only (not on sys.path), as a user's
    `mypkg.models` next to the shell would be; its name is unique to the test."""
    name = f"cli_models_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def one_line_error(err: str, command: str = "map") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fxsurgery {command}: "), err
    return lines[0]


def test_a_factory_is_imported_from_the_current_directory(models, capsys):
    assert main(["map", f"{models}:build"]) == 0
    assert "fc.weight" in capsys.readouterr().out
    assert os.getcwd() not in sys.path                 # put there for the import only


def test_positional_example_inputs_are_named_by_forward_s_parameters(models, capsys):
    assert main(["map", f"{models}:positional"]) == 0
    assert "obs: a, b, c, d" in capsys.readouterr().out


def test_a_factory_that_raises(models, capsys):
    assert main(["map", f"{models}:broken"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"factory '{models}:broken' failed: RuntimeError: no such checkpoint server" in line


def test_an_interrupt_exits_130_in_one_line(models, capsys):
    assert main(["map", f"{models}:interrupted"]) == 130
    assert "interrupted" in one_line_error(capsys.readouterr().err)


def test_json_into_a_missing_folder_fails_before_the_work(models, tmp_path, capsys):
    assert main(["map", f"{models}:build", "--json", str(tmp_path / "no" / "map.json")]) == 2
    captured = capsys.readouterr()
    assert "folder" in one_line_error(captured.err) and captured.out == ""
    (tmp_path / "plain").write_text("a file, not a folder")
    assert main(["map", f"{models}:build", "--json", str(tmp_path / "plain" / "map.json")]) == 2
    assert "not a folder" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("entry, message", [
    ({"features": "abcd"}, "expects a list of names, got the string 'abcd'"),
    ({"categories": "abcd"}, "expects a list of names, got the string 'abcd'"),
    ({"features": ["a", "b", "c", "d"], "dim": "last"}, "'dim' must be an integer axis"),
    ({"features": ["a", "b", "c", "d"], "dim": True}, "'dim' must be an integer axis"),
    ("abcd", "expected a list of names"),
])
def test_a_malformed_features_file(models, tmp_path, capsys, entry, message):
    feats = tmp_path / "f.json"
    feats.write_text(json.dumps({"obs": entry}))
    assert main(["map", f"{models}:bare", "--input", "obs=2x4", "--features", str(feats)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert message in line and str(feats) in line and "'obs'" in line


def test_an_input_of_the_wrong_shape_is_one_line_without_torch_s_logging(models):
    # A process of its own: torch's log handler writes to the real stderr, which pytest's
    # capture does not show the way a shell does.
    run = subprocess.run([sys.executable, "-m", "fxsurgery.cli", "map", f"{models}:bare", "--input", "obs=2x5"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "torch.export could not capture MLP" in one_line_error(run.stderr)


@pytest.mark.parametrize("text, message", [("obs=2x-3", "negative"), ("obs=", "must be name=2x3x5")])
def test_a_bad_input_argument(models, capsys, text, message):
    assert main(["map", f"{models}:bare", "--input", text]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_an_unexpected_error_is_one_line_unless_debugging(models, monkeypatch, capsys):
    def boom(*a, **k):
        raise TypeError("something inside went wrong")
    monkeypatch.setattr(fxsurgery, "interaction_map", boom)
    assert main(["map", f"{models}:build"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "TypeError: something inside went wrong" in line and "FXSURGERY_DEBUG=1" in line
    monkeypatch.setenv("FXSURGERY_DEBUG", "1")
    assert main(["map", f"{models}:build"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err


def test_a_bad_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["map"])
    assert exc.value.code == 2
    assert "the following arguments are required: model" in one_line_error(capsys.readouterr().err)


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch, capsys):
    import fxsurgery.cli as cli
    monkeypatch.setitem(sys.modules, "fxsurgery.cli.rewrite", None)     # `import` raises ImportError
    assert main(["map", "fxsurgery.zoo:mlp"]) == 2
    err = capsys.readouterr().err
    assert "command 'rewrite'" in err and "fxsurgery.cli.rewrite" in err and len(err.strip().splitlines()) == 1
    assert set(cli.COMMANDS) == {"map", "plan", "transplant", "rewrite", "coverage"}


def test_a_new_output_gets_the_permissions_open_would_give(tmp_path, capsys):
    out = tmp_path / "map.json"
    assert main(["map", "fxsurgery.zoo:mlp", "--json", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask       # not mkstemp's 0600
    out.chmod(0o640)
    assert main(["map", "fxsurgery.zoo:mlp", "--json", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o640                 # a replaced file keeps its own
