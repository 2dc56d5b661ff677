"""Builds the torch module an `ArchSpec` describes.

Every input becomes tokens of `spec.width` channels; the tokens of all inputs are concatenated
into the stream h (batch, tokens, channels) and the layers run on h in order. Layers keep the
(batch, tokens, channels) layout, so any layer can follow any other; the few that need another
layout (convolutions, norms over channels, token mixing) permute in and back out. Everything
is static in shapes and free of value-dependent control flow, so torch.export captures it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import Categories, Features
from .specs import ACTIVATIONS, ArchSpec, InputSpec, LayerSpec

__all__ = ["build", "Built", "make_inputs", "features_of"]

_ACTIVATION_MODULES = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU,
    "elu": nn.ELU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "softplus": nn.Softplus,
    "hardtanh": nn.Hardtanh,
}
assert set(_ACTIVATION_MODULES) == set(ACTIVATIONS)


# -- input encoders: input tensor -> (batch, tokens, width) -----------------------------------

class FeatureEncoder(nn.Module):
    def __init__(self, spec: InputSpec, width: int):
        super().__init__()
        self.unsqueeze = spec.entities == 0   # a single row is one token
        self.pad = width - spec.n if spec.raw else None
        self.linear = None if spec.raw else nn.Linear(spec.n, width)

    def forward(self, x):
        if self.unsqueeze:
            x = x.unsqueeze(1)
        return F.pad(x, (0, self.pad)) if self.linear is None else self.linear(x)


class CategoryEncoder(nn.Module):
    def __init__(self, spec: InputSpec, width: int):
        super().__init__()
        self.unsqueeze = spec.length == 0
        self.embedding = nn.Embedding(spec.n, width)

    def forward(self, x):
        return self.embedding(x.unsqueeze(1) if self.unsqueeze else x)


# -- layers on the stream (batch, tokens, channels) -------------------------------------------

class ChannelsFirst(nn.Module):
    """Runs a (batch, channels, length) module (Conv1d, BatchNorm1d, GroupNorm) on the stream."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        return self.inner(h.transpose(1, 2)).transpose(1, 2)


class Pool(nn.Module):
    """Max or mean over the token (entity) set, keeping a single token."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, h):
        return h.amax(1, keepdim=True) if self.mode == "max" else h.mean(1, keepdim=True)


class Split(nn.Module):
    """Splits the channels into groups, encodes each group with its own Linear, concatenates."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        self.sizes = list(sizes)
        self.chunks = len(set(sizes)) == 1   # equal groups: exercise torch.chunk too
        self.encoders = nn.ModuleList(nn.Linear(s, s) for s in sizes)

    def forward(self, h):
        parts = h.chunk(len(self.sizes), -1) if self.chunks else torch.split(h, self.sizes, -1)
        return torch.cat([enc(p) for enc, p in zip(self.encoders, parts)], -1)


class MixTokens(nn.Module):
    """A Linear across tokens (MLP-mixer style), through a permute and back."""

    def __init__(self, tokens: int):
        super().__init__()
        self.linear = nn.Linear(tokens, tokens)

    def forward(self, h):
        return self.linear(h.permute(0, 2, 1)).permute(0, 2, 1)


class Flatten(nn.Module):
    """Reshapes all tokens into one and projects it: (b, t, c) -> (b, 1, t*c) -> (b, 1, width)."""

    def __init__(self, tokens: int, channels: int, width: int):
        super().__init__()
        self.size = tokens * channels
        self.linear = nn.Linear(self.size, width)

    def forward(self, h):
        return self.linear(h.reshape(-1, 1, self.size))


