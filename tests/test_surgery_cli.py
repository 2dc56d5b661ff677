"""`fxsurgery plan` and `fxsurgery transplant`, as a pipeline would call them. The factories below
are referred to as `test_surgery_cli:<name>` (pytest puts tests/ on sys.path)."""
import json

import pytest
import torch

import fxsurgery as fs
from fxsurgery.cli import main
from test_surgery import MLP, OBS, five_new, five_old


def old_mlp():
    torch.manual_seed(1)
    return MLP(4), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}


def new_mlp():
    torch.manual_seed(2)
    return MLP(6, hidden=10), {"obs": torch.randn(2, 6)}, {"obs": fs.Features(["armor"] + OBS + ["speed"])}


def pruned_mlp():
    torch.manual_seed(3)
    return MLP(4, hidden=5), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}


def meta_mlp():
    with torch.device("meta"):
        model = MLP(6, hidden=10)
    return model, {"obs": torch.randn(2, 6)}, {"obs": fs.Features(["armor"] + OBS + ["speed"])}


def other_mlp():
    return MLP(5, hidden=8)


def five_grown():
    return five_new()


def five_small():
    return five_old()


def _checkpoint(tmp_path, factory=old_mlp, name="old.pt"):
    model = factory()[0] if isinstance(factory(), tuple) else factory()
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_plan_prints_the_table(capsys):
    assert main(["plan", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fc1.weight" in out and "meets new obs: armor, speed (zeroed)" in out
    assert "positions of new fc1[8, 9] (kept)" in out
    assert "the new model computes what the old one did" in out


def test_transplant_writes_the_new_checkpoint(tmp_path, capsys):
    path, old_state = _checkpoint(tmp_path)
    out = tmp_path / "new.pt"
    assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
                 "--old-weights", str(path), "-o", str(out), "--verify", "4"]) == 0
    captured = capsys.readouterr()
    new_state = torch.load(out, weights_only=True)
    assert torch.equal(new_state["fc1.weight"][:8, 1:5], old_state["fc1.weight"])
    assert torch.count_nonzero(new_state["fc1.weight"][:, [0, 5]]) == 0
    assert torch.equal(new_state["head.bias"], old_state["head.bias"])
    assert "largest relative deviation over 4 random inputs" in captured.out and f"wrote {out}" in captured.out
    assert "applying the plan" in captured.err and "loading" in captured.err


def test_transplant_with_a_unit_map_and_a_nested_checkpoint(tmp_path, capsys):
    path, old_state = _checkpoint(tmp_path)
    torch.save({"state_dict": torch.load(path, weights_only=True), "step": 10}, path)
    units = tmp_path / "units.json"
    units.write_text(json.dumps({"fc1": [7, 1, 2, 0, 4]}))
    out = tmp_path / "new.pt"
    assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:pruned_mlp",
                 "--old-weights", str(path), "-o", str(out), "--units", str(units), "--quiet"]) == 0
    new_state = torch.load(out, weights_only=True)
    assert torch.equal(new_state["fc1.weight"], old_state["fc1.weight"][[7, 1, 2, 0, 4]])
    assert "pruned units" in capsys.readouterr().out


def test_transplant_materialises_a_new_model_built_on_meta(tmp_path, capsys):
    path, old_state = _checkpoint(tmp_path)
    out = tmp_path / "new.pt"
    assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:meta_mlp",
                 "--old-weights", str(path), "-o", str(out), "--verify", "2"]) == 0
    captured = capsys.readouterr()
    assert "meta device" in captured.err
    new_state = torch.load(out, weights_only=True)
    assert torch.equal(new_state["fc2.weight"][:8, :8], old_state["fc2.weight"])
    assert torch.isfinite(new_state["fc2.weight"]).all() and torch.count_nonzero(new_state["fc1.weight"][8:]) > 0


