"""Capture: a model and example inputs become an ATen-level torch.fx graph via torch.export.

The graph is the one `torch.export.export` returns, before decomposition: the rules cover the
operators it emits (`aten.linear`, `aten.lstm.input`, `aten.scaled_dot_product_attention`...),
which spares the several-fold cost of decomposing to core ATen. Parameters and buffers keep
their state_dict names, and the model may live on the meta device: the analysis never reads a
weight.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .labels import Categories, Features
from .sizes import FreeSizes, concretise, dynamic_spec
from .tied import tied_groups

__all__ = ["Traced", "trace", "CaptureError", "InputError", "wrapped_call", "config_overrides"]

# Higher-order operators that torch.export (non-strict) emits around a region run under a
# different grad mode (`torch.no_grad()`, as Hugging Face rotary embeddings are) or autocast
# setting: `wrap_with_set_grad_enabled(enable, submod, *args)`. They call `submod(*args)` and
# nothing else: grad mode and autocast change neither which elements an output depends on nor
# which parameters it meets, so the analyses run the wrapped graph as if it were inlined.
# Name -> position of the wrapped graph module among the arguments.
_WRAPPERS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


class InputError(ValueError):
    """The example inputs or their descriptions are wrong."""


@dataclass
class Traced:
    """A captured model: the exported program plus what fxsurgery needs to label it."""

    model: torch.nn.Module
    program: ExportedProgram
    inputs: tuple                       # example inputs, positional
    input_names: list[str]              # user-facing input names, in order
    input_nodes: list[str]              # the matching placeholder names in the graph
    descriptions: dict[str, Any]        # input name -> Features | Categories | None
    placeholders: dict[str, tuple[str, str]] = field(default_factory=dict)  # placeholder -> (kind, state name)
    aliases: dict[str, list[str]] = field(default_factory=dict)             # state name -> tied names
    keywords: bool = False              # the inputs are passed by name (see trace)
    config: dict = field(default_factory=dict)   # model.config attributes set during capture and calls
    notes: list = field(default_factory=list)    # what the capture did that the user should know
    sizes: Optional[FreeSizes] = None            # the free sizes, for a capture with dynamic=True

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program.graph_module

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def call(self, model: torch.nn.Module, args):
        """Runs `model` (this one, or another traced the same way) on inputs given in the
        order of `input_names`, passing them the way the capture did (with the same
        configuration switches, see `config`)."""
        with config_overrides(model, self.config):
            if self.keywords:
                return model(**dict(zip(self.input_names, args)))
            return model(*args)

    def canonical(self, name: str) -> str:
        """The one name a group of tied parameters is known by (the first state_dict name)."""
        return self._canonical.get(name, name)

    @property
    def _canonical(self) -> dict[str, str]:
        return {a: names[0] for names in self.aliases.values() for a in names}

    def state_shapes(self) -> dict[str, tuple]:
        """Shapes of every parameter and buffer the graph reads, by state_dict name."""
        shapes = {}
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.placeholders:
                kind, name = self.placeholders[node.name]
                if kind in ("parameter", "buffer"):
                    shapes[name] = tuple(node.meta["val"].shape)
        return shapes

    def __repr__(self) -> str:
        n = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return (f"Traced({type(self.model).__name__}, inputs={self.input_names}, "
                f"{n} operators, {len(self.state_shapes())} parameters and buffers)")


@contextlib.contextmanager
def config_overrides(model: torch.nn.Module, overrides: Mapping[str, Any]):
    """Sets attributes of `model.config` for the duration of the block and restores them,
    even when the block fails. A model without a `config` (or that lacks them) is left alone."""
    config = getattr(model, "config", None)
    saved = {k: getattr(config, k) for k in overrides if config is not None and hasattr(config, k)}
    try:
        for k in saved:
            setattr(config, k, overrides[k])
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


def _capture_switches(model: torch.nn.Module) -> tuple[dict, list[str]]:
    """Configuration to switch off for the capture, and why. A Hugging Face model with its
    default `use_cache=True` returns a key/value cache object that torch.export cannot
    flatten ("Found DynamicCache in output"); the cache changes no output the analysis reads,
    so it is off while the model is captured and whenever the Traced runs it."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        return {}, []
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts:
        return {}, []
    return {"use_cache": False}, [f"{type(model).__name__}: config.use_cache was switched off for the capture "
                                  "and for every run of the traced model (a key/value cache cannot be captured); "
                                  "the model's configuration is left as it was"]


