"""Frozen, readable descriptions of random architectures.

A spec is plain data so that hypothesis can shrink it and print it: `repr(spec)` leaves out
every field at its default, and `eval(repr(spec))` gives the spec back.

The model a spec describes: every input is encoded into tokens of `width` channels, the
tokens of all inputs are concatenated into one stream of shape (batch, tokens, channels), and
the layers are applied to that stream one after the other. See `architectures.build`.
"""
from __future__ import annotations

import keyword
from dataclasses import dataclass, fields

__all__ = ["InputSpec", "LayerSpec", "ArchSpec", "ACTIVATIONS", "LAYER_KINDS", "OUTPUT_KINDS"]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "silu", "elu", "leaky_relu", "softplus",
               "hardtanh")

# Simplest first: hypothesis shrinks a sampled_from towards its first element.
LAYER_KINDS = (
    "linear", *ACTIVATIONS, "dropout", "layernorm", "softmax", "log_softmax",
    "meanpool", "maxpool", "batchnorm", "groupnorm", "split", "mix_tokens", "flatten",
    "conv1d", "conv2d", "sdpa", "mha", "gru", "lstm",
)

# What forward returns from the final stream h (batch, tokens, channels): h itself, its mean
# over tokens (batch, channels), or h reshaped to (batch, tokens * channels).
OUTPUT_KINDS = ("stream", "mean", "flat")


def _short_repr(obj, positional: tuple[str, ...]) -> str:
    # Fields at their defaults are noise in a counterexample; leave them out.
    parts = [repr(getattr(obj, f)) for f in positional]
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name not in positional and value != f.default:
            parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class InputSpec:
    """One positional input of the model.

    kind="features": a float tensor (batch, n), or (batch, entities, n) when entities > 0,
    labelled `Features` along its last axis. Each entity (or the single row) is one token,
    encoded by a Linear(n, width), or, with raw=True, zero-padded to width (n <= width) so
    that stream channel i *is* feature i.
    kind="categories": a long tensor (batch,), or (batch, length) when length > 0, of values
    in range(n) (n >= 2), labelled `Categories`; each element is one token, an Embedding row.
    """

    name: str
    kind: str = "features"
    n: int = 3
    entities: int = 0
    length: int = 0
    raw: bool = False

    def __post_init__(self):
        if not (self.name.isidentifier() and not keyword.iskeyword(self.name)
                and self.name != "self"):
            raise ValueError(f"input name {self.name!r} must be a Python identifier: it becomes "
                             "an argument of forward")
        if self.kind == "features":
            if self.n < 1 or self.length:
                raise ValueError(f"{self!r}: features need n >= 1 and no length (use entities)")
        elif self.kind == "categories":
            if self.n < 2 or self.entities or self.raw:
                raise ValueError(f"{self!r}: categories need n >= 2 (one category is a constant), "
                                 "no entities (use length) and no raw")
        else:
            raise ValueError(f"input kind must be 'features' or 'categories', got {self.kind!r}")
        if self.entities < 0 or self.length < 0:
            raise ValueError(f"{self!r}: entities and length must be >= 0")

    @property
    def tokens(self) -> int:
        """How many tokens this input adds to the stream."""
        return max(self.entities, self.length, 1)

    def shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "features":
            return (batch, self.entities, self.n) if self.entities else (batch, self.n)
        return (batch, self.length) if self.length else (batch,)

    def __repr__(self) -> str:
        return _short_repr(self, ("name",))


@dataclass(frozen=True, repr=False)
class LayerSpec:
    """One layer applied to the stream h of shape (batch, tokens, channels).

    width: output channels of linear, conv1d, conv2d (a multiple of the input channels),
        flatten, gru and lstm; 0 keeps the channel count.
    groups: conv1d groups (groups == channels is depthwise), groupnorm groups.
    kernel: conv1d / conv2d kernel size, odd, with 'same' padding (tokens are kept).
    heads: attention heads of mha / sdpa.
    sizes: channel group sizes of split (equal sizes use torch.chunk, else torch.split).
    residual: h + layer(h); only for layers whose output broadcasts to h's shape.
    """

    kind: str
    width: int = 0
    groups: int = 1
    kernel: int = 1
    heads: int = 1
    sizes: tuple[int, ...] = ()
    residual: bool = False

    def __post_init__(self):
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; known: {', '.join(LAYER_KINDS)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"{self!r}: kernel must be odd ('same' padding)")

    def __repr__(self) -> str:
        return _short_repr(self, ("kind",))


@dataclass(frozen=True, repr=False)
class ArchSpec:
    """A whole model: inputs (forward's arguments, in order), the stream width every input is
    encoded to, the layers, and the outputs (one is returned bare, several as a tuple)."""

    inputs: tuple[InputSpec, ...]
    width: int = 4
    layers: tuple[LayerSpec, ...] = ()
    outputs: tuple[str, ...] = ("stream",)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("an architecture needs at least one input")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate input names in {names}")
        if not self.outputs or any(o not in OUTPUT_KINDS for o in self.outputs):
            raise ValueError(f"outputs must be a non-empty tuple of {OUTPUT_KINDS}, "
                             f"got {self.outputs!r}")

    @property
    def kinds(self) -> set[str]:
        return {layer.kind for layer in self.layers}

    def __repr__(self) -> str:
        return _short_repr(self, ())
