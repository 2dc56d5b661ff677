"""Hypothesis strategies for random architectures.

Every choice is drawn so that it shrinks towards a simpler model: fewer inputs and layers,
2-d inputs, narrow streams, the first (simplest) layer kinds, no residuals, one group or head.
Layers are drawn one after the other, each knowing the stream shape it will receive, so that
every generated spec builds.
"""
from __future__ import annotations

from typing import Iterable, Optional

from hypothesis import strategies as st

from .modules import Built, build, make_inputs
from .specs import LAYER_KINDS, OUTPUT_KINDS, ArchSpec, InputSpec, LayerSpec

__all__ = ["input_specs", "layer_specs", "architectures", "models", "inputs_for"]

MAX_TOKENS = 4  # entities per features input, length per categories input
# Streams keep >= 3 channels: softmax, LayerNorm or GroupNorm over one value are constants,
# and LayerNorm over two values is a sign function (zero gradient almost everywhere).
MIN_WIDTH = 3


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def input_specs(draw, max_inputs: int = 3, width: int = 8) -> tuple[InputSpec, ...]:
    """1..max_inputs inputs, named x0, x1... (features) and c0, c1... (categories); raw
    features (zero-padded into the stream) only when they fit in `width` channels."""
    specs, counts = [], {"features": 0, "categories": 0}
    for _ in range(draw(st.integers(1, max_inputs))):
        kind = draw(st.sampled_from(("features", "categories")))
        name = f"{'x' if kind == 'features' else 'c'}{counts[kind]}"
        counts[kind] += 1
        if kind == "features":
            n = draw(st.integers(1, 8))
            raw = n <= width and draw(st.booleans())
            specs.append(InputSpec(name, n=n, entities=draw(st.integers(0, MAX_TOKENS)), raw=raw))
        else:
            specs.append(InputSpec(name, kind, n=draw(st.integers(2, 8)),
                                   length=draw(st.integers(0, MAX_TOKENS))))
    return tuple(specs)


@st.composite
def layer_specs(draw, kind: str, channels: int, max_width: int = 8) -> LayerSpec:
    """One valid layer of `kind` for a stream of `channels` (>= MIN_WIDTH) channels (any
    kind fits any token count)."""
    c, kw = channels, {}
    if kind in ("linear", "flatten", "conv1d", "gru", "lstm"):
        kw["width"] = draw(st.integers(MIN_WIDTH, max_width))
    if kind == "conv1d":
        kw["kernel"] = draw(st.sampled_from((1, 3)))
        # groups dividing both sides; groups == channels (when width is a multiple) is depthwise
        kw["groups"] = draw(st.sampled_from([g for g in _divisors(c) if kw["width"] % g == 0]))
    elif kind == "conv2d":
        kw["width"] = c * draw(st.integers(1, max(1, max_width // c)))
        kw["kernel"] = draw(st.sampled_from((1, 3)))
    elif kind == "groupnorm":
        kw["groups"] = draw(st.sampled_from([g for g in _divisors(c) if c // g >= MIN_WIDTH]))
    elif kind in ("sdpa", "mha"):
        kw["heads"] = draw(st.sampled_from(_divisors(c)))
    elif kind == "split":
        # cut points in 1..c-1 give >= 2 positive group sizes summing to c
        cuts = sorted(draw(st.sets(st.integers(1, c - 1), min_size=1, max_size=min(3, c - 1))))
        kw["sizes"] = tuple(b - a for a, b in zip([0, *cuts], [*cuts, c]))
    keeps_shape = kind != "flatten" and kw.get("width", c) == c
    if keeps_shape and draw(st.booleans()):
        kw["residual"] = True
    # width == channels is the default (0) for readability
    if kw.get("width") == c:
        del kw["width"]
    return LayerSpec(kind, **kw)


def _after(layer: LayerSpec, channels: int, tokens: int) -> tuple[int, int]:
    """The stream shape after `layer` (mirrors architectures.make_layer)."""
    if layer.kind in ("meanpool", "maxpool") and not layer.residual or layer.kind == "flatten":
        tokens = 1
    return layer.width or channels, tokens


# log_softmax's output is <= 0, mostly <= -1, and stays so through pooling, residuals, small
# affine maps...: relu or hardtanh anywhere after it risk being the constants 0 or -1, which
# would cut the output off the inputs. So they are not drawn after a log_softmax.
_DEAD_AFTER_LOG_SOFTMAX = {"relu", "hardtanh"}


def architectures(max_layers: int = 4, max_width: int = 8,
                  ops: Optional[Iterable[str]] = None, min_layers: int = 0,
                  max_inputs: int = 3) -> st.SearchStrategy[ArchSpec]:
    """Random ArchSpecs: 1..max_inputs inputs, min_layers..max_layers layers of the kinds in
    `ops` (default: all of LAYER_KINDS), stream widths 3..max_width, one or two outputs."""
    ops = None if ops is None else set(ops)
    # keep LAYER_KINDS' simplest-first order whatever order ops came in
    kinds = LAYER_KINDS if ops is None else tuple(k for k in LAYER_KINDS if k in ops)
    if ops is not None and (ops - set(LAYER_KINDS) or not kinds):
        raise ValueError(f"ops must name layer kinds among {LAYER_KINDS}; "
                         f"unknown: {sorted(ops - set(LAYER_KINDS))}")
    if not 0 <= min_layers <= max_layers or max_inputs < 1:
        raise ValueError("need 0 <= min_layers <= max_layers and max_inputs >= 1")
    return _architectures(kinds, min_layers, max_layers, max(MIN_WIDTH, max_width), max_inputs)


@st.composite
def _architectures(draw, kinds, min_layers, max_layers, max_width, max_inputs) -> ArchSpec:
    width = draw(st.integers(MIN_WIDTH, max_width))
    inputs = draw(input_specs(max_inputs, width))
    c, t = width, sum(i.tokens for i in inputs)
    layers, after_log_softmax = [], False
    for _ in range(draw(st.integers(min_layers, max_layers))):
        allowed = tuple(k for k in kinds
                        if not (after_log_softmax and k in _DEAD_AFTER_LOG_SOFTMAX))
        layer = draw(layer_specs(draw(st.sampled_from(allowed)), c, max_width))
        c, t = _after(layer, c, t)
        layers.append(layer)
        after_log_softmax |= layer.kind == "log_softmax"
    outputs = tuple(draw(st.lists(st.sampled_from(OUTPUT_KINDS), min_size=1, max_size=2)))
    return ArchSpec(inputs=inputs, width=width, layers=tuple(layers), outputs=outputs)


def models(max_layers: int = 4, max_width: int = 8, ops: Optional[Iterable[str]] = None,
           seed: int = 0, **kwargs) -> st.SearchStrategy[Built]:
    """Built random architectures: (model in eval mode, example_inputs, features), which
    print as `build(ArchSpec(...), seed=...)`. Extra kwargs go to `architectures`."""
    return architectures(max_layers, max_width, ops, **kwargs).map(lambda s: build(s, seed))


def inputs_for(spec: ArchSpec, batch: int = 2) -> st.SearchStrategy[tuple]:
    """Further example inputs for spec's model, from a drawn seed (drawing tensors element by
    element would be slow and shrink to all-zero inputs that hide dependencies)."""
    return st.integers(0, 2**31 - 1).map(lambda seed: make_inputs(spec, seed, batch))
