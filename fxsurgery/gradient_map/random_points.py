"""The labels and the random points: where each label lives in `z`-space (one random direction
per label), and the random inputs, parameters and buffers at which the graph is differentiated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..labels import Categories, Features, Label
from .dtypes import _is_float


@dataclass
class _Point:
    """One random point: placeholder values, the one-hot tensors of category inputs, the
    perturbation variables' shapes and the cotangents of the meeting nodes."""
    values: dict
    onehot: dict
    cotangents: dict


class _RandomPoints:
    """Part of `_Graph` (graph.py): the labels, the random points and the labels' directions."""

    def _labels(self) -> list[tuple[Label, str, Any]]:
        """(label, input name, where) for every label, in the order of the inputs."""
        out = []
        for name, node in zip(self.traced.input_names, self.traced.input_nodes):
            desc = self.traced.descriptions.get(name)
            if isinstance(desc, Features):
                out += [(Label("feature", name, f, i), name, i) for i, f in enumerate(desc.names)]
            elif isinstance(desc, Categories):
                out += [(Label("category", name, c, i), name, i) for i, c in enumerate(desc.names)]
            else:
                out.append((Label("input", name, name, 0), name, None))
        return out

    def draw(self, gen: torch.Generator) -> _Point:
        values, onehot, drawn = {}, {}, {}
        constants = self.traced.program.constants
        model_state = {**dict(self.traced.model.named_parameters(remove_duplicate=False)),
                       **dict(self.traced.model.named_buffers(remove_duplicate=False))}
        for n in self.nodes:
            if n.op != "placeholder":
                continue
            val = n.meta.get("val")
            kind, state = self.kind[n.name], self.state[n.name]
            if not isinstance(val, torch.Tensor):
                values[n.name] = val
                continue
            shape = tuple(val.shape)
            if kind == "input":
                name = self.input_of[n.name]
                desc = self.traced.descriptions.get(name)
                if isinstance(desc, Categories):
                    idx = torch.randint(0, len(desc), shape, generator=gen, dtype=torch.int64)
                    values[n.name] = idx.to(val.dtype)
                    onehot[name] = torch.nn.functional.one_hot(idx, len(desc)).to(torch.float64)
                elif _is_float(val):
                    values[n.name] = torch.randn(shape, generator=gen, dtype=torch.float64)
                else:
                    values[n.name] = self._fixed(self._example(name), val)
            elif kind in ("parameter", "buffer"):
                if state in drawn:
                    values[n.name] = drawn[state]
                elif _is_float(val):
                    r = torch.randn(shape, generator=gen, dtype=torch.float64)
                    values[n.name] = (0.5 * r).exp() if kind == "buffer" and "var" in state.rsplit(".", 1)[-1] else r
                else:
                    values[n.name] = self._fixed(model_state.get(state), val)
                drawn[state] = values[n.name]
            else:
                const = constants.get(state)
                if _is_float(val) and (not isinstance(const, torch.Tensor) or const.device.type == "meta"):
                    values[n.name] = torch.randn(shape, generator=gen, dtype=torch.float64)
                else:
                    values[n.name] = self._fixed(const, val)
        return _Point(values, onehot, {})

    def _example(self, name: str):
        i = self.traced.input_names.index(name)
        return self.traced.inputs[i] if i < len(self.traced.inputs) else None

    @staticmethod
    def _fixed(tensor, val: torch.Tensor) -> torch.Tensor:
        """A non-differentiable value: the real one when it exists, else zeros."""
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and tuple(tensor.shape) == tuple(val.shape):
            t = tensor.detach().to("cpu")
            return t.to(torch.float64) if t.dtype.is_floating_point else t.clone()
        dtype = torch.float64 if val.dtype.is_floating_point else val.dtype
        return torch.zeros(tuple(val.shape), dtype=dtype)

    def z_shapes(self, point: _Point) -> dict[str, tuple]:
        """Shapes of the perturbation variables, by input name (differentiable inputs only)."""
        shapes = {}
        for node, name in self.input_of.items():
            if name in point.onehot:
                shapes[name] = tuple(point.onehot[name].shape)
            elif _is_float(point.values.get(node)):
                shapes[name] = tuple(point.values[node].shape)
        return shapes

    def directions(self, point: _Point, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One direction per label: random normal weights on the label's positions."""
        shapes = self.z_shapes(point)
        L = len(self.labels)
        dirs = {name: torch.zeros((L,) + s, dtype=torch.float64) for name, s in shapes.items()}
        for k, (label, name, where) in enumerate(self.labels):
            if name not in shapes:
                continue   # an integer input without Categories: nothing to differentiate
            shape = shapes[name]
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
            if label.kind == "feature":
                dim = self.traced.descriptions[name].dim % len(shape)
                dirs[name][k].select(dim, where).copy_(w.select(dim, where))
            elif label.kind == "category":
                dirs[name][k][..., where] = w[..., where]
            else:
                dirs[name][k] = w
        return dirs
