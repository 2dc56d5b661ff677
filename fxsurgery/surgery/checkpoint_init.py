"""The new model's own values for the elements a plan does not copy, one module at a time.

A new model planned on the meta device has no values. Where the plan keeps the new model's
initialisation (new units' rows, new output rows, re-initialised parameters), the module that
owns the parameter is materialised alone: a shallow copy with fresh CPU tensors of its own
(no children), initialised by `init(module)` or its `reset_parameters` /
`reset_running_stats`. Only its own tensors are ever allocated, so memory is bounded by the
largest module, and the user's model is never touched (the copy's tensors are new objects).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from .apply import _zero_positions
from .match import Match
from .space import SurgeryError

__all__ = ["needs_init", "ModuleInit"]


def needs_init(m: Match, new_categories: str) -> bool:
    """Whether some element of the new value takes the new model's own value (neither copied
    nor zeroed), as `build` / `in_place_writes` decide element by element."""
    if m.unexplained:
        return True
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        return False
    if not m.blocks:
        return not m.copy or m.old_shape is None or not m.identity
    kept = [~z for z in _zero_positions(m, new_categories)]     # per block: positions not zeroed
    if not all(bool(k.any()) for k in kept):
        return False
    if not m.copy or m.old_shape is None:
        return True
    # An element keeps its own value when some block leaves it uncopied and no block zeroes it.
    return any(bool(((b.index < 0) & k).any()) for b, k in zip(m.blocks, kept))


def _owner(model: torch.nn.Module, name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


class ModuleInit:
    """`values(name, dtype)`: the new model's initial value of the state entry `name`. The last
    module materialised is kept (its other parameters usually come next)."""

    def __init__(self, model: torch.nn.Module, init: Callable[[torch.nn.Module], None] | None = None):
        self.model = model
        self.init = init
        self._prefix = None
        self._module = None

    def values(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        prefix, leaf = _owner(self.model, name)
        if self._prefix != (prefix, dtype):
            self._module = None          # release the previous module before allocating
            self._module = self._materialise(prefix, name, dtype)
            self._prefix = (prefix, dtype)
        t = getattr(self._module, leaf, None)
        if not isinstance(t, torch.Tensor):
            raise SurgeryError(f"internal error: the materialised module {prefix or '(root)'} has no tensor {leaf}")
        return t.detach()

    def _materialise(self, prefix: str, name: str, dtype: torch.dtype) -> torch.nn.Module:
        try:
            module = self.model.get_submodule(prefix)
        except AttributeError:
            raise SurgeryError(f"the new model has no module {prefix!r} (owner of {name})") from None
        c = copy.copy(module)
        c._modules = {}
        c._parameters = {k: None if v is None else torch.nn.Parameter(_fresh(v, dtype), requires_grad=v.requires_grad)
                         for k, v in module._parameters.items()}
        c._buffers = {k: None if v is None else _fresh(v, dtype) for k, v in module._buffers.items()}
        what = f"the new model's module {prefix or '(root)'} ({type(module).__name__}), owner of {name}"
        with torch.no_grad():
            if self.init is not None:
                try:
                    self.init(c)
                except Exception as e:
                    raise SurgeryError(f"init failed on {what}: {e!r}; it is called on a copy of that module "
                                       "alone, without its children") from e
                return c
            methods = [getattr(c, m) for m in ("reset_parameters", "reset_running_stats") if callable(getattr(c, m, None))]
            if not methods:
                raise SurgeryError(f"{what} has no reset_parameters to give the new elements of {name} their "
                                   "initial values; pass init=callable(module) (for a transformers model: "
                                   "init=model._init_weights)")
            try:
                for method in methods:
                    method()
            except Exception as e:
                raise SurgeryError(f"{what}: {type(module).__name__}.reset_parameters failed on a copy of that "
                                   f"module alone ({e!r}); pass init=callable(module)") from e
        return c


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor like `t`, floating ones in `dtype` (the output's dtype:
    initialising there is building the new model in that dtype)."""
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cpu")
