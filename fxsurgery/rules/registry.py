"""The rule table: one label rule per ATen overload, registered with a decorator.

A rule receives a `RuleContext` and the operator's arguments with every tensor replaced by its
`LabelTensor`; it returns the label tensor(s) of the result, in the operator's output
structure, and reports through the context what each parameter operand meets. Duplicate
registrations are refused, and the table is listable so that tests and proofs walk it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = ["Rule", "RuleRegistry", "REGISTRY", "register"]


@dataclass(frozen=True)
class Rule:
    op: torch._ops.OpOverload
    fn: Callable
    family: str

    def __call__(self, ctx, *args, **kwargs):
        return self.fn(ctx, *args, **kwargs)


class RuleRegistry:
    def __init__(self, name: str = "default"):
        self.name = name
        self._rules: dict[torch._ops.OpOverload, Rule] = {}

    def register(self, *ops, family: str):
        """Decorator: `@register(aten.relu.default, aten.tanh.default, family="elementwise")`.
        At least one operator: a registration for none (`register(*ops(...))` of names that
        resolved to nothing) would leave the operators it meant on the fallback, silently."""
        if not ops:
            raise ValueError("register() was given no operator; pass the OpOverloads the rule is for, "
                             "e.g. register(*ops(\"mylib::my_activation\"), family=...)")
        for op in ops:
            self._check_op(op)
        if not isinstance(family, str) or not family:
            raise TypeError(f"register(...): family must be a non-empty string, got {family!r}")

        def deco(fn):
            if not callable(fn):
                raise TypeError(f"register({', '.join(map(str, ops))}) decorates a rule function, got {fn!r}")
            for op in ops:
                self.add(op, fn, family)
            return fn
        return deco

    @staticmethod
    def _check_op(op) -> None:
        if isinstance(op, torch._ops.OpOverloadPacket):
            raise TypeError(f"rules are keyed by overload: {op} is an overload packet; register "
                            f"{op}.default (or another of {op.overloads()})")
        if not isinstance(op, torch._ops.OpOverload):
            raise TypeError(f"rules are keyed by ATen overload (aten.x.default), got {op!r}"
                            + ("; resolve names with fxsurgery.rules._ops.ops" if isinstance(op, str) else ""))

    def add(self, op, fn, family: str) -> None:
        self._check_op(op)
        if op in self._rules:
            raise ValueError(f"a label rule for {op} is already registered "
                             f"(family {self._rules[op].family!r}); refusing a second one")
        self._rules[op] = Rule(op, fn, family)

    def get(self, op) -> Rule | None:
        return self._rules.get(op)

    def copy(self, name: str) -> "RuleRegistry":
        """A copy that can be altered without touching this one (test-only registries)."""
        other = RuleRegistry(name)
        other._rules = dict(self._rules)
        return other

    def replace(self, op, fn, family: str | None = None) -> None:
        old = self._rules.get(op)
        self._rules[op] = Rule(op, fn, family or (old.family if old else "custom"))

    def remove(self, op) -> None:
        """Drops a rule (test-only registries: to exercise the fallback)."""
        del self._rules[op]

    def __contains__(self, op) -> bool:
        return op in self._rules

    def __iter__(self) -> Iterator[Rule]:
        return iter(sorted(self._rules.values(), key=lambda r: str(r.op)))

    def __len__(self) -> int:
        return len(self._rules)

    def families(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self:
            out.setdefault(r.family, []).append(str(r.op))
        return out


REGISTRY = RuleRegistry()
register = REGISTRY.register
