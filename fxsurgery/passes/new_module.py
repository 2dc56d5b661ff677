"""Building the new GraphModule: the old graph, unlifted into an ordinary module, with its
parameters resized and the literal shapes in its operators re-specialised.

torch.export bakes every shape into the graph as literal integers (`view(x, [2, 3, 4, 8])`,
`zeros([1, 2, 32])`, `layer_norm(x, [32], ...)`). `reach` gives the new shape of every labelled
value; operators whose arguments spell a shape get it here, one rule per argument convention
(a shape, split sizes, a normalised shape, a range end). A value without labels that is created
from a shape (an LSTM's zero initial state) takes the shape of the output of its consumer that
it stands for. The result is then run on meta tensors and every value's shape is checked against
`reach`, so that a rewrite that would compute something else fails here, naming the node.
"""
from __future__ import annotations

import copy
import logging
import math
import operator
import warnings

import torch
import torch.fx

from ..nodes import describe_node, packet
from .layouts import SizingError
from .new_shapes import Reach

__all__ = ["build_graph_module", "initial_values", "check_shapes"]

aten = torch.ops.aten

_SHAPE_ARG = {  # overload packet -> index of the argument that is the output shape
    "view": 1, "_unsafe_view": 1, "reshape": 1, "view_copy": 1, "expand": 1, "expand_copy": 1,
    "broadcast_to": 1, "new_zeros": 1, "new_ones": 1, "new_empty": 1, "new_full": 1,
    "zeros": 0, "ones": 0, "empty": 0, "full": 0, "rand": 0, "randn": 0, "empty_strided": 0,
}
_CREATES = {"zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty",
            "new_full", "empty_strided"}
_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_NORMALISED_SHAPE = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}


def _old_shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _infer_created(graph, shapes: dict) -> None:
    """Label-free values created from a shape (zeros for an LSTM's initial state) take the new
    shape of the output of their consumer that has their old shape (the final state)."""
    for node in graph.nodes:
        if node.op != "call_function" or packet(node) not in _CREATES or node.name in shapes:
            continue
        old = _old_shape(node)
        for user in node.users:   # (an LSTM taking its states in a list is a user too)
            for out in _outputs(user):
                if out.name in shapes and _old_shape(out) == old:
                    shapes[node.name] = shapes[out.name]
                    break
            if node.name in shapes:
                break


def _outputs(node):
    if isinstance(node.meta.get("val"), (tuple, list)):
        return [u for u in node.users if u.target is operator.getitem]
    return [node]


def _keep_inferred(old, new) -> list:
    """The new shape argument, keeping an inferred axis (-1) where the old one had it: the
    other literals determine it, and a size the module frees (the batch) may be behind it."""
    out = list(new)
    if isinstance(old, (list, tuple)) and len(old) == len(out):
        out = [-1 if o == -1 else n for o, n in zip(old, out)]
    return out


def _rewrite_args(node, shapes: dict) -> None:
    """Re-specialises the literal shapes in one node's arguments."""
    name = packet(node)
    new = shapes.get(node.name)
    args = list(node.args)
    if name in _SHAPE_ARG and new is not None:
        i = _SHAPE_ARG[name]
        if i < len(args):
            args[i] = _keep_inferred(args[i], new)
        elif "size" in node.kwargs:
            node.kwargs = {**node.kwargs, "size": _keep_inferred(node.kwargs["size"], new)}
    elif name in ("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes"):
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
        outs = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
        sizes = [(shapes.get(u.name) or _old_shape(u))[dim] for u in outs]
        if len(outs) != len(node.meta["val"]):
            raise SizingError(f"{describe_node(node)}: a split whose parts are not all used cannot be resized")
        if sizes != [_old_shape(u)[dim] for u in outs]:
            node.target = aten.split_with_sizes.default
            args = [args[0], sizes, dim]
    elif name == "unflatten" and new is not None:
        dim = args[1] % len(_old_shape(args[0]))     # counted on the input's axes
        args[2] = list(new[dim:dim + len(args[2])])
    elif name in _NORMALISED_SHAPE:
        x = args[0]
        xs = shapes.get(x.name) or _old_shape(x)
        args[1] = list(xs[len(xs) - len(args[1]):])
    elif name == "arange" and new is not None:
        if len(args) == 1:
            args[0] = new[0]
        else:
            step = args[2] if len(args) > 2 else 1
            args[1] = args[0] + new[0] * step
    elif name == "slice":
        x = args[0]
        dim = args[1] if len(args) > 1 else 0
        old_in, new_in = _old_shape(x), shapes.get(x.name)
        if new_in is not None and new_in[dim] != old_in[dim]:
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else old_in[dim]
            step = args[4] if len(args) > 4 else 1
            start = start + old_in[dim] if start < 0 else start
            open_end = end >= old_in[dim]
            want = (new or _old_shape(node))[dim]
            if step == 1 and open_end:
                if len(args) > 3:
                    args[3] = new_in[dim]
                if new_in[dim] - start != want:
                    raise SizingError(f"{describe_node(node)}: slices axis {dim} from {start} to its end, which would "
                                      f"hold {new_in[dim] - start} positions, not {want}")
            elif end < 0 or want != _old_shape(node)[dim]:
                raise SizingError(f"{describe_node(node)}: slices axis {dim} of a value the change resizes; "
                                  "the new bounds cannot be told")
            # else: a slice that keeps its positions (before the change's new members)
    node.args = tuple(args)