def wrapped_call(target, args) -> tuple | None:
    """(wrapped graph module, its arguments) when `target` is one of the wrapper higher-order
    operators above, else None."""
    if not isinstance(target, torch._ops.HigherOrderOperator):
        return None
    at = _WRAPPERS.get(target.name())
    if at is None or len(args) <= at:
        return None
    return args[at], tuple(args[at + 1:])


def _as_tuple(example_inputs) -> tuple[tuple, list[str] | None]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, Mapping):
        # Names for positional inputs, in order (for a forward(*inputs) that torch.export
        # would otherwise call inputs_0, inputs_1, ...).
        return tuple(example_inputs.values()), [str(k) for k in example_inputs]
    if isinstance(example_inputs, list):
        return tuple(example_inputs), None
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tensor, a tuple of tensors or a dict of named "
                         f"positional tensors, got {type(example_inputs).__name__}")
    return example_inputs, None


def _by_keyword(model: torch.nn.Module, names: list[str]) -> bool:
    """Whether a dict of example inputs is passed to forward by keyword: when its names are
    parameters of forward but not its leading positional ones in order. A model with optional
    arguments in between (`forward(input_ids, past_key_values=None, attention_mask=None)`)
    would otherwise receive `attention_mask` as `past_key_values`. Names that are not all
    parameters of forward name positional inputs (a `forward(*inputs)`), as before."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional[:len(names)] == names:
        return False
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return all(n in by_name for n in names)


def _check_description(name: str, desc, val: torch.Tensor) -> None:
    if isinstance(desc, Features):
        if val.dim() == 0:
            raise InputError(f"input {name!r} is a scalar: Features needs an axis to label")
        if not -val.dim() <= desc.dim < val.dim():
            raise InputError(f"Features for input {name!r} label dim {desc.dim}, but the input has "
                             f"{val.dim()} dimensions (shape {tuple(val.shape)})")
        size = val.shape[desc.dim]
        if size != len(desc):
            raise InputError(f"Features for input {name!r} name {len(desc)} features, but axis "
                             f"{desc.dim} of the input has size {size} (shape {tuple(val.shape)})")
    elif isinstance(desc, Categories):
        if val.dtype.is_floating_point or val.dtype.is_complex or val.dtype == torch.bool:
            raise InputError(f"input {name!r} is described by Categories but holds {val.dtype}; "
                             "categories label the values of an integer index input")
    elif desc is not None:
        raise InputError(f"the description of input {name!r} must be fs.Features or fs.Categories, "
                         f"got {type(desc).__name__}")


# Operators that pass an index input's values on unchanged (moved, selected, reshaped, cast):
# the categories reach whatever their output indexes.
_KEEPS_VALUES = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "slice",
                 "select", "expand", "expand_as", "permute", "transpose", "t", "contiguous", "clone", "alias",
                 "detach", "to", "_to_copy", "type_as", "narrow", "repeat", "repeat_interleave", "flip", "roll",
                 "split", "split_with_sizes", "chunk", "unbind", "getitem", "movedim", "lift_fresh_copy"}
# Operators that look a table up by an index: packet -> (table argument, index argument, the
# argument that holds the indexed axis, or None for axis 0).
_LOOKUPS = {"embedding": (0, 1, None), "embedding_bag": (0, 1, None), "_embedding_bag": (0, 1, None),
            "_embedding_bag_forward_only": (0, 1, None), "index_select": (0, 2, 1), "gather": (0, 2, 1),
            "take_along_dim": (0, 1, 2)}


def _packet_name(node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    return getattr(getattr(target, "overloadpacket", None), "__name__", getattr(target, "__name__", ""))


def _tables(graph: torch.fx.Graph, start: str, placeholders: dict) -> list[tuple[str, int, str]]:
    """Every table that the values of input node `start` index: (what, rows, node name), where
    `what` names the parameter or buffer (or the node, for a computed table or a one_hot)."""
    nodes = {n.name: n for n in graph.nodes}
    todo, seen, found = [nodes[start]], {start}, []

    def size(node, axis):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(axis, int) or not -val.dim() <= axis < max(val.dim(), 1):
            return None
        return int(val.shape[axis])

    def name_of(node):
        kind, target = placeholders.get(node.name, (None, None))
        return f"{kind} {target!r}" if kind in ("parameter", "buffer", "constant") else f"node %{node.name}"

    while todo:
        value = todo.pop()
        for user in value.users:
            packet = _packet_name(user)
            args = list(user.args)
            if packet in _LOOKUPS:
                t, i, at = _LOOKUPS[packet]
                if len(args) > i and args[i] is value:
                    axis = 0 if at is None else (args[at] if len(args) > at else user.kwargs.get("dim"))
                    rows = size(args[t], axis)
                    if rows is not None:
                        found.append((name_of(args[t]), rows, user.name))
                    continue
            if packet == "index" and len(args) > 1 and isinstance(args[1], (list, tuple)) and value in args[1]:
                rows = size(args[0], list(args[1]).index(value))
                if rows is not None:
                    found.append((name_of(args[0]), rows, user.name))
                continue
            if packet == "one_hot" and args and args[0] is value:
                rows = size(user, -1)
                if rows is not None:
                    found.append(("a one_hot", rows, user.name))
                continue
            if packet in _KEEPS_VALUES and args and (args[0] is value or packet == "getitem") \
                    and user.name not in seen:
                seen.add(user.name)
                todo.append(user)
    return found


def _check_categories(name: str, desc: Categories, example: torch.Tensor, tables: list) -> None:
    """The categories must name every row of each table the input indexes, and no more; and the
    example's values must be categories."""
    n = len(desc)
    wrong = [(what, rows, node) for what, rows, node in tables if rows != n]
    if wrong:
        listed = "; ".join(f"{what} (at node %{node}) has {rows} rows" for what, rows, node in wrong)
        rows = wrong[0][1]
        fix = (f"name all {rows} rows (unused ones too: '<unused{n}>', ...)" if rows > n
               else f"name only the {rows} rows there are")
        raise InputError(f"input {name!r} is described by {n} categories, but it indexes tables of another "
                         f"size: {listed}. A category is a row of every table its input indexes (rows without "
                         f"a category would meet no label, and a value past the last row would not exist); "
                         f"{fix}")
    if example.device.type != "meta" and example.numel():
        lo, hi = int(example.min()), int(example.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise InputError(f"input {name!r} holds the value {bad}, but its {n} categories are the values "
                             f"0..{n - 1}: describe every value the input takes")


def _export_hint(err: Exception) -> str:
    text = str(err)
    if "data-dependent" in text or "GuardOnDataDependentSymNode" in type(err).__name__:
        return ("the model branches on tensor values; make the control flow depend on shapes only, "
                "or use torch.cond")
    if "not supported" in text.lower() and "output" in text.lower():
        return "return tensors, or tuples/lists/dicts of tensors, from forward"
    return ("check that forward runs on the example inputs, that it returns tensors, and that its "
            "control flow depends on shapes rather than values")


def _export(model, args, names, strict: bool, dynamic: bool, notes: list):
    """torch.export of the model (by keyword when `names` is given: the graph's inputs follow
    their order), with free sizes when `dynamic`; returns the program and whether its sizes are
    free. A capture with free sizes that fails falls back to a static one, said in `notes`."""
    kwargs = dict(zip(names, args)) if names is not None else {}
    pos = () if names is not None else args
    if dynamic:
        spec, small = dynamic_spec(pos, kwargs, model)
        try:
            program = torch.export.export(model, pos, kwargs, strict=strict, dynamic_shapes=spec)
            return program, small
        except Exception as err:  # noqa: BLE001 - the static capture below is the answer, and said
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            notes.append(f"sizes fixed: torch.export could not capture with free sizes ({type(err).__name__}: "
                         f"{reason})")
    return torch.export.export(model, pos, kwargs, strict=strict), None


def _free_sizes(program, input_nodes, input_names, args, small) -> FreeSizes:
    """Concretises a program captured with free sizes and names the axes left fixed."""
    sizes = concretise(program, input_nodes)
    free = {ka for axes in sizes.axes.values() for ka in axes}   # every axis of a free size
    sizes.fixed = [(input_names[k], axis, n, f"the example has {n} position{'s' * (n != 1)}; give two "
                    "or more to free it") for k, axis, n in small]
    for k, x in enumerate(args):
        for axis in range(x.dim()):
            if x.shape[axis] >= 2 and (k, axis) not in free:
                sizes.fixed.append((input_names[k], axis, x.shape[axis], "the graph fixes it"))
    return sizes


def trace(model: torch.nn.Module, example_inputs, features: Optional[Mapping[str, Any]] = None,
          *, strict: bool = False, dynamic: bool = False) -> Traced:
    """Captures `model` on `example_inputs` and attaches the input descriptions.

    `features` maps input argument names to `Features` or `Categories`; inputs not named there
    get one label each, named after the argument. `example_inputs` may be a dict: inputs by
    the names of forward's parameters (passed by keyword unless they are its leading
    parameters in order), or names for positional inputs in order (a `forward(*inputs)`).
    Works with the model and inputs on the meta device. The model is not modified.

    `dynamic=True` captures with every size free that the graph leaves free (torch.export
    dynamic shapes, see `fxsurgery.sizes`): the analyses see the same static graph, and
    `traced.sizes` says which sizes are free, so that a rewriting pass builds a module that runs
    at all of them without capturing the model again. It costs about two to four static
    captures; if torch.export cannot capture the model with free sizes, the capture is static
    and `traced.notes` says why.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"trace expects a torch.nn.Module, got {type(model).__name__}")
    args, given_names = _as_tuple(example_inputs)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            label = repr(given_names[i]) if given_names else str(i)
            raise InputError(f"example input {label} is a {type(a).__name__}, not a tensor; fxsurgery "
                             "labels tensor inputs only (bind other arguments with a wrapper module)")
    if features is not None and not isinstance(features, Mapping):
        raise InputError(f"features must be a dict of input name -> fs.Features or fs.Categories, got "
                         f"{type(features).__name__}")
    features = dict(features or {})
    keywords = given_names is not None and _by_keyword(model, given_names)

    switches, notes = _capture_switches(model)
    with warnings.catch_warnings(), config_overrides(model, switches):
        # nn.LSTM/GRU warn about their flat weights being non-contiguous under export.
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        try:
            program, sizes = _export(model, args, given_names if keywords else None, strict, dynamic, notes)
        except Exception as err:  # noqa: BLE001 - we re-raise with the exporter's reason
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                               f"{type(err).__name__}: {reason}. Try: {_export_hint(err)}.") from err

    sig = program.graph_signature
    placeholders: dict[str, tuple[str, str]] = {}
    input_nodes: list[str] = []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            input_nodes.append(name)
            placeholders[name] = ("input", name)
        elif spec.kind == InputKind.PARAMETER:
            placeholders[name] = ("parameter", spec.target)
        elif spec.kind == InputKind.BUFFER:
            placeholders[name] = ("buffer", spec.target)
        else:
            placeholders[name] = ("constant", spec.target or name)

    if given_names is not None:
        if len(given_names) != len(input_nodes):
            raise InputError(f"{len(given_names)} named inputs were given, but the captured graph "
                             f"has {len(input_nodes)} tensor inputs")
        input_names = given_names
    else:
        input_names = list(input_nodes)
    unknown = sorted(set(features) - set(input_names))
    if unknown:
        raise InputError(f"features describe {unknown}, which {'is' if len(unknown) == 1 else 'are'} "
                         f"not an input of {type(model).__name__}; its tensor inputs are {input_names}")
    if sizes is not None:
        sizes = _free_sizes(program, input_nodes, input_names, args, sizes)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    for name, node, example in zip(input_names, input_nodes, args):
        desc = features.get(name)
        _check_description(name, desc, vals[node])
        if isinstance(desc, Categories):
            _check_categories(name, desc, example, _tables(program.graph, node, placeholders))

    # Tied parameters are lifted once; remember every state_dict name that shares the tensor.
    aliases = {group[0]: list(group) for group in tied_groups(model)}

    return Traced(model=model, program=program, inputs=args, input_names=input_names, input_nodes=input_nodes,
                  descriptions={n: features.get(n) for n in input_names},
                  placeholders=placeholders, aliases=aliases, keywords=keywords, config=switches, notes=notes,
                  sizes=sizes)
