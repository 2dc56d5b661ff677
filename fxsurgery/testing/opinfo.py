"""One-operator models built from torch's own operator samples (its OpInfo database).

For a registered rule's operator, `sources(op)` names the OpInfos whose samples emit it, and
`models(case)` turns one sample (a call `fn(*args, **kwargs)`) into small modules that
fxsurgery can capture and label:

- "inputs": every floating tensor of the call is a model input, and every one of its elements
  is a label of its own (the input is passed flat, one `Features` name per element, and viewed
  back to its shape inside the model, so that the check sees every element's dependence; past
  MAX_LABELS elements, labels repeat modulo MAX_LABELS);
- "parameters": the call's first floating tensor stays a labelled input and the others are
  parameters of the module (a weight, a bias, a norm's affine terms), so that what each
  parameter element meets is checked too.

Integer and boolean tensors (indices, masks) and empty ones are constants of the module: they
are not differentiable, and the rules read index values from constants.

OpInfo lives in `torch.testing._internal`, which imports the `expecttest` package (a test
dependency). The database is loaded on first use.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..labels import Features

__all__ = ["Case", "Model", "op_db", "sources", "opinfo_cases", "models", "MAX_LABELS", "EXTRA_SOURCES"]

# At most this many labels per input: the gradient mapping costs about one forward-over-reverse
# pass per label. A larger input is labelled modulo this number (element j gets label
# j % MAX_LABELS), so that every element still carries a label and neighbours differ.
MAX_LABELS = 64

# Operators that no OpInfo is named after but whose samples emit them (through a Python
# function of another name, or after decomposition to core ATen): operator -> OpInfo names
# ("name" or "name.variant_test_name"). Matching by name alone would leave these unchecked.
EXTRA_SOURCES = {
    "aten.convolution.default": ["nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv_transpose2d"],
    "aten._convolution.default": ["nn.functional.conv2d"],
    "aten._softmax.default": ["softmax", "nn.functional.softmax"],
    "aten._log_softmax.default": ["log_softmax", "nn.functional.log_softmax"],
    "aten._safe_softmax.default": ["softmax"],
    "aten.special_softmax.default": ["softmax"],
    "aten._to_copy.default": ["to", "float", "double", "nn.functional.dropout"],
    "aten._unsafe_view.default": ["reshape", "flatten", "matmul", "einsum"],
    "aten._unsafe_index.Tensor": ["nn.functional.interpolate.nearest", "nn.functional.interpolate.bilinear"],
    "aten.index.Tensor": ["index_select", "take_along_dim", "__getitem__"],
    "aten.alias.default": ["view_as", "alias_copy"],
    "aten.detach.default": ["detach"],
    "aten.lift_fresh_copy.default": ["detach"],
    "aten.native_layer_norm.default": ["nn.functional.layer_norm"],
    "aten.native_group_norm.default": ["nn.functional.group_norm"],
    "aten.native_batch_norm.default": ["nn.functional.batch_norm"],
    "aten._native_batch_norm_legit.default": ["nn.functional.batch_norm"],
    "aten._native_batch_norm_legit_functional.default": ["nn.functional.batch_norm"],
    "aten._native_batch_norm_legit_no_training.default": ["nn.functional.batch_norm"],
    "aten._fused_rms_norm.default": ["nn.functional.rms_norm"],
    "aten._prelu_kernel.default": ["nn.functional.prelu"],
    "aten.log_sigmoid_forward.default": ["nn.functional.logsigmoid"],
    "aten.bitwise_and.Tensor": ["__rand__", "bitwise_and"],
    "aten.max_pool2d_with_indices.default": ["nn.functional.max_pool2d"],
    "aten.max_pool1d_with_indices.default": ["nn.functional.max_pool1d"],
    "aten.max_pool3d_with_indices.default": ["nn.functional.max_pool3d"],
    "aten._adaptive_avg_pool2d.default": ["nn.functional.adaptive_avg_pool2d"],
    "aten._adaptive_avg_pool3d.default": ["nn.functional.adaptive_avg_pool3d"],
    "aten.reflection_pad1d.default": ["nn.functional.pad.reflect"],
    "aten.reflection_pad2d.default": ["nn.functional.pad.reflect"],
    "aten.reflection_pad3d.default": ["nn.functional.pad.reflect"],
    "aten.replication_pad1d.default": ["nn.functional.pad.replicate"],
    "aten.replication_pad2d.default": ["nn.functional.pad.replicate"],
    "aten.replication_pad3d.default": ["nn.functional.pad.replicate"],
    "aten.upsample_nearest1d.vec": ["nn.functional.interpolate.nearest"],
    "aten.upsample_nearest2d.vec": ["nn.functional.interpolate.nearest"],
    "aten.upsample_nearest3d.vec": ["nn.functional.interpolate.nearest"],
    "aten.upsample_nearest1d.default": ["nn.functional.interpolate.nearest"],
    "aten.upsample_nearest2d.default": ["nn.functional.interpolate.nearest"],
    "aten.upsample_nearest3d.default": ["nn.functional.interpolate.nearest"],
    "aten.upsample_linear1d.vec": ["nn.functional.interpolate.linear"],
    "aten.upsample_linear1d.default": ["nn.functional.interpolate.linear"],
    "aten.upsample_bilinear2d.vec": ["nn.functional.interpolate.bilinear", "nn.functional.upsample_bilinear"],
    "aten.upsample_bilinear2d.default": ["nn.functional.interpolate.bilinear"],
    "aten.upsample_trilinear3d.vec": ["nn.functional.interpolate.trilinear"],
    "aten.upsample_trilinear3d.default": ["nn.functional.interpolate.trilinear"],
    "aten.upsample_bicubic2d.vec": ["nn.functional.interpolate.bicubic"],
    "aten.upsample_bicubic2d.default": ["nn.functional.interpolate.bicubic"],
    "aten._upsample_bilinear2d_aa.vec": ["nn.functional.interpolate.bilinear"],
    "aten._upsample_bicubic2d_aa.vec": ["nn.functional.interpolate.bicubic"],
    "aten.threshold_backward.default": [],
    "aten.one_hot.default": ["nn.functional.one_hot"],
    "aten.scaled_dot_product_attention.default": ["nn.functional.scaled_dot_product_attention"],
    "aten._scaled_dot_product_flash_attention_for_cpu.default": ["nn.functional.scaled_dot_product_attention"],
    "aten._scaled_dot_product_attention_math.default": ["nn.functional.scaled_dot_product_attention"],
    "aten.type_as.default": ["type_as"],
}


@dataclass
class Case:
    """One call of an operator: `fn(*args, **kwargs)`, from an OpInfo sample or written by hand."""
    source: str                   # "add[3]" (OpInfo name and sample index) or "hand"
    fn: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        def short(v):
            if isinstance(v, torch.Tensor):
                return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
            return repr(v)
        leaves, spec = tree_flatten((self.args, self.kwargs))
        args, kwargs = tree_unflatten([short(v) if isinstance(v, torch.Tensor) else v for v in leaves], spec)
        inner = ", ".join([str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()])
        return f"{self.source}: ({inner})"


@dataclass
class Model:
    """A one-operator module with its example inputs and features, as `fs.trace` takes them."""
    case: Case
    variant: str                  # "inputs" or "parameters"
    module: nn.Module
    inputs: dict
    features: dict

    def __repr__(self) -> str:
        return f"{self.case!r} [{self.variant}]"


@functools.lru_cache(maxsize=None)
def op_db() -> tuple:
    """torch's OpInfo database, the entries that run in float32 on the CPU."""
    try:
        from torch.testing._internal.common_methods_invocations import op_db as db
    except ImportError as err:   # expecttest is what it usually lacks
        raise ImportError(f"torch's OpInfo database could not be imported ({err}); it needs the test "
                          "dependency expecttest: pip install expecttest (or the package's [test] extra)") from err
    return tuple(o for o in db if torch.float32 in o.supported_dtypes("cpu"))


