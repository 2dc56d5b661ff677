"""Running the graph at a random point plus the perturbation `z`: every value (for dependence),
or the sum of <c_N, N(theta_N, u(z))> over the meeting nodes (for meeting), node by node."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from ..capture import wrapped_call
from ..nodes import describe_node
from .categories import _Cat, _gather_rows
from .dtypes import _is_float, _to_cpu64
from .errors import GradientMapError, _op_name
from .random_points import _Point


class _Evaluation:
    """Part of `_Graph` (graph.py): the graph run as a function of `z` (and the parameter copies)."""

    def forward(self, point: _Point, z: dict, thetas: dict | None = None, collect: bool = False):
        """Runs the graph at `point + z`. With `thetas` ({meeting node: {state: tensor}}),
        returns the sum of <c_N, N(theta_N, u(z))> over the meeting nodes; with `collect`, the
        value of every node (category-derived indices as their one-hot rows)."""
        env: dict[str, Any] = {}
        onehot = {name: oh + z[name] for name, oh in point.onehot.items()}
        total = None
        for n in self.nodes:
            if n.op == "placeholder":
                v = point.values[n.name]
                if self.kind[n.name] == "input":
                    name = self.input_of[n.name]
                    if name in onehot:
                        pos = torch.arange(v.numel(), dtype=torch.int64).reshape(v.shape)
                        v = _Cat(v, pos, name)
                    elif name in z:
                        v = v + z[name]
                env[n.name] = v
            elif n.op == "get_attr":
                obj = self.gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n.name] = obj
            elif n.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a.name])
                env[n.name] = self.call(n, args, kwargs, onehot)
                if n.name in self.inplace:
                    # An in-place operator changes its first argument for every later reader.
                    env[n.args[0].name] = env[n.name]
                if thetas is not None and n.name in thetas:
                    memo: dict[str, Any] = {}
                    theta = thetas[n.name]
                    args2, kwargs2 = torch.fx.node.map_arg(
                        (n.args, n.kwargs),
                        lambda a: self._param_value(a, theta, memo, env, onehot) if a.name in self.param else env[a.name])
                    out = self.call(n, args2, kwargs2, onehot)
                    outs = [o for o in tree_flatten(out)[0] if isinstance(o, (torch.Tensor, _Cat))]
                    for c, o in zip(point.cotangents[n.name], outs):
                        if c is not None and _is_float(o):
                            term = (c * o).sum()
                            total = term if total is None else total + term
            elif n.op == "output":
                break
            else:
                raise GradientMapError(f"{n.op} nodes are not supported ({describe_node(n)})")
        if thetas is not None:
            return total if total is not None else torch.zeros((), dtype=torch.float64)
        if collect:
            # Category-moved indices are represented by their one-hot rows (a trailing axis of
            # categories); their names go to self.cat_outputs as (node, output) pairs.
            out = {}
            for name, v in env.items():
                if isinstance(v, (tuple, list)):
                    reps = []
                    for k, x in enumerate(v):
                        if isinstance(x, _Cat):
                            self.cat_outputs.add((name, k))
                            reps.append(_gather_rows(onehot[x.input], x.pos))
                        elif _is_float(x):
                            reps.append(x)
                        else:
                            reps = None
                            break
                    if reps:
                        out[name] = tuple(reps)
                elif isinstance(v, _Cat):
                    self.cat_outputs.add((name, None))
                    out[name] = _gather_rows(onehot[v.input], v.pos)
                elif _is_float(v):
                    out[name] = v
            return out
        return env

    def _param_value(self, node, theta, memo, env, onehot):
        """The parameter-derived value of `node` recomputed from the parameter copy `theta`."""
        if node.name in memo:
            return memo[node.name]
        if node.name not in self.param:
            return env[node.name]
        if node.op == "placeholder":
            v = theta.get(self.state[node.name], env[node.name])
        else:
            args, kwargs = torch.fx.node.map_arg(
                (node.args, node.kwargs), lambda a: self._param_value(a, theta, memo, env, onehot))
            v = self.call(node, args, kwargs, onehot)
        memo[node.name] = v
        return v

    def call(self, node, args, kwargs, onehot):
        target = self.functional.get(node.name, node.target)
        try:
            if target is operator.getitem:
                return args[0][args[1]]
            args, kwargs = _to_cpu64((args, kwargs))
            flat = tree_flatten((args, kwargs))[0]
            if any(isinstance(a, _Cat) for a in flat):
                return self._call_cat(node, target, args, kwargs, onehot)
            if node.name in self.impl:
                gm, positions = self.impl[node.name]
                return gm(*[flat[i] for i in positions])
            wrapped = wrapped_call(target, args)
            if wrapped is not None and not kwargs:
                # A no_grad / autocast region is run as if inlined: under no_grad its
                # derivatives, which this mapping reads, would vanish.
                return wrapped[0](*wrapped[1])
            return target(*args, **kwargs)
        except GradientMapError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the node and operator named
            raise GradientMapError(f"{_op_name(target)} at {describe_node(node)} could not be differentiated: "
                                   f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