class Conv2d(nn.Module):
    """Treats the stream as a one-channel (tokens x channels) image; the conv's output maps
    become extra channels: (b, t, c) -> (b, m, t, c) -> (b, t, m, c) -> (b, t, m*c)."""

    def __init__(self, maps: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(1, maps, kernel, padding=kernel // 2)

    def forward(self, h):
        return self.conv(h.unsqueeze(1)).permute(0, 2, 1, 3).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with its own projections and F.scaled_dot_product_attention."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, h):
        def split_heads(x):  # (b, t, c) -> (b, heads, t, c / heads)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        a = F.scaled_dot_product_attention(split_heads(self.q(h)), split_heads(self.k(h)),
                                           split_heads(self.v(h)))
        return self.out(a.transpose(1, 2).flatten(2))


class MHA(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, h):
        return self.attn(h, h, h, need_weights=False)[0]


class RNN(nn.Module):
    """nn.LSTM / nn.GRU over the tokens as a sequence; returns every step's output."""

    def __init__(self, cls, channels: int, width: int):
        super().__init__()
        self.rnn = cls(channels, width, batch_first=True)

    def forward(self, h):
        return self.rnn(h)[0]


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        return h + self.inner(h)


def _divides(d: int, n: int, what: str, layer: LayerSpec) -> None:
    if d < 1 or n % d:
        raise ValueError(f"{layer!r}: {what} {d} does not divide {n}")


def make_layer(layer: LayerSpec, c: int, t: int) -> tuple[nn.Module, int, int]:
    """The module for `layer` on a stream of c channels and t tokens, and its output (c, t)."""
    k, w = layer.kind, layer.width or c
    if k in _ACTIVATION_MODULES:
        m = _ACTIVATION_MODULES[k]()
    elif k == "linear":
        m = nn.Linear(c, w)
    elif k == "dropout":
        m = nn.Dropout(0.5)  # the model is in eval mode: identity, but the op is in the graph
    elif k == "layernorm":
        m = nn.LayerNorm(c)
    elif k == "softmax":
        m = nn.Softmax(-1)
    elif k == "log_softmax":
        m = nn.LogSoftmax(-1)
    elif k in ("meanpool", "maxpool"):
        m = Pool(k[:-4])
        if not layer.residual:  # (a residual h + pool(h) broadcasts back over the tokens)
            t = 1
    elif k == "batchnorm":
        m = ChannelsFirst(nn.BatchNorm1d(c))
    elif k == "groupnorm":
        _divides(layer.groups, c, "groups", layer)
        m = ChannelsFirst(nn.GroupNorm(layer.groups, c))
    elif k == "split":
        if sum(layer.sizes) != c or len(layer.sizes) < 2 or min(layer.sizes) < 1:
            raise ValueError(f"{layer!r}: sizes must be >= 2 positive sizes summing to {c}")
        m = Split(layer.sizes)
    elif k == "mix_tokens":
        m = MixTokens(t)
    elif k == "flatten":
        m, t = Flatten(t, c, w), 1
    elif k == "conv1d":
        _divides(layer.groups, c, "groups", layer)
        _divides(layer.groups, w, "groups", layer)
        m = ChannelsFirst(nn.Conv1d(c, w, layer.kernel, padding=layer.kernel // 2,
                                    groups=layer.groups))
    elif k == "conv2d":
        _divides(c, w, "input channels", layer)
        m = Conv2d(w // c, layer.kernel)
    elif k in ("sdpa", "mha"):
        _divides(layer.heads, c, "heads", layer)
        m = SelfAttention(c, layer.heads) if k == "sdpa" else MHA(c, layer.heads)
    elif k in ("gru", "lstm"):
        m = RNN(nn.GRU if k == "gru" else nn.LSTM, c, w)
    else:  # pragma: no cover - LayerSpec already rejects unknown kinds
        raise ValueError(f"unknown layer kind {k!r}")
    if k not in ("linear", "conv1d", "conv2d", "flatten", "gru", "lstm"):
        w = c  # width only means something to the layers above
    if layer.residual:
        if w != c or k == "flatten":
            raise ValueError(f"{layer!r}: a residual layer must keep the shape ({c} channels)")
        m = Residual(m)
    return m, w, t


class Architecture(nn.Module):
    """The model of an ArchSpec. `build` gives it a forward whose arguments are named after
    the inputs (fxsurgery matches feature descriptions to argument names)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        for i in spec.inputs:
            if i.raw and i.n > spec.width:
                raise ValueError(f"{i!r}: raw features need n <= width ({spec.width})")
        self.encoders = nn.ModuleList(
            (FeatureEncoder if i.kind == "features" else CategoryEncoder)(i, spec.width)
            for i in spec.inputs)
        c, t = spec.width, sum(i.tokens for i in spec.inputs)
        layers = []
        for layer in spec.layers:
            m, c, t = make_layer(layer, c, t)
            layers.append(m)
        self.layers = nn.Sequential(*layers)
        self.out_channels, self.out_tokens = c, t

    def run(self, *inputs):
        tokens = [enc(x) for enc, x in zip(self.encoders, inputs)]
        h = torch.cat(tokens, 1) if len(tokens) > 1 else tokens[0]  # no needless op in the graph
        h = self.layers(h)
        outs = tuple(h if o == "stream" else h.mean(1) if o == "mean" else h.flatten(1)
                     for o in self.spec.outputs)
        return outs[0] if len(outs) == 1 else outs

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def _named_forward(names: list[str]):
    # One generated method per signature, so torch.export names its placeholders after the
    # inputs; the body just forwards to Architecture.run.
    args = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {args}):\n    return self.run({args})\n", namespace)
    return namespace["forward"]


def _randomise_norms(model: nn.Module) -> None:
    # Default norm parameters (weight 1, bias 0, running mean 0, var 1) would make BatchNorm an
    # identity and hide parameters that a mapping ought to report; give them generic values.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def features_of(spec: ArchSpec) -> dict[str, Features | Categories]:
    """The description of each input: Features along the last axis, or Categories."""
    return {i.name: (Features if i.kind == "features" else Categories)(
                [f"{i.name}.{j}" for j in range(i.n)]) for i in spec.inputs}


def make_inputs(spec: ArchSpec, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Example inputs, in the order of spec.inputs, from a private generator (the global RNG
    is untouched): standard normal features, uniform valid category indices."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(i.shape(batch), generator=g) if i.kind == "features"
                 else torch.randint(0, i.n, i.shape(batch), generator=g)
                 for i in spec.inputs)


class Built(tuple):
    """(model, example_inputs, features), which also remembers its spec and seed so that a
    failing hypothesis example prints as the call that rebuilds it."""

    def __new__(cls, spec: ArchSpec, seed: int, model, example_inputs, features):
        self = super().__new__(cls, (model, example_inputs, features))
        self.spec, self.seed = spec, seed
        return self

    model = property(lambda self: self[0])
    example_inputs = property(lambda self: self[1])
    features = property(lambda self: self[2])

    def __repr__(self) -> str:
        return f"build({self.spec!r}, seed={self.seed})"


def build(spec: ArchSpec, seed: int = 0, batch: int = 2) -> Built:
    """Builds spec's model in eval mode with torch.manual_seed(seed) (inside a forked RNG, so
    the caller's random state is kept), plus example inputs and the feature descriptions.
    Raises ValueError for a spec whose layers do not fit the shapes they receive."""
    cls = type("Architecture", (Architecture,),
               {"forward": _named_forward([i.name for i in spec.inputs])})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(spec)
        _randomise_norms(model)
    model.eval()
    return Built(spec, seed, model, make_inputs(spec, seed, batch), features_of(spec))