def full_name(info) -> str:
    return info.name + (f".{info.variant_test_name}" if info.variant_test_name else "")


def _names(info) -> set:
    """The ATen packet names an OpInfo stands for: its aten_name (curated by torch: "conv2d"
    for nn.functional.conv2d), its decomposition's name, its own name and its aliases'."""
    out = {info.aten_name, info.name, info.name.replace(".", "_")}
    if info.name.startswith("nn.functional."):
        out.add(info.name[len("nn.functional."):])
    if info.decomp_aten_name:
        out.add(info.decomp_aten_name)
    out |= {a.name for a in info.aliases}
    return {n for n in out if n}


def _inplace(packet: str) -> bool:
    return packet.endswith("_") and not packet.endswith("__")


def sources(op) -> list:
    """(OpInfo, callable) pairs whose samples may emit `op`: the OpInfos named after its
    packet (an in-place overload `add_` takes the in-place variant of "add"), then those
    EXTRA_SOURCES lists for it."""
    packet = op.overloadpacket.__name__
    base = packet[:-1] if _inplace(packet) else packet
    found, seen = [], set()
    extra = EXTRA_SOURCES.get(str(op), [])
    for info in op_db():
        name = full_name(info)
        if base in _names(info) or name in extra or info.name in extra:
            fn = info.inplace_variant if _inplace(packet) else info.op
            if fn is None or name in seen:
                continue
            if _inplace(packet):
                fn = _on_a_copy(fn)
            seen.add(name)
            found.append((info, fn))
    return found


