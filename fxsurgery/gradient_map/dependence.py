"""Dependence: the non-zero pattern of each node's forward derivative along each label's
direction (vmapped over the labels), and its comparison with the boolean mapping's dependence."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

from ..capture import Traced
from ..labels import SetPool
from .graph import _Graph
from .nonzero import CHUNK, _nonzero
from .substitutes import _quiet


@dataclass
class GradientDependence:
    """Per graph node, the non-zero pattern of d value / dz along each label: a bool tensor of
    shape (*value.shape, n_labels) (a tuple of them for a node with several outputs). Nodes
    holding neither floats nor category-moved indices are left out (their derivative is zero)."""
    labels: list
    masks: dict

    def __getitem__(self, name):
        return self.masks[name]

    def __contains__(self, name) -> bool:
        return name in self.masks

    def __iter__(self):
        return iter(self.masks)

    def items(self):
        return self.masks.items()

    def label_sets(self, name: str, index: tuple, output: int | None = None) -> set:
        m = self.masks[name]
        m = m[output] if output is not None else m
        return {self.labels[i] for i in torch.nonzero(m[tuple(index)]).reshape(-1).tolist()}


def gradient_dependence(traced: Traced, trials: int = 4, seed: int = 0) -> GradientDependence:
    """The dependence D(v) of every node's value, from forward-mode derivatives."""
    graph = _Graph(traced)
    notes: list[str] = []
    return GradientDependence([l for l, _, _ in graph.labels], _dependence(graph, trials, seed, notes))


def _dependence(graph: _Graph, trials: int, seed: int, notes: list) -> dict:
    gen = torch.Generator().manual_seed(seed + 7919)
    masks: dict = {}
    if not graph.labels:
        return masks
    for trial in range(trials):
        point = graph.draw(gen)
        dirs = graph.directions(point, gen)
        if not dirs:
            return masks
        z0 = {k: torch.zeros(v.shape[1:], dtype=torch.float64) for k, v in dirs.items()}

        def tangents(v):
            return torch.func.jvp(lambda z: graph.forward(point, z, collect=True), (z0,), (v,))[1]

        with _quiet():
            T = torch.func.vmap(tangents, chunk_size=CHUNK, randomness="same")(dirs)

        def pattern(name, k, x):
            # (labels, *shape[, categories]) -> (*shape, labels)
            nz = _nonzero(x, notes, f"node %{name}")
            if (name, k) in graph.cat_outputs:
                nz = nz.any(-1)
            return nz.movedim(0, -1)

        for name, t in T.items():
            if isinstance(t, tuple):
                m = tuple(pattern(name, k, x) for k, x in enumerate(t))
                masks[name] = tuple(a | b for a, b in zip(masks[name], m)) if name in masks else m
            else:
                m = pattern(name, None, t)
                masks[name] = masks[name] | m if name in masks else m
    return masks


def dependence_difference(dep: GradientDependence, traced: Traced, pool: SetPool, subset: bool = False) -> list:
    """Compares gradient dependence with the boolean mapping's `node.meta["fxsurgery"]["deps"]`
    (written by `fs.interaction_map(traced)`, whose map's `pool` the ids refer to). Returns
    (node, output, element index, only in gradient, only in boolean) for the first differing
    element of each differing node; with `subset`, only labels the gradient has and the boolean
    mapping lacks count."""
    rows = []
    index = {l: k for k, l in enumerate(dep.labels)}
    for n in traced.graph.nodes:
        if n.name not in dep.masks:
            continue
        meta = n.meta.get("fxsurgery", {}).get("deps")
        if meta is None:
            continue
        g = dep.masks[n.name]
        gs = list(g) if isinstance(g, tuple) else [g]
        bs = [b for b in tree_flatten(meta, is_leaf=lambda x: hasattr(x, "ids"))[0] if hasattr(b, "ids")]
        if len(bs) != len(gs):
            bs = bs[:len(gs)]
        for k, (gm, b) in enumerate(zip(gs, bs)):
            dense = b.dense()
            uniq, inv = torch.unique(dense, return_inverse=True)
            table = torch.zeros((len(uniq), len(dep.labels)), dtype=torch.bool)
            for u, sid in enumerate(uniq.tolist()):
                for lid in pool.sets[sid]:
                    lab = pool.labels[lid]
                    if lab in index:
                        table[u, index[lab]] = True
            bm = table[inv]
            if tuple(bm.shape) != tuple(gm.shape):
                rows.append((n.name, k, (), {"shape"}, {str(tuple(bm.shape))}))
                continue
            only_g = gm & ~bm
            only_b = bm & ~gm if not subset else torch.zeros_like(bm)
            bad = (only_g | only_b).any(-1)
            if bool(bad.any()):
                where = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
                rows.append((n.name, k, where,
                             {dep.labels[i] for i in torch.nonzero(only_g[where]).reshape(-1).tolist()},
                             {dep.labels[i] for i in torch.nonzero(only_b[where]).reshape(-1).tolist()}))
    return rows
