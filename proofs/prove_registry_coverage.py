"""Every registered rule has a proof case (or an exemption with a reason), and the tables agree
with each other."""
from __future__ import annotations

import pytest

from exemptions import EXEMPT
from fxsurgery.rules import REGISTRY
from proof_harness import covered_ops, op_of


def test_every_registered_operator_is_proved_or_exempt():
    covered = covered_ops()
    missing = sorted(str(r.op) for r in REGISTRY if str(r.op) not in covered and str(r.op) not in EXEMPT)
    assert not missing, (f"{len(missing)} registered operator(s) have no proof case in proofs/prove_*.py "
                         f"and no entry in proofs/exemptions.py: {missing}")


def test_exemptions_have_reasons_and_no_proof():
    covered = covered_ops()
    for op, reason in EXEMPT.items():
        assert isinstance(reason, str) and len(reason) > 20, f"exemption of {op} needs a reason"
        assert op not in covered, f"{op} is exempt but has a proof case in {covered[op]}: drop the exemption"


@pytest.mark.parametrize("op", sorted(covered_ops()))
def test_proof_cases_name_real_overloads(op):
    assert op_of(op) is not None, f"proof case for {op}, which this torch build does not have"


if __name__ == "__main__":
    covered = covered_ops()
    ops = sorted(str(r.op) for r in REGISTRY)
    print(f"{len(ops)} registered operators: {sum(o in covered for o in ops)} with proof cases, "
          f"{sum(o in EXEMPT for o in ops)} exempt, "
          f"{sum(o not in covered and o not in EXEMPT for o in ops)} missing")
    for o in ops:
        if o not in covered and o not in EXEMPT:
            print("  missing:", o)
