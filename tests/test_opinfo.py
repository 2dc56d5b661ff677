"""Every registered rule checked against autodiff on torch's own samples (its OpInfo database),
or on a hand-written sample where torch has none (fxsurgery.testing.opinfo_hand.HAND).

What fails, and why it should:
- a rule whose result misses a dependence autodiff finds (unsound), on any sample;
- a rule larger than autodiff at generic points where no named divergence
  (fxsurgery.testing.opinfo_divergences.DIVERGENCES) explains the difference;
- a rule that raises on a valid sample;
- a registered rule that no sample checks and HAND does not explain (so that a new rule is
  checked the moment it is registered).
Rules the check finds wrong today are KNOWN_DEFECTS: they must keep failing until fixed.

Bounded by default (2 models per operator, from the first 4 samples of each OpInfo);
FXSURGERY_OPINFO_ALL=1 runs every sample of every source.
"""
import os

import pytest
import torch

pytest.importorskip("expecttest", reason="torch's OpInfo database needs the expecttest package")

import fxsurgery as fs  # noqa: E402
from fxsurgery.label_tensor import LabelTensor  # noqa: E402
from fxsurgery.testing.opinfo import EXTRA_SOURCES, models, sources  # noqa: E402
from fxsurgery.testing.opinfo_check import Runner  # noqa: E402
from fxsurgery.testing.opinfo_divergences import DIVERGENCES, KNOWN_DEFECTS  # noqa: E402
from fxsurgery.testing.opinfo_hand import HAND  # noqa: E402

aten = torch.ops.aten
ALL = os.environ.get("FXSURGERY_OPINFO_ALL") == "1"

pytestmark = [pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def reports():
    runner = Runner.everything() if ALL else Runner()
    return {rep.op: rep for rep in runner.run()}


def test_no_rule_is_unsound_loose_or_raises(reports):
    bad = {op: rep for op, rep in reports.items() if rep.failures and op not in KNOWN_DEFECTS}
    lines = [f"{op}: {r.status} on {r.model} ({r.graph} graph): {r.detail}"
             for op, rep in sorted(bad.items()) for r in rep.failures[:2]]
    assert not bad, "the OpInfo check failed for %d rules:\n%s" % (len(bad), "\n".join(lines))


def test_known_defects_still_fail(reports):
    """An entry of KNOWN_DEFECTS whose rule now passes must be removed (it would hide a regression)."""
    fixed = [op for op in KNOWN_DEFECTS if not reports[op].failures]
    assert not fixed, f"these KNOWN_DEFECTS pass now; remove them from the table: {fixed}"


def test_every_registered_rule_is_checked_or_explained(reports):
    missing = {op: rep.summary() for op, rep in reports.items()
               if not rep.checked and not rep.reason and op not in KNOWN_DEFECTS}
    assert not missing, ("registered rules that no sample checks: give each a sample (or the reason it "
                         "cannot be checked) in fxsurgery/testing/opinfo_hand.py HAND:\n"
                         + "\n".join(f"{op}: {why}" for op, why in sorted(missing.items())))


def test_most_rules_are_checked_by_autodiff(reports):
    # A floor, not a target: the check is vacuous if hardly any rule meets autodiff.
    checked = sum(rep.checked > 0 for rep in reports.values())
    assert checked >= 0.8 * len(reports), f"only {checked} of {len(reports)} rules were checked"


def test_tables_name_registered_operators():
    """Every key of the tables is a registered rule's operator: a misspelt name would excuse nothing."""
    registered = {str(r.op) for r in fs.REGISTRY}
    for name, table in (("HAND", HAND), ("DIVERGENCES", DIVERGENCES), ("KNOWN_DEFECTS", KNOWN_DEFECTS),
                        ("EXTRA_SOURCES", EXTRA_SOURCES)):
        stray = sorted(set(table) - registered)
        assert not stray, f"{name} names operators without a registered rule: {stray}"


# the check has teeth -------------------------------------------------------------------
def _forgetful(ctx, *args, **kwargs):
    """A rule that drops every label: each result depends on nothing."""
    out = ctx.out
    return tuple(LabelTensor.empty(tuple(v.shape)) for v in out) if isinstance(out, (tuple, list)) \
        else LabelTensor.empty(tuple(out.shape))


@pytest.mark.parametrize("op", [aten.relu.default, aten.addmm.default, aten.convolution.default,
                                aten.native_layer_norm.default])
def test_a_rule_that_drops_labels_is_caught(op, monkeypatch):
    monkeypatch.setitem(fs.REGISTRY._rules, op, fs.rules.Rule(op, _forgetful, fs.REGISTRY.get(op).family))
    rep = Runner().report(op)
    assert rep.checked and rep.count("unsound") == rep.checked, rep.summary()


def test_a_rule_that_drops_one_operand_is_caught():
    """Subtler than dropping everything: mul that forgets its second operand."""
    from fxsurgery.rules.helpers import elementwise
    broken = fs.REGISTRY.copy("broken-mul")
    broken.replace(aten.mul.Tensor, lambda ctx, a, b: elementwise(ctx, a, a))
    rep = Runner(registry=broken).report(aten.mul.Tensor)
    assert rep.count("unsound") >= 1, rep.summary()
    assert Runner().report(aten.mul.Tensor).failures == []


def test_a_rule_that_adds_labels_is_caught():
    """Tightness: an element-wise rule that mixes its whole input is larger than autodiff."""
    from fxsurgery.rules.helpers import mixing
    broken = fs.REGISTRY.copy("mixing-neg")
    broken.replace(aten.neg.default, lambda ctx, x: mixing(ctx, x, list(range(x.ndim))))
    rep = Runner(registry=broken).report(aten.neg.default)
    assert rep.count("loose") >= 1, rep.summary()


# the samples ----------------------------------------------------------------------------
def test_overloads_map_to_their_opinfos():
    names = {op: {i.name for i, _ in sources(op)} for op in
             (aten.conv2d.default, aten.add_.Tensor, aten.relu.default, aten.convolution.default)}
    assert "nn.functional.conv2d" in names[aten.conv2d.default]
    assert "add" in names[aten.add_.Tensor]              # the in-place variant of "add"
    assert "nn.functional.relu" in names[aten.relu.default]
    assert "nn.functional.conv2d" in names[aten.convolution.default]   # via decomposition


def test_samples_whose_graph_lacks_the_operator_are_reported_not_counted():
    # torch.clamp with scalar bounds exports clamp.default, never clamp_min: the search reports
    # every such sample as absent and credits none of them.
    rep = Runner(hand_first=False).report(aten.clamp_min.default)
    assert rep.absent and all("clamp" in m for m in rep.absent)
    assert all("clamp_min" in r.model for r in rep.results)


def test_parameters_variant_holds_the_other_tensors_as_parameters():
    from fxsurgery.testing.opinfo import Case
    case = Case("hand", torch.nn.functional.linear, (torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)))
    by = {m.variant: m for m in models(case)}
    assert set(by) == {"inputs", "parameters"}
    assert len(by["inputs"].inputs) == 3 and not list(by["inputs"].module.parameters())
    assert len(by["parameters"].inputs) == 1 and len(list(by["parameters"].module.parameters())) == 2


