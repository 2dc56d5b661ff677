"""The new model's own values for the elements a plan does not copy, one module at a time.

A new model planned on the meta device has no values. Where the plan keeps the new model's
initialisation (new units' rows, new output rows, re-initialised parameters), the module that
owns the parameter is materialised alone: a shallow copy with fresh CPU tensors of its own
(no children), initialised by `init(module)` or its `reset_parameters` /
`reset_running_stats`. Only its own tensors are ever allocated, so memory is bounded by the
largest module, and the user's model is never touched (the copy's tensors are new objects).

Rows only. Initialising a whole widened layer to keep a few hundred of its rows costs the
random number generation of the whole layer (tens of millions of draws per MLP matrix; on a
1B-parameter model more than copying every byte of the checkpoint). When the elements that
keep the new model's values are whole rows of an nn.Linear or nn.Embedding (new units,
new tokens: every other axis copied, nothing zeroed) and the initialisation of a row does not
depend on how many rows there are (torch's defaults: kaiming on fan_in for Linear, normal for
Embedding; transformers' `_init_weights`: normal), the copy is built with just those rows.
`rows_only` says when that is allowed (see apply_to_checkpoint's init_rows).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from .apply import _zero_positions
from .errors import SurgeryError
from .match import Match

__all__ = ["needs_init", "rows_keeping_init", "ModuleInit", "Scratch"]


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


def rows_keeping_init(m: Match, new_categories: str) -> torch.Tensor | None:
    """The rows (positions along axis 0) that keep the new model's values, when those are
    whole rows: every other axis copied throughout and nothing zeroed; else None."""
    if m.unexplained or not m.copy or m.old_shape is None or not m.blocks or m.blocks[0].axes != (0,):
        return None
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        return None
    zero = _zero_positions(m, new_categories)
    if any(bool(z.any()) for z in zero):
        return None
    if any(bool((b.index < 0).any()) for b in m.blocks[1:]):
        return None
    rows = torch.nonzero(m.blocks[0].index < 0).reshape(-1)
    return rows if rows.numel() else None


def _owner(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


class Scratch:
    """Reusable buffers, one per slot. A fresh tensor of a hundred megabytes costs its page
    faults on first touch (several times a memcpy of it on a busy machine); a buffer written
    for the previous tensor is already resident."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.memo: dict = {}      # index math kept between tensors (checkpoint_ranges.copy_chunks)

    def tensor(self, slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            self._buffers[slot] = None        # release the smaller one first
            buf = self._buffers[slot] = torch.empty(max(n, 1), dtype=torch.uint8)
        return buf[:n].view(dtype).view(tuple(shape))


class ModuleInit:
    """`values(name, dtype)`: the new model's initial value of the state entry `name`. The last
    module materialised is kept (its other parameters usually come next)."""

    def __init__(self, model: torch.nn.Module, init: Callable[[torch.nn.Module], None] | None = None,
                 like: torch.nn.Module | None = None):
        self.model = model
        self.init = init
        self.like = like
        self._prefix = None
        self._module = None

    def rows_only(self, name: str) -> bool:
        """Whether `name`'s rows may be initialised on a copy of its module with fewer rows."""
        prefix, leaf = _owner(name)
        module = self.model.get_submodule(prefix)
        return type(module) in (torch.nn.Linear, torch.nn.Embedding) and leaf in ("weight", "bias")

    def row_values(self, name: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The new model's initial values of rows `rows` of `name` (see rows_only): its module
        copied with len(rows) rows and initialised."""
        prefix, leaf = _owner(name)
        module = self.model.get_submodule(prefix)
        k = int(rows.numel())
        shapes = {key: (k,) + tuple(v.shape[1:]) for key, v in module._parameters.items() if v is not None}
        c = self._copy(module, dtype, shapes)
        padding = getattr(module, "padding_idx", None)
        if padding is not None:
            c.padding_idx = None          # an index into the full table: zeroed below if it is new
        self._initialise(c, module, prefix, name)
        out = getattr(c, leaf).detach()
        if padding is not None:
            out[rows == padding] = 0
        return out

    def values(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        prefix, leaf = _owner(name)
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
        c = self._copy(module, dtype)
        self._initialise(c, module, prefix, name)
        return c

    @staticmethod
    def _copy(module: torch.nn.Module, dtype: torch.dtype, shapes: dict | None = None) -> torch.nn.Module:
        """A shallow copy of `module` without children, with fresh CPU tensors of its own
        (of `shapes` where given)."""
        shapes = shapes or {}
        c = copy.copy(module)
        c._modules = {}
        c._parameters = {k: None if v is None else torch.nn.Parameter(_fresh(v, dtype, shapes.get(k)),
                                                                       requires_grad=v.requires_grad)
                         for k, v in module._parameters.items()}
        c._buffers = {k: None if v is None else _fresh(v, dtype) for k, v in module._buffers.items()}
        return c

    def _as_like(self, c: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """`c` seen as the module at `prefix` of `like` (same class and attributes, c's own
        tensors), when that one is of another class and has the same tensor names: a
        GraphModule made by the passes holds plain Modules where the model had Linear, Conv,
        Embedding, and those classes' initialisation is what a new element should get."""
        if self.like is None:
            return c
        try:
            template = self.like.get_submodule(prefix)
        except AttributeError:
            return c
        if type(template) is type(c) or set(template._parameters) != set(c._parameters) or \
                set(template._buffers) != set(c._buffers):
            return c
        t = copy.copy(template)
        t._modules = {}
        t._parameters, t._buffers = c._parameters, c._buffers     # the same tensors: initialised in place
        return t

    def _initialise(self, c: torch.nn.Module, module: torch.nn.Module, prefix: str, name: str) -> None:
        c = self._as_like(c, prefix)
        what = f"the new model's module {prefix or '(root)'} ({type(c).__name__}), owner of {name}"
        with torch.no_grad():
            if self.init is not None:
                try:
                    self.init(c)
                except Exception as e:
                    raise SurgeryError(f"init failed on {what}: {e!r}; it is called on a copy of that module "
                                       "alone, without its children") from e
                return
            methods = [getattr(c, m) for m in ("reset_parameters", "reset_running_stats") if callable(getattr(c, m, None))]
            if not methods:
                raise SurgeryError(f"{what} has no reset_parameters to give the new elements of {name} their "
                                   "initial values; pass init=callable(module) (for a transformers model: "
                                   "init=model._init_weights), or init_like=the model it was made from")
            try:
                for method in methods:
                    method()
            except Exception as e:
                raise SurgeryError(f"{what}: {type(c).__name__}.reset_parameters failed on a copy of that "
                                   f"module alone ({e!r}); pass init=callable(module)") from e


def _fresh(t: torch.Tensor, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """An uninitialised CPU tensor like `t` (of `shape` if given), floating ones in `dtype` (the
    output's dtype: initialising there is building the new model in that dtype)."""
    return torch.empty(t.shape if shape is None else shape, dtype=dtype if t.is_floating_point() else t.dtype,
                       device="cpu")