def _on_a_copy(inplace):
    """An in-place variant run on a copy of its first operand: a captured module must not
    write into its own inputs (and the copy is what the in-place rule then sees)."""
    def call(x, *args, **kwargs):
        return inplace(x.clone(), *args, **kwargs)
    call.__name__ = getattr(inplace, "__name__", "inplace")
    return call


def opinfo_cases(info, fn, limit: int | None) -> list:
    """Cases from the OpInfo's float32 CPU samples, the first `limit` of them (None: all)."""
    out = []
    try:
        samples = info.sample_inputs("cpu", torch.float32, requires_grad=False)
        for i, s in enumerate(samples):
            out.append(Case(f"{full_name(info)}[{i}]", fn, (s.input, *s.args), dict(s.kwargs)))
            if limit is not None and len(out) >= limit:
                break
    except Exception:  # noqa: BLE001 - a sample generator that fails here gives no cases
        return out
    return out


def _float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.numel() > 0


class OneOp(nn.Module):
    """Calls one operator: inputs come in flat and are viewed back to their shapes; the other
    tensors of the call are parameters or constants of the module."""

    def __init__(self, case: Case, leaves: list, spec, slots: dict):
        super().__init__()
        self.fn, self.spec, self.slots = case.fn, spec, slots
        self.fixed = {}
        for i, v in enumerate(leaves):
            kind = slots.get(i, ("constant",))[0]
            if kind == "parameter":
                setattr(self, f"p{i}", nn.Parameter(v.detach().clone()))
            elif kind == "constant" and isinstance(v, torch.Tensor):
                # A plain attribute: a constant of the graph, whose values the rules can read.
                setattr(self, f"const_{i}", v.detach().clone())
            elif kind == "constant":
                self.fixed[i] = v
        self.n = len(leaves)

    def forward(self, *flat):
        vals, k = [], 0
        for i in range(self.n):
            kind = self.slots.get(i, ("constant",))
            if kind[0] == "input":
                shape = kind[1]
                numel = 1
                for d in shape:
                    numel *= d
                vals.append(flat[k].reshape(-1)[:numel].view(shape) if flat[k].dim() == 2 else flat[k].view(shape))
                k += 1
            elif kind[0] == "parameter":
                vals.append(getattr(self, f"p{i}"))
            else:
                vals.append(self.fixed[i] if i in self.fixed else getattr(self, f"const_{i}"))
        args, kwargs = tree_unflatten(vals, self.spec)
        out = tree_flatten(self.fn(*args, **kwargs))[0]
        return tuple(o for o in out if isinstance(o, torch.Tensor))


def models(case: Case, variants=("inputs", "parameters")) -> list:
    """The modules of `case` (see the module docstring); a variant that would be the same as
    another, or that labels more than MAX_LABELS elements, is left out."""
    leaves, spec = tree_flatten((case.args, case.kwargs))
    floats = [i for i, v in enumerate(leaves) if _float(v)]
    plans = {}
    if "inputs" in variants:
        plans["inputs"] = {i: "input" for i in floats}
    if "parameters" in variants and len(floats) > 1:
        plans["parameters"] = {i: ("input" if i == floats[0] else "parameter") for i in floats}
    out = []
    for variant, kinds in plans.items():
        slots = {i: (k, tuple(leaves[i].shape)) for i, k in kinds.items()}
        inputs, features = {}, {}
        for i, (k, shape) in slots.items():
            if k == "input":
                name, n = f"x{i}", leaves[i].numel()
                flat = leaves[i].detach().reshape(-1).clone()
                if n > MAX_LABELS:   # rows of MAX_LABELS labelled columns, the tail cut off inside
                    rows = -(-n // MAX_LABELS)
                    flat = torch.cat([flat, flat.new_zeros(rows * MAX_LABELS - n)]).view(rows, MAX_LABELS)
                inputs[name] = flat
                features[name] = Features([str(j) for j in range(min(n, MAX_LABELS))])
        out.append(Model(case, variant, OneOp(case, leaves, spec, slots), inputs, features))
    return out
