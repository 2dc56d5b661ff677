"""How much of torch's operator set fxsurgery covers: `fxsurgery coverage`.

One row per operator of torch's core ATen set (the overloads tagged `torch.Tag.core`) and per
operator with a registered label rule, saying:

- rule: the family of its rule, or "missing" (the propagator then decomposes it or falls back
  to the sound "everything meets everything" rule, with a warning);
- proof: "yes" when proofs/ holds a sympy proof case for it, "exempt" when proofs/exemptions.py
  says why it needs none, "no" otherwise, "unknown" when the proofs/ directory is not there
  (an installed package without the source tree);
- equivalence: "yes" when the architectures of `fxsurgery.testing` (the models the hypothesis
  equivalence tests draw from) emit it, i.e. it is exercised by the boolean-vs-gradient
  equivalence property tests.

With `--check`, the OpInfo check (fxsurgery.testing.opinfo_check, what tests/test_opinfo.py
runs) is run there and then, and three columns say what it found for each registered rule:
the one-operator models checked against autodiff, the result (passes, named divergences,
failures, or why the rule cannot be checked) and the named divergences met; `--all` runs every
sample instead of the bounded default.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

from tabulate import tabulate

__all__ = ["coverage_table", "coverage_rows", "core_aten_ops", "proof_status", "equivalence_tested",
           "EQUIVALENCE_TESTED", "add_subcommand", "opinfo_reports", "opinfo_summary"]

# Operators the architectures of fxsurgery.testing emit; filled by `equivalence_tested()` the
# first time it is needed (tracing the models costs a few seconds).
EQUIVALENCE_TESTED: set[str] = set()
_EQUIVALENCE_DONE = False

PROOFS_DIR = Path(__file__).resolve().parent.parent / "proofs"


def core_aten_ops() -> list[str]:
    """Every overload of torch.ops.aten tagged core, as 'aten.name.overload'."""
    import torch
    found = []
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            continue
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                found.append(str(op))
    return sorted(found)


def proof_status(proofs_dir: Path | None = None) -> dict[str, str] | None:
    """'aten.x.y' -> "yes" (a proof case) or "exempt"; None when proofs/ cannot be read."""
    proofs_dir = Path(proofs_dir or PROOFS_DIR)
    harness_path = proofs_dir / "proof_harness.py"
    if not harness_path.exists():
        return None
    added = str(proofs_dir) not in sys.path
    if added:
        sys.path.insert(0, str(proofs_dir))
    try:
        harness = sys.modules.get("proof_harness")
        if harness is None or Path(getattr(harness, "__file__", "")).resolve() != harness_path.resolve():
            spec = importlib.util.spec_from_file_location("proof_harness", harness_path)
            harness = importlib.util.module_from_spec(spec)
            sys.modules["proof_harness"] = harness
            spec.loader.exec_module(harness)
        status = {op: "yes" for op in harness.covered_ops()}
        exempt_path = proofs_dir / "exemptions.py"
        if exempt_path.exists():
            spec = importlib.util.spec_from_file_location("exemptions", exempt_path)
            exemptions = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(exemptions)
            for op in getattr(exemptions, "EXEMPT", {}):
                status.setdefault(op, "exempt")
        return status
    except Exception as err:  # noqa: BLE001 - a broken proofs tree must not break the table
        warnings.warn(f"could not read the proof cases in {proofs_dir}: {type(err).__name__}: {err}")
        return None
    finally:
        if added and str(proofs_dir) in sys.path:
            sys.path.remove(str(proofs_dir))


def _testing_models():
    """A handful of models of fxsurgery.testing covering every layer kind (None if the
    package is not there)."""
    try:
        from .testing import LAYER_KINDS, ArchSpec, InputSpec, LayerSpec, build
    except ImportError:
        return None
    inputs = (InputSpec("obs", n=3, entities=2), InputSpec("tok", kind="categories", n=4, length=2))
    outputs = ("stream", "mean", "flat")
    layer_sets = [[LayerSpec(k)] for k in LAYER_KINDS]
    layer_sets += [[LayerSpec("linear", residual=True), LayerSpec("relu")],
                   [LayerSpec("conv1d", kernel=3, groups=2, width=8)],
                   [LayerSpec("mha", heads=2), LayerSpec("sdpa", heads=2)],
                   [LayerSpec("split", sizes=(1, 3))], [LayerSpec("split", sizes=(2, 2))]]
    models = []
    for layers in layer_sets:
        try:
            spec = ArchSpec(inputs=inputs, width=4, layers=tuple(layers), outputs=outputs)
            models.append(build(spec, seed=0))
        except Exception:  # noqa: BLE001 - a layer kind that cannot be built this way is skipped
            continue
    return models


def equivalence_tested() -> set[str]:
    """Fills EQUIVALENCE_TESTED (once) with the operators the testing architectures emit."""
    global _EQUIVALENCE_DONE
    if not _EQUIVALENCE_DONE:
        _EQUIVALENCE_DONE = True
        models = _testing_models()
        if models:
            from .capture import trace
            for model, example_inputs, features in models:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        traced = trace(model, example_inputs, features)
                except Exception:  # noqa: BLE001 - skipped: not capturable here
                    continue
                EQUIVALENCE_TESTED.update(str(n.target) for n in traced.graph.nodes
                                          if n.op == "call_function" and hasattr(n.target, "_schema"))
    return EQUIVALENCE_TESTED


def opinfo_reports(all_samples: bool = False) -> dict:
    """Runs the OpInfo check on every registered rule: 'aten.x.y' -> OpReport."""
    from .testing.opinfo_check import Runner
    runner = Runner.everything() if all_samples else Runner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {rep.op: rep for rep in runner.run()}


def opinfo_summary(reports: dict) -> dict:
    """The counts of the total line, from the reports of an actual run."""
    reps = list(reports.values())
    return {"rules": len(reps), "checked": sum(r.checked > 0 for r in reps),
            "models": sum(r.checked for r in reps), "pass": sum(r.count("pass") for r in reps),
            "divergence": sum(r.count("divergence") for r in reps),
            "failed": sum(len(r.failures) for r in reps), "failing_rules": sum(bool(r.failures) for r in reps),
            "explained": sum(not r.checked and r.reason is not None for r in reps),
            "unchecked": sum(not r.checked and r.reason is None for r in reps),
            "absent": sum(len(r.absent) for r in reps)}


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def coverage_rows(missing_only: bool = False, reports: dict | None = None) -> tuple[list[list[str]], dict]:
    """Rows (operator, core, rule, proof, equivalence[, OpInfo models checked, result, named
    divergences]) and the counts of the summary; the last three columns when `reports` (from
    `opinfo_reports`) is given."""
    from .rules import REGISTRY
    core = set(core_aten_ops())
    rules = {str(r.op): r.family for r in REGISTRY}
    proofs = proof_status()
    tested = equivalence_tested()
    rows = []
    for op in sorted(core | set(rules)):
        family = rules.get(op, "missing")
        proof = "unknown" if proofs is None else proofs.get(op, "no")
        if missing_only and family != "missing" and proof not in ("no",):
            continue
        row = [op, "yes" if op in core else "", family, proof, "yes" if op in tested else "no"]
        if reports is not None:
            rep = reports.get(op)
            row += ["", "no rule", ""] if rep is None else \
                [str(rep.checked), _short(rep.summary()), _short("; ".join(rep.divergences))]
        rows.append(row)
    counts = {
        "core": len(core), "core_with_rule": len(core & set(rules)), "registered": len(rules),
        "proved": None if proofs is None else sum(proofs.get(op) == "yes" for op in rules),
        "exempt": None if proofs is None else sum(proofs.get(op) == "exempt" for op in rules),
        "equivalence": len(set(rules) & tested),
    }
    if reports is not None:
        counts["opinfo"] = opinfo_summary(reports)
    return rows, counts


def coverage_table(tablefmt: str = "simple", missing_only: bool = False, reports: dict | None = None) -> str:
    rows, c = coverage_rows(missing_only, reports)
    headers = ["operator", "core", "rule", "proof", "equivalence test"]
    if reports is not None:
        headers += ["OpInfo models", "OpInfo result", "named divergences"]
    text = tabulate(rows, headers=headers, tablefmt=tablefmt)
    proofs = "proofs unknown (no proofs/ directory)" if c["proved"] is None else \
        f"{c['proved']} with a proof case, {c['exempt']} exempt, {c['registered'] - c['proved'] - c['exempt']} without"
    summary = (f"core ATen: {c['core_with_rule']}/{c['core']} with a rule, {c['core'] - c['core_with_rule']} missing; "
               f"registered rules: {c['registered']} ({proofs}); "
               f"{c['equivalence']} exercised by the equivalence tests")
    if reports is not None:
        o = c["opinfo"]
        summary += (f"\nOpInfo check: {o['checked']}/{o['rules']} rules checked against autodiff on {o['models']} "
                    f"one-operator models ({o['pass']} pass, {o['divergence']} named divergences, {o['failed']} "
                    f"failed in {o['failing_rules']} rules); {o['explained']} rules explained as not checkable, "
                    f"{o['unchecked']} without a sample; {o['absent']} samples emitted other operators")
    return text + "\n\n" + summary


def _cmd_coverage(args) -> int:
    reports = opinfo_reports(args.all) if args.check or args.all else None
    print(coverage_table(tablefmt=args.format, missing_only=args.missing_only, reports=reports))
    return 0


def add_subcommand(subparsers) -> None:
    """`fxsurgery coverage [--format FMT] [--missing-only] [--check [--all]]`."""
    p = subparsers.add_parser("coverage", help="which ATen operators have label rules, proofs and equivalence tests")
    p.add_argument("--format", default="simple", help="table format (tabulate's tablefmt)")
    p.add_argument("--missing-only", action="store_true",
                   help="only operators without a rule or without a proof (exempt counts as covered)")
    p.add_argument("--check", action="store_true",
                   help="run the OpInfo check (every rule against autodiff, a few minutes) and report its results")
    p.add_argument("--all", action="store_true", help="with --check: every OpInfo sample, not the bounded default")
    p.set_defaults(run=_cmd_coverage)
