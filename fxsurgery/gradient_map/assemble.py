"""The interaction map assembled from the meeting masks: one `ParamEntry` per parameter and
buffer, its elements' label sets interned in a `SetPool`."""
from __future__ import annotations

import torch

from ..capture import Traced
from ..interaction_map import InteractionMap, ParamEntry
from ..label_tensor import compress
from ..labels import Categories, SetPool
from ..terms import Terms
from .dtypes import _is_float
from .graph import _Graph
from .meeting import _meeting_masks


def gradient_interaction_map(traced: Traced, trials: int = 4, seed: int = 0) -> InteractionMap:
    """The interaction map from autodiff alone (no label rule is read): parameter element p
    meets label f iff, at one of `trials` random points, the mixed derivative
    d/dz_f d<c, N>/dp of some operation N that consumes p is non-zero. Keys are absent."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    graph = _Graph(traced)
    notes: list[str] = []
    for name, node in zip(traced.input_names, traced.input_nodes):
        val = graph.by_name[node].meta.get("val")
        if isinstance(val, torch.Tensor) and not _is_float(val) and \
                not isinstance(traced.descriptions.get(name), Categories):
            notes.append(f"integer input {name!r} is not differentiable: the gradient mapping gives it no "
                         "derivative (its label meets nothing here)")
    masks = _meeting_masks(graph, trials, seed, notes)
    pool = SetPool()
    label_ids = [pool.label_id(l) for l, _, _ in graph.labels]
    entries: dict[str, ParamEntry] = {}
    for n in graph.nodes:
        if n.op != "placeholder" or graph.kind[n.name] not in ("parameter", "buffer") \
                or graph.state[n.name] in entries:
            continue
        state = graph.state[n.name]
        val = n.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
        terms = Terms(shape)
        mask = masks.get(state)
        if mask is not None and bool(mask.any()):
            flat = mask.reshape(len(label_ids), -1).T                      # (numel, labels)
            uniq, inv = torch.unique(flat, dim=0, return_inverse=True)
            ids = torch.tensor([pool.intern(label_ids[i] for i in torch.nonzero(row).reshape(-1).tolist())
                                for row in uniq], dtype=torch.int64)
            terms.add(compress(ids[inv].reshape(shape)), pool)
        entries[state] = ParamEntry(name=state, shape=shape, kind=graph.kind[n.name], meets=terms,
                                    aliases=tuple(traced.aliases.get(state) or next(
                                        (v for v in traced.aliases.values() if state in v), (state,))))
    return InteractionMap(pool, entries, dict(traced.descriptions), "gradient", notes)
