"""`fxsurgery rewrite`, as a pipeline would call it. The factories below are referred to as
`test_rewrite_cli:<name>` (pytest puts tests/ on sys.path); the zoo's as `fxsurgery.zoo:<name>`."""
import json
import re

import pytest
import torch

import fxsurgery as fs
from helpers import SelfAttention as Attention
from helpers import TwoLayer as MLP
from fxsurgery.cli import main, parser
from fxsurgery.labels import description_from_json

OBS = ["hp", "mana", "x", "y"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("quiet")




def mlp():
    return MLP(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}


def bare_mlp():
    return MLP()


def broken():
    raise RuntimeError("no such checkpoint server")


def not_a_model():
    return 42


def checkpoint(tmp_path, factory=mlp, name="old.pt", seed=0):
    torch.manual_seed(seed)
    made = factory()
    model = made[0] if isinstance(made, tuple) else made
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def rewritten(factory, state, *changes):
    """The module `fxsurgery rewrite` builds, made again in Python from the same old weights:
    `changes` are (fs.passes function, args, kwargs)."""
    made = factory()
    model, inputs, features = made
    model.load_state_dict(state)
    source = fs.trace(model.eval(), inputs, features)
    for fn, args, kwargs in changes:
        source = fn(source, *args, **kwargs)
    return model, source


def deviation(text, n=8):
    marker = f"largest relative deviation over {n} random inputs:"
    return [float(part.split()[0]) for part in text.split(marker)[1:]]


def test_rewrite_adds_features_and_widens_in_order(tmp_path, capsys):
    old, old_state = checkpoint(tmp_path)
    out, feats = tmp_path / "new.pt", tmp_path / "features.json"
    assert main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--add-features", "obs:armor,speed@mana",
                 "--widen", "fc1=12", "-o", str(out), "--features-out", str(feats)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    # Each change: its plan's table, summary and verification, in the order given.
    assert text.index("== 1. --add-features obs:armor,speed@mana") < text.index("== 2. --widen fc1=12")
    assert "meets new obs: armor, speed (zeroed)" in text and "meets new 4 units of fc1 (zeroed)" in text
    assert text.count("the new model computes what the old one did") == 2
    assert all(d <= TOL for d in deviation(text)) and len(deviation(text)) == 2
    assert f"wrote {out}" in text and f"wrote {feats}" in text
    assert "loading" in captured.err

    state = torch.load(out, weights_only=True)
    assert state["fc1.weight"].shape == (12, 6) and state["fc2.weight"].shape == (3, 12)
    assert torch.equal(state["fc1.weight"][:8, [0, 1, 4, 5]], old_state["fc1.weight"])
    assert torch.count_nonzero(state["fc1.weight"][:8, 2:4]) == 0
    assert torch.count_nonzero(state["fc2.weight"][:, 8:]) == 0 and torch.equal(state["fc2.bias"], old_state["fc2.bias"])
    # The features file says what the new input holds, and reads back as a description.
    written = json.loads(feats.read_text())
    assert written == {"obs": {"features": ["hp", "mana", "armor", "speed", "x", "y"], "dim": -1}}
    assert description_from_json(written["obs"]) == fs.Features(["hp", "mana", "armor", "speed", "x", "y"])

    # The weights are for the rewritten architecture: made again, it loads them strictly and
    # computes what the old model did whatever the new features hold.
    model, gm = rewritten(mlp, old_state, (fs.passes.add_features, ("obs", ["armor", "speed"]), {"at": "mana"}),
                          (fs.passes.widen, ("fc1", 12), {}))
    gm.load_state_dict(state, strict=True)
    x = torch.randn(5, 4)
    y = gm(torch.cat([x[:, :2], torch.randn(5, 2), x[:, 2:]], 1))
    y = y[0] if isinstance(y, (tuple, list)) else y
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)


