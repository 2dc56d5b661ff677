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
