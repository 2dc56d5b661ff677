"""Progress bars for mapping and planning (and streaming's, which shares fxsurgery.progress).
The factories below are referred to as `test_progress:<name>` (pytest puts tests/ on sys.path)."""
import shutil
import sys

import pytest
import torch

import fxsurgery as fs
import fxsurgery.progress as progress_module
from fxsurgery.cli import main
from fxsurgery.surgery import SurgeryError, planning
from fxsurgery.surgery.checkpoint import _progress as checkpoint_progress
from faults import nth_call_raises
from helpers import ThreeLayer, TwoLayer
from test_core_models import Regions

OBS = ["a", "b", "c", "d"]


def old_model():
    return TwoLayer(4, 8), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}


def new_model():
    return TwoLayer(4, 10), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}


def _traced(factory=old_model):
    model, inputs, features = factory()
    return fs.trace(model, inputs, features)


def _counts(calls, what):
    """The (done, total) of the calls about `what`, checked to count up by one to the total."""
    seen = [(done, total) for w, done, total in calls if w == what]
    assert seen, f"no call about {what!r} in {sorted({c[0] for c in calls})}"
    total = seen[0][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and {t for _, t in seen} == {total}
    return total


def _terminal(monkeypatch):
    """The captured stderr claims to be a terminal (called in the test: the stream the test
    writes to is set up after the fixtures)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


@pytest.fixture
def any_size(monkeypatch):
    """Every graph counts as large, so that progress=None would show a bar on a terminal."""
    monkeypatch.setattr(progress_module, "LARGE_GRAPH", 0)


@pytest.fixture
def no_tqdm(monkeypatch):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)


# mapping and planning report to a callable ------------------------------------------------

def test_mapping_counts_every_node_of_both_passes():
    # Regions' no_grad and autocast regions are sub-graphs run by propagators of their own,
    # whose nodes are not the traced graph's and must not count.
    traced = _traced(lambda: (Regions(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}))
    assert any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in traced.graph.nodes)
    calls = []
    fs.interaction_map(traced, progress=lambda *a: calls.append(a))
    assert _counts(calls, "mapping Regions") == 2 * len(traced.graph.nodes)
    calls.clear()
    fs.interaction_map(traced, keys=False, progress=lambda *a: calls.append(a))
    assert _counts(calls, "mapping Regions") == len(traced.graph.nodes)


def test_planning_reports_both_mappings_then_the_parameters_matched():
    old, new = _traced(old_model), _traced(new_model)
    calls = []
    p = fs.plan(old, new, progress=lambda *a: calls.append(a))
    phases = list(dict.fromkeys(w for w, _, _ in calls))
    assert phases == ["mapping TwoLayer", "planning TwoLayer"]
    mapping = [c for c in calls if c[0] == "mapping TwoLayer"]
    n_old, n_new = len(old.graph.nodes), len(new.graph.nodes)
    assert [c[1:] for c in mapping] == [(d, 2 * n_old) for d in range(1, 2 * n_old + 1)] + \
        [(d, 2 * n_new) for d in range(1, 2 * n_new + 1)]
    assert _counts(calls, "planning TwoLayer") == len(p.new_map.entries) == 4


# what is printed --------------------------------------------------------------------------

def test_no_bar_with_false_nor_with_none_off_a_terminal(capfd, any_size):
    traced = _traced()
    fs.interaction_map(traced, progress=False)
    fs.interaction_map(traced)                     # stderr is not a terminal here
    fs.plan(traced, _traced(new_model))
    assert capfd.readouterr() == ("", "")


def test_none_shows_a_bar_on_a_terminal_for_large_graphs_only(capsys, monkeypatch):
    _terminal(monkeypatch)
    traced = _traced()
    fs.interaction_map(traced)                     # a small graph: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "LARGE_GRAPH", len(traced.graph.nodes))
    fs.plan(traced, _traced(new_model))
    out, err = capsys.readouterr()
    assert out == "" and "mapping TwoLayer" in err and "planning TwoLayer" in err
    fs.interaction_map(traced, progress=False)
    with progress_module.no_bars():
        fs.plan(traced, _traced(new_model))
    assert capsys.readouterr() == ("", "")


def test_true_shows_the_bar_on_stderr_whatever_the_size(capsys):
    fs.interaction_map(_traced(), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "mapping TwoLayer" in err and "node" in err


# tqdm is optional -------------------------------------------------------------------------

def test_true_without_tqdm_is_a_clear_error(no_tqdm):
    with pytest.raises(ImportError, match=r"progress=True needs tqdm \(pip install tqdm\); pass progress=False"):
        fs.interaction_map(_traced(), progress=True)
    with pytest.raises(SurgeryError, match=r"progress=True needs tqdm"):
        fs.plan(_traced(), _traced(new_model), progress=True)
    with pytest.raises(SurgeryError, match=r"progress=True needs tqdm"):
        checkpoint_progress(True, 10)


def test_none_without_tqdm_shows_nothing_even_on_a_terminal(no_tqdm, any_size, capsys, monkeypatch):
    _terminal(monkeypatch)
    fs.plan(_traced(), _traced(new_model))
    report, close = checkpoint_progress(None, 10)
    report("x", 5, 10)
    close()
    assert capsys.readouterr() == ("", "")


def test_a_progress_that_is_not_a_flag_nor_a_callable_is_refused():
    with pytest.raises(TypeError, match=r"progress must be True, False, None or a callable.*got 'yes'"):
        fs.interaction_map(_traced(), progress="yes")


# a failure midway leaves no bar open -------------------------------------------------------

@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar opened, kept alive so that whether it was closed can be read."""
    import tqdm.auto
    opened = []

    class Spy(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opened.append(self)
    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    return opened


def test_a_rule_failing_midway_closes_the_mapping_bar(bars, capsys):
    registry = fs.REGISTRY.copy("failing-relu")

    def fail(ctx, x):
        raise RuntimeError("boom")
    registry.replace(torch.ops.aten.relu.default, fail)
    traced = _traced(lambda: (ThreeLayer(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}))
    with pytest.raises(fs.RuleError, match="boom"):
        fs.interaction_map(traced, registry=registry, progress=True)
    assert len(bars) == 1 and 0 < bars[0].n < bars[0].total and bars[0].disable   # stopped midway, closed


def test_a_match_failing_midway_closes_the_planning_bar(bars, capsys, monkeypatch):
    monkeypatch.setattr(planning, "match", nth_call_raises(planning.match, 2, RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        fs.plan(_traced(), _traced(new_model), progress=True)
    assert [b.desc for b in bars] == ["mapping TwoLayer", "mapping TwoLayer", "planning TwoLayer"]
    assert bars[2].n == 1 and all(b.disable for b in bars)


# the command line -------------------------------------------------------------------------

def _commands(tmp_path):
    weights = tmp_path / "old.pt"
    torch.save(old_model()[0].state_dict(), weights)
    models = ["--old", "test_progress:old_model", "--new", "test_progress:new_model"]
    return {
        "map": ["map", "test_progress:old_model"],
        "plan": ["plan", *models],
        "transplant": ["transplant", *models, "--old-weights", str(weights), "-o", str(tmp_path / "new.pt")],
        "transplant -o DIR": ["transplant", *models, "--old-weights", str(weights), "-o", str(tmp_path / "new")],
        "rewrite": ["rewrite", "test_progress:old_model", "--widen", "fc1=12", "--verify", "0",
                    "-o", str(tmp_path / "widened.pt")],
    }


@pytest.mark.parametrize("command", ["map", "plan", "transplant", "transplant -o DIR", "rewrite"])
def test_the_command_line_shows_bars_on_a_terminal_and_none_with_quiet(command, tmp_path, capsys, any_size,
                                                                       monkeypatch):
    _terminal(monkeypatch)
    argv = _commands(tmp_path)[command]
    assert main(argv + ["--quiet"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert "mapping" not in err and "planning" not in err and "mapping TwoLayer" not in out
    for f in tmp_path.iterdir():    # the outputs, written again
        if f.name != "old.pt":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "mapping TwoLayer" in err and "mapping TwoLayer" not in out   # bars on stderr, tables on stdout
