"""Surgery: carry the weights of a trained model into a modified one.

    plan = fs.plan(fs.trace(old, old_inputs, old_features), fs.trace(new, new_inputs, new_features))
    print(plan.table()); plan.apply(); print(fs.verify(plan))

Every element of each new parameter is copied from the old element with the same key (the
labels it meets, the units it is aligned with), or initialised: zero where it meets a label
the old model lacks, so that the new model starts out computing what the old one did.
"""
from .errors import SurgeryError, SurgeryWarning
from .match import Match
from .issues import Issue
from .planning import ParamPlan, SurgeryPlan, plan, transplant
from .verify import Verification, verify

__all__ = ["plan", "verify", "transplant", "SurgeryPlan", "ParamPlan", "Match", "Issue", "Verification",
           "SurgeryError", "SurgeryWarning"]
