"""What surgery raises and warns, and how a list of names is shown in its messages."""
from __future__ import annotations

__all__ = ["SurgeryError", "SurgeryWarning"]


class SurgeryError(ValueError):
    """The plan cannot be made or applied as asked."""


class SurgeryWarning(UserWarning):
    """Something was re-initialised instead of copied."""


def _listing(names, limit: int = 16) -> str:
    names = sorted(names)
    return str(names[:limit])[:-1] + (f", ... ({len(names) - limit} more)]" if len(names) > limit else "]")