def test_large_inputs_are_labelled_modulo_the_label_budget():
    from fxsurgery.testing.opinfo import MAX_LABELS, Case
    (m,) = models(Case("hand", torch.neg, (torch.randn(10, 10),)))
    assert len(m.features["x0"]) == MAX_LABELS
    assert torch.equal(m.module(*m.inputs.values())[0], -m.case.args[0])


# findings of the check, fixed -------------------------------------------------------------
def test_batch_norm_in_evaluation_with_data_statistics_is_sound():
    """Found by this check: batch norm in evaluation with running statistics that are data
    (not buffers) gave its result none of their labels."""
    rep = Runner().report(aten.batch_norm.default)
    assert rep.checked and not rep.failures, rep.summary()
    from fxsurgery.gradient_map import dependence_difference, gradient_dependence

    class M(torch.nn.Module):
        def forward(self, x, mean, var):
            return torch.nn.functional.batch_norm(x, mean, var, training=False)

    t = fs.trace(M(), (torch.randn(3, 2), torch.randn(2), torch.rand(2) + 1),
                 {"x": fs.Features(["a", "b"]), "mean": fs.Features(["m0", "m1"]), "var": fs.Features(["v0", "v1"])})
    b = fs.interaction_map(t, keys=False)
    assert dependence_difference(gradient_dependence(t), t, b.pool) == []


def test_topk_of_a_scalar():
    """Found by this check: topk and sort of a 0-d tensor raised IndexError in the rule."""
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.topk(x, 1)[0]

    t = fs.trace(M(), (torch.randn(()),))
    assert fs.interaction_map(t, keys=False) is not None


# `fxsurgery coverage --check` -----------------------------------------------------------
def test_coverage_reports_the_check_per_operator_and_in_total(reports):
    import fxsurgery.coverage as coverage
    rows, counts = coverage.coverage_rows(reports=reports)
    by_op = {r[0]: r for r in rows}
    for op, rep in reports.items():
        assert by_op[op][5:7] == [str(rep.checked), coverage._short(rep.summary())]
    o = counts["opinfo"]
    assert o["rules"] == len(fs.REGISTRY) == len(reports)
    assert o["models"] == o["pass"] + o["divergence"] + o["failed"]
    assert o["checked"] + o["explained"] + o["unchecked"] + \
        sum(1 for r in reports.values() if not r.checked and r.failures) == o["rules"]
    text = coverage.coverage_table(reports=reports)
    assert f"OpInfo check: {o['checked']}/{o['rules']} rules" in text.splitlines()[-1]
    # a row with a named divergence names it
    div = next(op for op, rep in reports.items() if rep.divergences)
    assert by_op[div][7] and by_op[div][7][:20] in "; ".join(reports[div].divergences)


def test_coverage_check_flag_runs_the_check(monkeypatch, capsys, reports):
    import fxsurgery.coverage as coverage
    from fxsurgery.cli import main
    calls = []
    monkeypatch.setattr(coverage, "opinfo_reports", lambda all_samples=False: calls.append(all_samples) or reports)
    assert main(["coverage", "--check"]) == 0
    assert calls == [False] and "OpInfo check:" in capsys.readouterr().out
    assert main(["coverage"]) == 0
    assert calls == [False] and "OpInfo check:" not in capsys.readouterr().out
