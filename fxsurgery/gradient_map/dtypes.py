"""The numbers the gradient mapping computes with: float64 on the CPU. Which values are floats
(differentiable), and creation arguments moved to the CPU and float64."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _to_cpu64(tree):
    """Creation arguments: every device becomes the CPU, every float dtype float64."""
    def fix(v):
        if isinstance(v, torch.device):
            return torch.device("cpu")
        if isinstance(v, torch.dtype) and v.is_floating_point:
            return torch.float64
        return v
    return tree_map(fix, tree)
