"""Sorting helpers for the planner's int64 vectors.

numpy when it is installed: on a loaded machine torch's multi-threaded CPU sort (behind
`torch.unique` and `torch.argsort`) was measured hundreds of times slower than numpy's on
vectors of a few ten thousand ids with repeats, which is exactly what planning sorts.
"""
from __future__ import annotations

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - torch without numpy
    np = None

__all__ = ["unique", "argsort", "searchsorted", "isin"]


def unique(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct values, inverse index of each element), like torch.unique."""
    if np is None:
        return torch.unique(t, return_inverse=True)
    u, inv = np.unique(t.detach().cpu().numpy().reshape(-1), return_inverse=True)
    return torch.from_numpy(u), torch.from_numpy(inv.astype(np.int64, copy=False).reshape(-1)).reshape(t.shape)


def argsort(t: torch.Tensor, stable: bool = False) -> torch.Tensor:
    if np is None:
        return torch.argsort(t, stable=stable)
    return torch.from_numpy(np.argsort(t.numpy(), kind="stable" if stable else "quicksort").astype(np.int64))


def searchsorted(sorted_seq: torch.Tensor, values: torch.Tensor, right: bool = False) -> torch.Tensor:
    if np is None:
        return torch.searchsorted(sorted_seq, values, right=right)
    return torch.from_numpy(np.searchsorted(sorted_seq.numpy(), values.numpy(),
                                            side="right" if right else "left").astype(np.int64))


def isin(t: torch.Tensor, values: list[int]) -> torch.Tensor:
    if np is None:
        return torch.isin(t, torch.tensor(values, dtype=torch.int64))
    return torch.from_numpy(np.isin(t.numpy(), np.asarray(values, dtype=np.int64)))
