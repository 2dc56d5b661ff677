"""Label tensors: for every element of a value, the id of the label set it depends on.

A label tensor keeps its ids *compressed*: an axis along which every element has the same set
is stored with size 1 and broadcast on use. Most label tensors vary along one or two axes
(features along the last axis, units along a hidden axis), so an activation of any size costs
about as much as its widest labelled axis.

Values computed from parameters alone (a transposed weight, a slice of a fused projection)
carry *provenance*: which parameter element each of their elements came from, so that a rule
that meets such a value records the meeting on the parameter itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .labels import EMPTY, SetPool

__all__ = ["LabelTensor", "ParamRef", "compress", "full_ids"]

# Above this many elements a parameter's position index is not materialised; a data-movement
# operator applied to such a parameter falls back to "every element meets everything".
MAX_INDEX_NUMEL = 1 << 24


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrinks every axis along which all ids are equal to size 1."""
    for d in range(ids.dim()):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids


def full_ids(shape: Sequence[int], set_id: int = EMPTY) -> torch.Tensor:
    return torch.full([1] * len(shape), set_id, dtype=torch.int64)


@dataclass(frozen=True)
class ParamRef:
    """Where the elements of a parameter-derived value came from.

    `index` has the value's shape and holds flat positions in the parameter; `None` means the
    value *is* the parameter (same shape, same order); `everything=True` means each element
    may have come from any element of the parameter (the sound fallback).
    """

    name: str
    shape: tuple
    index: Optional[torch.Tensor] = None
    everything: bool = False

    def positions(self) -> Optional[torch.Tensor]:
        if self.index is not None or self.everything:
            return self.index
        n = 1
        for s in self.shape:
            n *= s
        if n > MAX_INDEX_NUMEL:
            return None
        return torch.arange(n, dtype=torch.float64).reshape(self.shape)


class LabelTensor:
    """Compressed label-set ids of one value, with optional parameter provenance and, for
    values computed from constants alone (shapes, `arange`), the concrete value."""

    __slots__ = ("ids", "shape", "refs", "const")

    def __init__(self, ids: torch.Tensor, shape: Sequence[int], refs: tuple = (), const=None):
        shape = tuple(int(s) for s in shape)
        if ids.dim() != len(shape):
            if ids.numel() != 1:
                raise ValueError(f"label ids of shape {tuple(ids.shape)} do not fit a value of shape {shape}")
            ids = ids.reshape([1] * len(shape))
        for d, (a, b) in enumerate(zip(ids.shape, shape)):
            if a not in (1, b):
                raise ValueError(f"label ids of shape {tuple(ids.shape)} do not fit a value of shape {shape}")
        self.ids = ids
        self.shape = shape
        self.refs: tuple[ParamRef, ...] = tuple(refs)
        self.const = const

    # construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, shape, refs=(), const=None) -> "LabelTensor":
        return cls(full_ids(shape), shape, refs, const)

    @classmethod
    def of_set(cls, shape, set_id: int) -> "LabelTensor":
        return cls(full_ids(shape, set_id), shape)

    # queries ------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_param(self) -> bool:
        return bool(self.refs)

    @property
    def is_free(self) -> bool:
        """No element depends on any label."""
        return bool((self.ids == EMPTY).all())

    def dense(self) -> torch.Tensor:
        return self.ids.expand(self.shape)

    def total(self, pool: SetPool) -> int:
        """The union over all elements."""
        return int(pool.reduce_ids(self.ids, range(self.ids.dim())).reshape(-1)[0]) if self.ids.dim() else int(self.ids)

    def __repr__(self) -> str:
        extra = f", params={[r.name for r in self.refs]}" if self.refs else ""
        return f"LabelTensor(shape={self.shape}, ids={tuple(self.ids.shape)}{extra})"