def test_rewrite_of_the_zoo_policy_to_safetensors(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file
    from fxsurgery.zoo import five_small

    old, old_state = checkpoint(tmp_path, five_small)
    out = tmp_path / "five_new.safetensors"
    assert main(["rewrite", "fxsurgery.zoo:five_small", "--weights", str(old), "--add-categories", "enemy_type:boss",
                 "--widen", "core=+4", "--add-features", "self:self.armor@self.f2", "--verify", "3", "-o", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "meets new enemy_type: boss (zeroed)" in text and "new labels: core.l0[32, 33, 34, 35]" in text
    assert "meets new self: self.armor (zeroed)" in text
    assert all(d <= TOL for d in deviation(text, 3)) and len(deviation(text, 3)) == 3
    state = load_file(out)
    assert torch.equal(state["encoders.self.0.weight"][:, [0, 1, 2, 4, 5, 6]], old_state["encoders.self.0.weight"])
    assert torch.count_nonzero(state["encoders.self.0.weight"][:, 3]) == 0
    assert state["embeddings.enemy_type.weight"].shape == (5, 24)
    assert torch.equal(state["embeddings.enemy_type.weight"][:4], old_state["embeddings.enemy_type.weight"])
    assert state["core.weight_hh_l0"].shape == (4 * 36, 36) and state["heads.move.weight"].shape == (5, 36)
    _, gm = rewritten(five_small, old_state, (fs.passes.add_categories, ("enemy_type", ["boss"]), {}),
                      (fs.passes.widen, ("core",), {"by": 4}),
                      (fs.passes.add_features, ("self", ["self.armor"]), {"at": "self.f2"}))
    gm.load_state_dict(state, strict=True)


def test_prune_reorder_and_remove(tmp_path, capsys):
    old, old_state = checkpoint(tmp_path, seed=3)
    out = tmp_path / "new.pt"
    assert main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--reorder-features", "obs:y,x,mana,hp",
                 "--remove-features", "obs:mana", "--prune", "fc1=7,0,2", "-o", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "function preservation is impossible at:" in text        # removing mana, pruning units
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["fc1.weight"], old_state["fc1.weight"][[7, 0, 2]][:, [3, 2, 0]])
    assert torch.equal(state["fc2.weight"], old_state["fc2.weight"][:, [7, 0, 2]])


def test_the_zoo_mlp_pruned_by_position_without_weights(tmp_path, capsys):
    out = tmp_path / "new.pt"
    assert main(["rewrite", "fxsurgery.zoo:mlp", "--prune", "2=0,3,5", "--verify", "0", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no --weights" in captured.err and "largest relative deviation" not in captured.out
    state = torch.load(out, weights_only=True)
    assert state["2.weight"].shape == (3, 32) and state["4.weight"].shape == (3, 3)


def test_rewrite_is_a_registered_command():
    sub = next(a for a in parser()._actions if a.dest == "command")
    assert "rewrite" in sub.choices
    help_text = sub.choices["rewrite"].format_help()
    for flag in ("--add-features", "--remove-features", "--reorder-features", "--add-categories", "--widen",
                 "--prune", "--features-out", "--weights"):
        assert flag in help_text


@pytest.mark.parametrize("args, message", [
    (["--remove-features", "obs:armor"], r"--remove-features obs:armor: .*no features \['armor'\]; "
                                         r"the features are \['hp', 'mana', 'x', 'y'\]"),
    (["--add-features", "tokens:a"], r"no input 'tokens'; its inputs are \['obs'\]"),
    (["--add-features", "obs:hp"], r"\['hp'\] already exist"),
    (["--add-features", "obs:armor@z"], r"no feature 'z' to add after; the features are \['hp', 'mana', 'x', 'y'\]"),
    (["--widen", "fc9=10"], r"no hidden axis 'fc9'; the model's hidden axes are \['fc1', 'fc2'\]"),
    (["--widen", "fc1"], r"--widen 'fc1' must be GROUP=SIZE or GROUP=\+K"),
    (["--widen", "fc1=wide"], r"the size 'wide' is not an integer"),
    (["--prune", "fc1=0,99"], r"keep must list distinct positions in 0..7"),
    (["--add-features", "obs:armor", "--widen", "fc1=4"], r"--widen fc1=4: .*fc1 has 8 units; use prune_units"),
    ([], r"no change requested; give at least one of --add-features"),
])
def test_a_bad_change_fails_in_one_line_naming_what_exists_and_writes_nothing(tmp_path, capsys, args, message):
    old, _ = checkpoint(tmp_path)
    out, feats = tmp_path / "new.pt", tmp_path / "f.json"
    code = main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "-o", str(out),
                 "--features-out", str(feats), "--quiet"] + args)
    assert code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fxsurgery rewrite: error: ")
    assert re.search(message, err), err
    assert not out.exists() and not feats.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["old.pt"]       # no temporary file left either


@pytest.mark.parametrize("model, message", [
    ("no_such_module_xyz:mlp", "cannot import 'no_such_module_xyz'"),
    ("test_rewrite_cli:nothing", "has no 'nothing'"),
    ("test_rewrite_cli:broken", "factory 'test_rewrite_cli:broken' failed: RuntimeError: no such checkpoint server"),
    ("test_rewrite_cli:not_a_model", "returned int; expected a module or"),
    ("test_rewrite_cli:bare_mlp", "gives no example inputs: pass --input name=shape"),
])
def test_a_bad_factory(tmp_path, capsys, model, message):
    out = tmp_path / "new.pt"
    assert main(["rewrite", model, "--widen", "fc1=9", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_bare_module_with_inputs_and_features_given_on_the_command_line(tmp_path, capsys):
    feats = tmp_path / "features.json"
    feats.write_text(json.dumps({"obs": OBS}))
    out = tmp_path / "new.pt"
    assert main(["rewrite", "test_rewrite_cli:bare_mlp", "--input", "obs=3x4", "--features", str(feats),
                 "--add-features", "obs:armor@0", "-o", str(out), "--quiet"]) == 0
    assert torch.load(out, weights_only=True)["fc1.weight"].shape == (8, 5)


def test_a_checkpoint_that_does_not_match_and_an_existing_output_left_alone(tmp_path, capsys):
    old, _ = checkpoint(tmp_path, factory=lambda: MLP(5, 6))
    out = tmp_path / "new.pt"
    out.write_bytes(b"the previous checkpoint")
    assert main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--widen", "fc1=9", "-o", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "fc1.weight (6, 5) (model: (8, 4))" in err
    assert out.read_bytes() == b"the previous checkpoint"
    assert main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(tmp_path / "missing.pt"), "--widen", "fc1=9",
                 "-o", str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["rewrite", "test_rewrite_cli:mlp", "--widen", "fc1=9", "-o", str(tmp_path / "no" / "new.pt"),
                 "--quiet"]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "no").exists()




def attention():
    return Attention(), {"x": torch.randn(2, 3, 8)}, {"x": fs.Features([f"f{i}" for i in range(8)])}


def test_the_structural_changes(tmp_path, capsys):
    old, old_state = checkpoint(tmp_path)
    out = tmp_path / "new.pt"
    assert main(["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--insert-identity-layer", "fc1=extra",
                 "-o", str(out), "--quiet"]) == 0
    assert all(d <= TOL for d in deviation(capsys.readouterr().out))
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["extra.weight"], torch.eye(8)) and torch.equal(state["fc1.weight"], old_state["fc1.weight"])

    old, old_state = checkpoint(tmp_path, attention, name="attn.pt")
    assert main(["rewrite", "test_rewrite_cli:attention", "--weights", str(old), "--add-heads", "=2",
                 "-o", str(out), "--quiet"]) == 0
    assert all(d <= TOL for d in deviation(capsys.readouterr().out))
    state = torch.load(out, weights_only=True)
    assert state["q.weight"].shape == (16, 8) and torch.count_nonzero(state["o.weight"][:, 8:]) == 0
    assert main(["rewrite", "test_rewrite_cli:attention", "--add-heads", "q=x", "-o", str(tmp_path / "x.pt")]) == 2
    assert "the number of heads 'x' is not an integer" in capsys.readouterr().err


def test_no_output_is_an_input_or_the_other_output(tmp_path, capsys):
    old, _ = checkpoint(tmp_path)
    feats = tmp_path / "features.json"
    feats.write_text(json.dumps({"obs": OBS}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    base = ["rewrite", "test_rewrite_cli:mlp", "--weights", str(old), "--widen", "fc1=9", "--quiet"]
    for extra, message in ((["-o", str(old)], "is the checkpoint (--weights)"),
                           (["-o", str(tmp_path / "n.pt"), "--features", str(feats), "--features-out", str(feats)],
                            "is the features file (--features)"),
                           (["-o", str(tmp_path / "n.pt"), "--features-out", str(tmp_path / "n.pt")],
                            "is also the new checkpoint (-o)")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
