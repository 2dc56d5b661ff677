"""Label rules, grouped by operator family. Importing this package registers all of them.

`register(*ops("mylib::my_activation"), family="elementwise")` adds a rule (see the README's
guide); `ops` resolves names to overloads and refuses a name that does not resolve."""
from .registry import REGISTRY, Rule, RuleRegistry, register  # noqa: F401
from ._ops import ops  # noqa: F401
from . import elementwise, movement, reductions, contractions, embedding, norms, conv, pooling, recurrent, attention  # noqa: F401,E402

__all__ = ["REGISTRY", "Rule", "RuleRegistry", "register", "ops"]