def initial_values(old: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    """The value a resized parameter or buffer starts from before the plan carries the old
    elements over: what a fresh layer would hold. A constant tensor (a norm's ones or zeros)
    stays that constant; a running variance starts at one and a running mean at zero; a weight
    is drawn like torch's Linear and Conv (uniform within 1/sqrt(fan-in)); another vector
    follows its old values' mean and spread."""
    with torch.no_grad():
        if not old.is_floating_point() or old.numel() == 0:
            out = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if old.numel():
                out.fill_(old.reshape(-1)[0].item())
            return out
        flat = old.reshape(-1)
        if bool((flat == flat[0]).all()):
            return torch.full(shape, flat[0].item(), dtype=old.dtype, device=old.device)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            return torch.ones(shape, dtype=old.dtype, device=old.device)
        if leaf == "running_mean":
            return torch.zeros(shape, dtype=old.dtype, device=old.device)
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            bound = 1 / math.sqrt(max(fan_in, 1))
            return torch.empty(shape, dtype=old.dtype, device=old.device).uniform_(-bound, bound)
        std = float(flat.float().std()) if flat.numel() > 1 else 0.0
        return torch.empty(shape, dtype=old.dtype, device=old.device).normal_(float(flat.float().mean()), std)


def build_graph_module(traced, r: Reach) -> tuple[torch.fx.GraphModule, dict]:
    """The new module: fresh parameters and buffers (resized ones initialised, the others
    copies), the graph with its shapes re-specialised; and the new shape of every value that
    changes (for `check_shapes`). The old model is only read."""
    try:
        old_gm = traced.program.module()
    except SyntaxError as err:   # torch writes `self.a.global` for a submodule named like a keyword
        raise SizingError(f"torch.export cannot turn this graph back into a module ({err.msg}: "
                          f"{(err.text or '').strip()}); a submodule named after a Python keyword? "
                          "rename it") from err
    state = dict(old_gm.state_dict(keep_vars=True))
    memo = {}
    tied = {}
    for name, t in state.items():
        if id(t) in tied:          # a tied tensor: one new tensor for all its names
            continue
        shape = r.param_shapes.get(traced.canonical(name)) or r.param_shapes.get(name)
        if t.device.type == "meta":
            value = torch.empty(shape or tuple(t.shape), dtype=t.dtype, device="meta")
        elif shape is None:
            value = t.detach().clone()
        else:
            value = initial_values(t.detach(), shape, name)
        new = torch.nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else value
        memo[id(t)] = new
        tied[id(t)] = new
    with warnings.catch_warnings():
        # torch's own deprecation, raised inside its pytree code when a graph holding a
        # LeafSpec is copied (not a use of ours): users of a pass would see it every time.
        warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning)
        gm = copy.deepcopy(old_gm, memo)
    graph = gm.graph
    old_nodes = {n.name: n for n in traced.graph.nodes}
    shapes = dict(r.node_shapes)
    for node in graph.nodes:       # carry the exported graph's values (shapes) for the rules below
        if node.name in old_nodes and "val" in old_nodes[node.name].meta:
            node.meta["val"] = old_nodes[node.name].meta["val"]
    _infer_created(graph, shapes)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            # The export's input guards check the old shapes; the new module has new ones.
            graph.erase_node(node)
            continue
        if node.op == "call_function":
            _rewrite_args(node, shapes)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)
    graph.lint()
    gm.recompile()
    gm.meta = {}
    return gm, shapes


