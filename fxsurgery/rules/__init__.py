"""Label rules, grouped by operator family. Importing this package registers all of them."""
from .registry import REGISTRY, Rule, RuleRegistry, register  # noqa: F401
from . import elementwise, movement, reductions, contractions, embedding, norms, conv, pooling, recurrent, attention  # noqa: F401,E402

__all__ = ["REGISTRY", "Rule", "RuleRegistry", "register"]
