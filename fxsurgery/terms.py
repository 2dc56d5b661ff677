"""Factorised per-element label sets of a parameter: a union of broadcast terms.

A parameter element's set is the union of one id tensor per term, each broadcast to the
parameter's shape. A linear weight that meets feature i along its columns and is aligned with
unit j along its rows is two small vectors, never a dense tensor of its full size.
"""
from __future__ import annotations

import torch

from .labels import EMPTY, SetPool

__all__ = ["Terms"]


def _fits(small: tuple, big: tuple) -> bool:
    return all(a == 1 or a == b for a, b in zip(small, big))


class Terms:
    def __init__(self, shape):
        self.shape = tuple(shape)
        self.terms: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, pool: SetPool) -> None:
        if ids.dim() != len(self.shape):
            ids = ids.reshape([1] * len(self.shape)) if ids.numel() == 1 else ids
        if ids.numel() == 1 and int(ids.reshape(-1)[0]) == EMPTY:
            return
        shape = tuple(ids.shape)
        for k, t in enumerate(self.terms):
            ts = tuple(t.shape)
            if _fits(shape, ts):
                self.terms[k] = pool.union_ids(t, ids).expand(ts).contiguous() if shape != ts else pool.union_ids(t, ids)
                return
            if _fits(ts, shape):
                del self.terms[k]
                self.add(pool.union_ids(t, ids).expand(shape).contiguous(), pool)
                return
        self.terms.append(ids.contiguous())

    def dense(self, pool: SetPool) -> torch.Tensor:
        """The id of every element's set (materialises the parameter's shape)."""
        out = torch.zeros([1] * len(self.shape), dtype=torch.int64)
        for t in self.terms:
            out = pool.union_ids(out, t)
        return out.expand(self.shape)

    def total(self, pool: SetPool) -> int:
        return pool.union_many(int(pool.reduce_ids(t, range(t.dim())).reshape(-1)[0]) if t.dim() else int(t)
                               for t in self.terms) if self.terms else EMPTY

    def contains(self, label_id: int, pool: SetPool) -> torch.Tensor:
        """Boolean mask of the elements whose set holds the label."""
        table = pool.contains_table(label_id)
        mask = torch.zeros([1] * len(self.shape), dtype=torch.bool)
        for t in self.terms:
            mask = mask | table[t]
        return mask.expand(self.shape)

    def copy(self) -> "Terms":
        c = Terms(self.shape)
        c.terms = list(self.terms)
        return c