def _no_new_broadcast(node, env, before) -> None:
    """An axis that shrinks to one position next to an operand that keeps several would be
    broadcast against it: the operator would run and compute something else (a query pruned to
    one head attends with every key head). Refused, naming the node."""
    operands = [a for a in node.all_input_nodes if a in env and isinstance(env[a], torch.Tensor)
                and a.name in before]
    if len(operands) < 2 or node.name not in before:
        return
    # Only where operands broadcast against each other: element-wise operators (their output is
    # the broadcast of their operands) and attention's batch and head axes.
    if packet(node) in ("scaled_dot_product_attention",):
        axes = range(3, max(env[a].dim() for a in operands) + 1)
    else:
        try:
            if tuple(torch.broadcast_shapes(*[before[a.name] for a in operands])) != before[node.name]:
                return
        except RuntimeError:
            return
        axes = range(1, max(env[a].dim() for a in operands) + 1)
    for k in axes:
        sizes = [(a, env[a].shape[-k] if env[a].dim() >= k else None,
                  before[a.name][-k] if len(before[a.name]) >= k else None) for a in operands]
        shrunk = [a for a, new, old in sizes if new == 1 and old is not None and old > 1]
        wide = [a for a, new, old in sizes if new is not None and new > 1]
        if shrunk and wide:
            raise SizingError(f"{describe_node(node)}: %{shrunk[0].name} shrinks to one position along axis -{k}, "
                              f"where %{wide[0].name} keeps {env[wide[0]].shape[-k]}: it would be broadcast; "
                              "the change cannot be expressed in this graph")


def check_shapes(gm: torch.fx.GraphModule, traced, inputs: dict, shapes: dict) -> None:
    """Runs the new module on fake tensors and checks each value against the shape the change
    gives it (an unchanged value must keep its old shape). `inputs`: the new example inputs by
    user name; the graph's input nodes are those of `traced`'s graph, in its order."""
    expected, before = {}, {}
    for node in gm.graph.nodes:
        old = _old_shape(node)
        if old is not None:
            before[node.name] = old
            if node.op == "call_function":
                expected[node.name] = tuple(shapes.get(node.name, old))

    class _Check(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function":
                _no_new_broadcast(n, self.env, before)
            try:
                out = super().run_node(n)
            except Exception as e:  # noqa: BLE001 - re-raised with the node named
                raise SizingError(f"{describe_node(n)}: the resized graph fails there ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); the change cannot be "
                                  "expressed in this graph") from e
            if isinstance(out, torch.Tensor) and n.name in expected and tuple(out.shape) != expected[n.name]:
                raise SizingError(f"{describe_node(n)}: computes shape {tuple(out.shape)} after the change, expected "
                                  f"{expected[n.name]}; the change cannot be expressed in this graph")
            # The node's metadata now describes the new module (as FakeTensorProp writes it);
            # what was carried over from the old graph would mislead the next pass.
            n.meta["val"] = out
            for stale in ("tensor_meta", "fxsurgery"):
                n.meta.pop(stale, None)
            return out

    # Fake tensors (shapes and devices, no storage): creation ops inside the graph that name a
    # device get fake tensors on it too.
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # The unlifted graph's placeholders are the exported program's user inputs, in its order
    # (their names may differ: `input` becomes `input_1`).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(traced.input_names):
        raise SizingError(f"the new module takes {len(placeholders)} inputs, the traced model "
                          f"{len(traced.input_names)}: {traced.input_names}")
    args = [inputs[name] for name in traced.input_names]
    args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args]
    params = {k: mode.from_tensor(v) for k, v in gm.state_dict(keep_vars=True).items()}
    # A failing operator is reported by the check, with the node named; fake tensor's own log
    # of the same failure would only repeat it.
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        _run_checked(gm, mode, args, params, _Check)
    finally:
        log.setLevel(level)


def _run_checked(gm, mode, args, params, check_cls) -> None:
    with mode, torch.nn.utils.stateless._reparametrize_module(gm, params):
        check_cls(gm).run(*args)   # the graph's placeholders: the flattened inputs
