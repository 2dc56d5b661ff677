"""`fxsurgery coverage`: the core ATen operators and every registered rule, with rule family,
proof status and whether the equivalence tests exercise them."""
from __future__ import annotations

import fxsurgery.coverage as coverage
from fxsurgery.cli import main
from fxsurgery.rules import REGISTRY


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("aten."):
            rows[cells[0]] = cells
    return rows


def _family(op: str) -> str:
    rule = next((r for r in REGISTRY if str(r.op) == op), None)
    return rule.family if rule else "missing"


def test_coverage_lists_core_operators_with_their_status(capsys):
    assert main(["coverage", "--format", "github"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    proofs = coverage.proof_status()
    for op in ("aten.addmm.default", "aten.convolution.default", "aten.relu.default", "aten.view.default"):
        assert op in rows, f"{op} missing from the coverage table"
        name, core, family, proof, _ = rows[op]
        assert core == "yes"
        assert family == _family(op)
        assert proof == ("unknown" if proofs is None else proofs.get(op, "no"))
    assert rows["aten.addmm.default"][2] == "contraction"
    if proofs is not None:
        assert rows["aten.addmm.default"][3] == "yes"
        assert rows["aten.zeros.default"][3] == "exempt"
    # every registered rule is listed, core or not
    assert all(str(r.op) in rows for r in REGISTRY)
    assert "core ATen:" in out.splitlines()[-1]


def test_missing_only_lists_only_gaps(capsys):
    assert main(["coverage", "--missing-only", "--format", "github"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "aten.addmm.default" not in rows
    assert all(r[2] == "missing" or r[3] == "no" for r in rows.values())


def test_equivalence_column_is_filled_lazily_from_the_testing_architectures():
    tested = coverage.equivalence_tested()
    assert tested is coverage.EQUIVALENCE_TESTED
    assert "aten.linear.default" in tested and "aten.embedding.default" in tested


def test_without_proofs_directory_the_proof_status_is_unknown(tmp_path, monkeypatch):
    assert coverage.proof_status(tmp_path) is None
    monkeypatch.setattr(coverage, "PROOFS_DIR", tmp_path)
    rows, counts = coverage.coverage_rows()
    assert {r[3] for r in rows} == {"unknown"} and counts["proved"] is None
    assert "proofs unknown" in coverage.coverage_table()
