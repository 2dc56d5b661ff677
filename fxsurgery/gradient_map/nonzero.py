"""Reading derivatives as a non-zero pattern: the tolerances, the treatment of non-finite
derivatives, and the vmap chunk that bounds the memory of both passes (meeting, dependence)."""
from __future__ import annotations

import torch

# Non-zero means |M| > RELATIVE_TOL * (largest |M| of the node in that trial), and > ABSOLUTE_TOL.
RELATIVE_TOL = 1e-9
ABSOLUTE_TOL = 1e-12
# Labels differentiated at once (the vmap chunk): bounds memory at about this many tangents.
CHUNK = 64


def _finite(t: torch.Tensor, notes: list, where: str) -> torch.Tensor:
    """|t|, with non-finite derivatives read as zero (and said so in the notes)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        msg = (f"non-finite derivatives at {where} were read as zero (a random point fell outside the "
               "operator's domain)")
        if msg not in notes:
            notes.append(msg)
        t = torch.where(bad, torch.zeros((), dtype=t.dtype), t)
    return t.abs()


def _threshold(scale: float) -> float:
    return max(RELATIVE_TOL * scale, ABSOLUTE_TOL)


def _nonzero(t: torch.Tensor, notes: list, where: str) -> torch.Tensor:
    """Non-zero pattern of a batch of derivatives, relative to their largest magnitude."""
    a = _finite(t, notes, where)
    return a > _threshold(float(a.max()) if a.numel() else 0.0)
