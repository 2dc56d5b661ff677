"""Meeting: the forward-over-reverse mixed derivative of every meeting node,
M_N = d/dz [ d<c_N, N(theta_N, u(z))> / d theta_N ], vmapped over the labels' directions, read
as the non-zero pattern of (label, parameter element) pairs."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from ..nodes import describe_node
from .categories import _Cat
from .dtypes import _is_float
from .graph import _Graph
from .nonzero import CHUNK, _finite, _threshold
from .random_points import _Point
from .substitutes import _quiet


def _cotangents(graph: _Graph, point: _Point, gen: torch.Generator) -> None:
    env = graph.forward(point, {k: torch.zeros(s, dtype=torch.float64) for k, s in graph.z_shapes(point).items()})
    for name in graph.meeting:
        outs = [o for o in tree_flatten(env[name])[0] if isinstance(o, (torch.Tensor, _Cat))]
        point.cotangents[name] = [torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
                                  if isinstance(o, torch.Tensor) and _is_float(o) else None for o in outs]


def _meeting_masks(graph: _Graph, trials: int, seed: int, notes: list) -> dict[str, torch.Tensor]:
    """Per parameter state name: bool (labels, *shape): element meets label."""
    masks: dict[str, torch.Tensor] = {}
    if not graph.meeting or not graph.labels:
        return masks
    gen = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        point = graph.draw(gen)
        _cotangents(graph, point, gen)
        dirs = graph.directions(point, gen)
        if not dirs:
            return masks   # no differentiable input: nothing is met
        z0 = {k: torch.zeros(v.shape[1:], dtype=torch.float64) for k, v in dirs.items()}
        state_of = {graph.state[n]: n for n in graph.param if n in graph.kind}
        thetas = {node: {s: point.values[state_of[s]] for s in states} for node, states in graph.meeting.items()}

        def f(th, z):
            return graph.forward(point, z, thetas=th)

        def mixed(v):
            g = lambda z: torch.func.grad(f, argnums=0)(thetas, z)  # noqa: E731
            return torch.func.jvp(g, (z0,), (v,))[1]

        with _quiet():
            M = torch.func.vmap(mixed, chunk_size=CHUNK, randomness="same")(dirs)
        for node, per_state in M.items():
            # One scale per node and trial: every parameter it consumes, every label.
            mags = {state: _finite(t, notes, describe_node(graph.by_name[node])) for state, t in per_state.items()}
            scale = max((float(a.max()) for a in mags.values() if a.numel()), default=0.0)
            for state, a in mags.items():
                nz = a > _threshold(scale)
                masks[state] = masks[state] | nz if state in masks else nz
    return masks