def test_transplant_of_the_five_policy(tmp_path, capsys):
    model = five_old()[0]
    path = tmp_path / "five.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "five_new.pt"
    assert main(["transplant", "--old", "test_surgery_cli:five_small", "--new", "test_surgery_cli:five_grown",
                 "--old-weights", str(path), "-o", str(out), "--verify", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "core.weight_hh_l0" in text and "largest relative deviation" in text
    deviation = float(text.split("largest relative deviation over 2 random inputs:")[1].split()[0])
    assert deviation <= 1e-5


def test_a_checkpoint_that_does_not_match_its_model(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path, factory=other_mlp)
    args = ["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
            "--old-weights", str(path), "-o", str(tmp_path / "x.pt"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not match the old model" in err and "fc1.weight (8, 5) (model: (8, 4))" in err
    state = torch.load(path, weights_only=True)
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing keys: head.bias" in err and "unexpected keys: extra.weight" in err
    assert not (tmp_path / "x.pt").exists()


def test_unreadable_checkpoints(tmp_path, capsys):
    base = ["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp", "-o",
            str(tmp_path / "x.pt"), "--quiet", "--old-weights"]
    assert main(base + [str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert main(base + [str(tmp_path / "list.pt")]) == 2
    assert "not a state dict" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(base + [str(tmp_path / "junk.pt")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_safetensors(tmp_path, capsys):
    path, old_state = _checkpoint(tmp_path)
    try:
        from safetensors.torch import save_file
    except ImportError:
        (tmp_path / "old.safetensors").write_bytes(b"x")
        assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
                     "--old-weights", str(tmp_path / "old.safetensors"), "-o", str(tmp_path / "new.pt"),
                     "--quiet"]) == 2
        assert "needs the safetensors package" in capsys.readouterr().err
        return
    save_file(old_state, tmp_path / "old.safetensors")
    assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
                 "--old-weights", str(tmp_path / "old.safetensors"), "-o", str(tmp_path / "new.safetensors"),
                 "--quiet"]) == 0


def test_bad_arguments(tmp_path, capsys):
    base = ["plan", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:pruned_mlp", "--quiet"]
    assert main(base + ["--rename", "fc1"]) == 2
    assert "must be OLD=NEW" in capsys.readouterr().err
    units = tmp_path / "u.json"
    units.write_text(json.dumps({"fc1": [0, 0]}))
    assert main(base + ["--units", str(units)]) == 2
    assert "old unit 0 is repeated" in capsys.readouterr().err
    assert main(base + ["--rename", "fc1=nothing"]) == 2
    assert "the new model has no parameter or module named 'nothing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp"])


def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    base = ["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
            "--old-weights", str(path), "-o"]
    assert main(base + [str(tmp_path / "missing_dir" / "x.pt")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "folder" in lines[0] and "missing_dir" in lines[0], captured.err
    assert captured.out == "" and not (tmp_path / "missing_dir").exists()    # nothing built, applied or printed
    # A folder is a checkpoint directory to stream into, replaced whole: never one holding an input.
    assert main(base + [str(tmp_path)]) == 2
    assert "holds the old checkpoint (--old-weights)" in capsys.readouterr().err


def test_the_output_is_never_the_old_checkpoint(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    before = path.read_bytes()
    assert main(["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
                 "--old-weights", str(path), "-o", str(tmp_path / "." / "old.pt"), "--quiet"]) == 2
    assert "is the old checkpoint (--old-weights)" in capsys.readouterr().err
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]


def test_transplant_carries_the_optimizer_state(tmp_path, capsys):
    model = old_mlp()[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        model(torch.randn(4, 4, generator=torch.Generator().manual_seed(s))).square().sum().backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "old.pt")
    torch.save(opt.state_dict(), tmp_path / "old.optim.pt")
    out, optim_out = tmp_path / "new.pt", tmp_path / "new.optim.pt"
    args = ["transplant", "--old", "test_surgery_cli:old_mlp", "--new", "test_surgery_cli:new_mlp",
            "--old-weights", str(tmp_path / "old.pt"), "-o", str(out), "--quiet"]
    assert main(args + ["--optimizer-state", str(tmp_path / "old.optim.pt"),
                        "--optimizer-output", str(optim_out)]) == 0
    new_model = new_mlp()[0]
    new_model.load_state_dict(torch.load(out, weights_only=True))
    new_opt = torch.optim.Adam(new_model.parameters(), lr=1e-2)
    new_opt.load_state_dict(torch.load(optim_out, weights_only=True))
    st, old_st = new_opt.state[new_model.fc1.weight], opt.state[model.fc1.weight]
    assert torch.equal(st["exp_avg"][:8, 1:5], old_st["exp_avg"]) and not st["exp_avg"][:, [0, 5]].any()
    assert torch.equal(st["step"], old_st["step"])
    capsys.readouterr()
    assert main(args[:-3] + ["-o", str(tmp_path / "x.pt"), "--optimizer-state", str(tmp_path / "old.optim.pt")]) == 2
    assert "go together" in capsys.readouterr().err
    torch.save({"not": "an optimizer"}, tmp_path / "bad.pt")
    assert main(args[:-3] + ["-o", str(tmp_path / "x.pt"), "--optimizer-state", str(tmp_path / "bad.pt"),
                             "--optimizer-output", str(tmp_path / "y.pt")]) == 2
    assert "is not an optimizer state_dict" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
