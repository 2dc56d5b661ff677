"""Convolution and pooling rules: hand-worked answers, and a cross-check against autodiff.

The hand-worked tests label an input along its channel axis (`Features(..., dim=1)`) to see
which channels each weight element meets, or along the length of a conv1d input
(`Features(..., dim=2)`) to see exact windows. The numeric cross-check labels every element of
the input on its own and compares, element by element, the rules' output dependence with the
Jacobian's non-zero pattern, and each parameter's meetings with the non-zero pattern of the
mixed derivative d/dx [d<c, op(x, theta)>/dtheta], at random points.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import fxsurgery as fs
from fxsurgery.interaction_map import _placeholder_args
from fxsurgery.labels import EMPTY, Label, SetPool
from fxsurgery.propagate import LabelPropagator
from fxsurgery.rules import REGISTRY
from fxsurgery.rules._ops import ops
from fxsurgery.rules.windows import (adaptive_windows, conv_axis, conv_output_size, interpolation_windows,
                                     pool_output_size, pool_windows, same_padding, window_union)

aten = torch.ops.aten


def feat(group: str, name: str, index: int) -> Label:
    return Label("feature", group, name, index)


def unit(group: str, index: int) -> Label:
    return Label("unit", group, str(index), index)


def positions(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def names_of(labels) -> set[str]:
    return {l.name for l in labels}


def output_labels(traced, mode: str = "deps"):
    """The label sets of the (first) output, element by element, as a nested list of sets."""
    pool = SetPool()
    prop = LabelPropagator(traced, pool, mode)
    out = prop.run(*_placeholder_args(traced))
    out = out[0] if isinstance(out, (tuple, list)) else out
    dense = out.ids.expand(out.shape)
    return [{pool.labels[i] for i in pool.sets[int(s)]} for s in dense.reshape(-1)], out.shape


# the operators -----------------------------------------------------------------------------

CONV_OPS = ["conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding",
            "conv3d.padding", "conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input",
            "convolution.default", "_convolution.default", "_convolution.deprecated"]
POOL_OPS = ["max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "max_pool1d_with_indices.default",
            "max_pool2d_with_indices.default", "max_pool3d_with_indices.default", "avg_pool1d.default",
            "avg_pool2d.default", "avg_pool3d.default", "adaptive_avg_pool1d.default",
            "adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default", "_adaptive_avg_pool2d.default",
            "_adaptive_avg_pool3d.default", "adaptive_max_pool1d.default", "adaptive_max_pool2d.default",
            "adaptive_max_pool3d.default", "upsample_linear1d.default", "upsample_linear1d.vec",
            "upsample_bilinear2d.default", "upsample_bilinear2d.vec", "upsample_trilinear3d.vec",
            "upsample_bicubic2d.vec", "_upsample_bilinear2d_aa.vec"]


@pytest.mark.parametrize("name,family", [(n, "convolution") for n in CONV_OPS] + [(n, "pooling") for n in POOL_OPS])
def test_registered(name, family):
    (op,) = ops(name)
    assert op in REGISTRY and REGISTRY.get(op).family == family


# windows -----------------------------------------------------------------------------------

def test_output_sizes_match_torch():
    for n in (1, 2, 3, 5, 8):
        for k in (1, 2, 3):
            for s in (1, 2, 3):
                for p in range(0, k // 2 + 1):
                    for d in (1, 2):
                        for ceil in (False, True):
                            try:
                                want = F.max_pool1d(torch.zeros(1, 1, n), k, s, p, d, ceil_mode=ceil).shape[-1]
                            except RuntimeError:
                                continue
                            assert pool_output_size(n, k, s, p, d, ceil) == want, (n, k, s, p, d, ceil)
                        try:
                            want = F.conv1d(torch.zeros(1, 1, n), torch.zeros(1, 1, k), stride=s, padding=p,
                                            dilation=d).shape[-1]
                        except RuntimeError:
                            continue
                        assert conv_output_size(n, k, s, p, d) == want
                        for op in range(max(s, d)):
                            try:
                                want = F.conv_transpose1d(torch.zeros(1, 1, n), torch.zeros(1, 1, k), stride=s,
                                                          padding=p, output_padding=op, dilation=d).shape[-1]
                            except RuntimeError:
                                continue
                            assert conv_output_size(n, k, s, p, d, transposed=True, output_padding=op) == want


def test_conv_axis_by_hand():
    # length 8, kernel 3, stride 2, padding 1, dilation 2: output o reads 2o - 1 + 2k
    ax = conv_axis(8, 3, 3, 2, 1, 2)
    assert ax.out_inputs == ((1, 3), (1, 3, 5), (3, 5, 7))
    assert ax.out_taps == ((1, 2), (0, 1, 2), (0, 1, 2))
    assert ax.tap_inputs == ((1, 3), (1, 3, 5), (3, 5, 7))
    assert ax.input_taps == ((), (0, 1), (), (0, 1, 2), (), (1, 2), (), (2,))
    # transposed, stride 3 > kernel 2: outputs 2, 5, 8 receive nothing
    ax = conv_axis(3, 9, 2, 3, 0, 1, transposed=True)
    assert ax.out_inputs == ((0,), (0,), (), (1,), (1,), (), (2,), (2,), ())
    assert same_padding(4, 1) == (1, 2) and same_padding(3, 2) == (2, 2)
    assert pool_windows(8, 3, 2, 1, ceil_mode=True) == ((0, 1), (1, 2, 3), (3, 4, 5), (5, 6, 7), (7,))
    assert adaptive_windows(8, 3) == ((0, 1, 2), (2, 3, 4, 5), (5, 6, 7))
    assert adaptive_windows(3, 5) == ((0,), (0, 1), (1,), (1, 2), (2,))


class _Ctx:
    pool = SetPool()


def test_window_union_fast_path_and_empty_windows():
    ctx = _Ctx()
    a = ctx.pool.singleton(feat("x", "a", 0))
    b = ctx.pool.singleton(feat("x", "b", 1))
    same = torch.full((1, 4, 1), a)
    assert window_union(ctx, same, 2, ((0, 1), (1, 2), (2,))) is same        # stays size 1
    out = window_union(ctx, same, 2, ((0,), (), (1,)))
    assert out.shape == (1, 4, 3) and out[0, 0].tolist() == [a, EMPTY, a]
    varying = torch.tensor([a, b, EMPTY]).reshape(1, 1, 3)
    out = window_union(ctx, varying, 2, ((0, 1), (2,), (), (1, 2)))
    ab = ctx.pool.union(a, b)
    assert out.reshape(-1).tolist() == [ab, EMPTY, EMPTY, b]


# a CNN with channel features ---------------------------------------------------------------

class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, img):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(img)))), 1))


@pytest.fixture(scope="module")
def cnn_map():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.UnknownOperatorWarning)
        traced = fs.trace(CNN().eval(), (torch.randn(2, 3, 8, 8),), {"img": fs.Features(["r", "g", "b"], dim=1)})
        return fs.interaction_map(traced)


def test_cnn_deps(cnn_map):
    im = cnn_map
    rgb = {"r", "g", "b"}
    for c, name in enumerate(["r", "g", "b"]):
        mask = im.params_for(name)["conv.weight"]
        want = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
        want[:, c] = True
        assert torch.equal(mask, want)
        for o in range(4):
            assert im.element_labels("conv.weight", (o, c, 1, 2)) == {feat("img", name, c)}
    assert im.labels_of("conv.bias") == set()
    for p in ("bn.weight", "bn.running_var", "fc.weight"):
        assert names_of(im.labels_of(p)) == rgb, p
    for p in ("bn.bias", "bn.running_mean", "fc.bias"):
        assert im.labels_of(p) == set(), p
    assert not any("fallback" in n for n in im.notes)


def test_cnn_keys(cnn_map):
    im = cnn_map
    for o in range(4):
        for c, name in enumerate(["r", "g", "b"]):
            assert im.key_of("conv.weight", (o, c, 0, 2)) == ({feat("img", name, c)}, {unit("conv", o)})
        assert im.key_of("conv.bias", (o,)) == (set(), {unit("conv", o)})
        assert im.key_of("bn.weight", (o,)) == ({unit("conv", o)}, {unit("conv", o)})
        assert im.key_of("bn.bias", (o,)) == (set(), {unit("conv", o)})
        assert im.key_of("bn.running_mean", (o,)) == (set(), {unit("conv", o)})
        assert im.key_of("bn.running_var", (o,)) == ({unit("conv", o)}, {unit("conv", o)})
    # flatten after a 2x2 pool of 8x8: flat position i belongs to channel i // 16
    for j in range(2):
        for i in (0, 15, 16, 40, 63):
            assert im.key_of("fc.weight", (j, i)) == ({unit("conv", i // 16)}, {unit("fc", j)})


# grouped and depthwise convolutions ----------------------------------------------------------

def _trace_channels(module, shape, names, dim=1):
    """Traces `module` on one input labelled along `dim`, whatever its forward calls the input."""
    arg = next(iter(inspect.signature(module.forward).parameters))
    return fs.trace(module, (torch.randn(*shape),), {arg: fs.Features(names, dim=dim)})


def test_grouped_conv():
    conv = nn.Conv2d(4, 6, 3, groups=2)                       # weight (6, 2, 3, 3)
    traced = _trace_channels(conv, (1, 4, 5, 5), ["a", "b", "c", "d"])
    im = fs.interaction_map(traced)
    names, x = ["a", "b", "c", "d"], traced.input_names[0]
    for o in range(6):
        for ci in range(2):
            c = (o // 3) * 2 + ci                                 # rows 0-2: channels a, b; rows 3-5: c, d
            assert im.element_labels("weight", (o, ci, 1, 1)) == {feat(x, names[c], c)}
            assert im.key_of("weight", (o, ci, 0, 0)) == ({feat(x, names[c], c)}, {unit("weight", o)})
    labels, shape = output_labels(traced)
    per_channel = [labels[o * 9] for o in range(6)]             # output (1, 6, 3, 3)
    assert [names_of(s) for s in per_channel] == [{"a", "b"}] * 3 + [{"c", "d"}] * 3


def test_depthwise_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv1d(3, 6, 3, groups=3, padding=1)  # channel multiplier 2
            self.pw = nn.Conv1d(6, 2, 1)

        def forward(self, x):
            return self.pw(self.dw(x))

    traced = _trace_channels(Net(), (2, 3, 7), ["a", "b", "c"])
    im = fs.interaction_map(traced)
    x = traced.input_names[0]
    for o in range(6):
        assert names_of(im.element_labels("dw.weight", (o, 0, 2))) == {"abc"[o // 2]}
        assert im.key_of("dw.weight", (o, 0, 1)) == ({feat(x, "abc"[o // 2], o // 2)}, {unit("dw", o)})
        # the pointwise conv meets what depthwise channel o depends on, and in keys its unit
        for j in range(2):
            assert names_of(im.element_labels("pw.weight", (j, o, 0))) == {"abc"[o // 2]}
            assert im.key_of("pw.weight", (j, o, 0)) == ({unit("dw", o)}, {unit("pw", j)})
            assert im.key_of("pw.bias", (j,)) == (set(), {unit("pw", j)})


# spatially varying labels: exact windows ------------------------------------------------------

class Head(nn.Module):
    """`body` on a (1, C, L) input, then a Linear over the length, so that fc.weight[0, j]
    meets exactly what output position j depends on."""

    def __init__(self, body, n_out):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(n_out, 1)

    def forward(self, x):
        return self.fc(self.body(x))


def _windows_met(body, channels, length, n_out):
    traced = fs.trace(Head(body, n_out), (torch.randn(1, channels, length),),
                      {"x": fs.Features(positions(length), dim=2)})
    im = fs.interaction_map(traced)
    return im, [names_of(im.element_labels("fc.weight", (0, j))) for j in range(n_out)]


def test_conv1d_exact_windows():
    conv = nn.Conv1d(2, 1, 3, stride=2, padding=1, dilation=2)
    # output o reads 2o - 1 + 2k, k = 0..2, inside [0, 8)
    im, met = _windows_met(conv, 2, 8, 3)
    assert met == [{"p1", "p3"}, {"p1", "p3", "p5"}, {"p3", "p5", "p7"}]
    # tap k touches 2o - 1 + 2k over all outputs o
    for c in range(2):
        assert names_of(im.element_labels("body.weight", (0, c, 0))) == {"p1", "p3"}
        assert names_of(im.element_labels("body.weight", (0, c, 1))) == {"p1", "p3", "p5"}
        assert names_of(im.element_labels("body.weight", (0, c, 2))) == {"p3", "p5", "p7"}
    assert im.labels_of("body.bias") == set()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv1d_same_padding_even_kernel():
    conv = nn.Conv1d(1, 1, 4, padding="same")                  # left 1, right 2
    im, met = _windows_met(conv, 1, 6, 6)
    assert met == [{"p0", "p1", "p2"}, {"p0", "p1", "p2", "p3"}, {"p1", "p2", "p3", "p4"},
                   {"p2", "p3", "p4", "p5"}, {"p3", "p4", "p5"}, {"p4", "p5"}]
    assert names_of(im.element_labels("body.weight", (0, 0, 0))) == {"p0", "p1", "p2", "p3", "p4"}
    assert names_of(im.element_labels("body.weight", (0, 0, 3))) == {"p2", "p3", "p4", "p5"}


def test_max_pool1d_exact_windows():
    pool = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
    _, met = _windows_met(pool, 1, 8, 5)
    assert met == [{"p0", "p1"}, {"p1", "p2", "p3"}, {"p3", "p4", "p5"}, {"p5", "p6", "p7"}, {"p7"}]
    pool = nn.MaxPool1d(2, stride=3, dilation=2)               # output o reads 3o and 3o + 2
    _, met = _windows_met(pool, 1, 8, 2)
    assert met == [{"p0", "p2"}, {"p3", "p5"}]


def test_max_pool_with_indices():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            values, indices = F.max_pool1d(x, 2, return_indices=True)
            return self.fc(values), indices

    traced = fs.trace(Net(), (torch.randn(1, 1, 6),), {"x": fs.Features(positions(6), dim=2)})
    im = fs.interaction_map(traced)
    pool = SetPool()
    _, indices = LabelPropagator(traced, pool, "deps").run(*_placeholder_args(traced))
    assert indices.is_free                                     # indices carry no dependence
    assert [names_of(im.element_labels("fc.weight", (0, j))) for j in range(3)] == \
        [{"p0", "p1"}, {"p2", "p3"}, {"p4", "p5"}]
    assert im.labels_of("fc.bias") == set()


def test_avg_pool1d_exact_windows():
    pool = nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    _, met = _windows_met(pool, 1, 6, 4)                       # starts -1, 1, 3, 5; padding carries nothing
    assert met == [{"p0", "p1"}, {"p1", "p2", "p3"}, {"p3", "p4", "p5"}, {"p5"}]


def test_adaptive_avg_pool():
    _, met = _windows_met(nn.AdaptiveAvgPool1d(3), 1, 8, 3)
    assert met == [{"p0", "p1", "p2"}, {"p2", "p3", "p4", "p5"}, {"p5", "p6", "p7"}]
    _, met = _windows_met(nn.AdaptiveMaxPool1d(5), 2, 3, 5)
    assert met == [{"p0"}, {"p0", "p1"}, {"p1"}, {"p1", "p2"}, {"p2"}]


def test_adaptive_avg_pool2d_global():
    traced = _trace_channels(nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Linear(3, 2)), (1, 2, 6, 6), ["a", "b"])
    im = fs.interaction_map(traced)
    assert names_of(im.labels_of("3.weight")) == {"a", "b"}
    assert im.key_of("3.weight", (1, 2)) == ({unit("0", 2)}, {unit("3", 1)})


def test_upsample_linear_exact():
    # align_corners=True, 4 -> 7: output o samples o / 2; even outputs fall on an input
    up = nn.Upsample(size=7, mode="linear", align_corners=True)
    _, met = _windows_met(up, 1, 4, 7)
    assert met == [{"p0"}, {"p0", "p1"}, {"p1"}, {"p1", "p2"}, {"p2"}, {"p2", "p3"}, {"p3"}]
    # align_corners=False, x2: the first and last outputs are clamped to one input
    up = nn.Upsample(scale_factor=2, mode="linear")
    _, met = _windows_met(up, 1, 3, 6)
    assert met == [{"p0"}, {"p0", "p1"}, {"p0", "p1"}, {"p1", "p2"}, {"p1", "p2"}, {"p2"}]


def test_conv_transpose1d_exact():
    deconv = nn.ConvTranspose1d(1, 1, 2, stride=3, output_padding=1)   # length 3 -> 9
    im, met = _windows_met(deconv, 1, 3, 9)
    # input i feeds outputs 3i and 3i + 1; outputs 2, 5, 8 hold only the bias
    assert met == [{"p0"}, {"p0"}, set(), {"p1"}, {"p1"}, set(), {"p2"}, {"p2"}, set()]
    for k in range(2):
        assert names_of(im.element_labels("body.weight", (0, 0, k))) == {"p0", "p1", "p2"}


def test_conv_transpose_keys_and_groups():
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)   # weight (4, 3, 3, 3)
    traced = _trace_channels(deconv, (1, 4, 3, 3), ["a", "b", "c", "d"])
    im = fs.interaction_map(traced)
    x = traced.input_names[0]
    for c in range(4):
        for j in range(3):
            o = (c // 2) * 3 + j
            assert im.element_labels("weight", (c, j, 1, 1)) == {feat(x, "abcd"[c], c)}
            assert im.key_of("weight", (c, j, 0, 0)) == ({feat(x, "abcd"[c], c)}, {unit("weight:1", o)})
    for o in range(6):
        assert im.key_of("bias", (o,)) == (set(), {unit("weight:1", o)})
    labels, _ = output_labels(traced)                          # output (1, 6, 7, 7)
    assert [names_of(labels[o * 49]) for o in range(6)] == [{"a", "b"}] * 3 + [{"c", "d"}] * 3


def test_unbatched_conv_and_pool():
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.MaxPool1d(2))
    traced = _trace_channels(net, (2, 6), ["a", "b"], dim=0)
    im = fs.interaction_map(traced)
    assert names_of(im.element_labels("0.weight", (2, 1, 0))) == {"b"}
    assert im.key_of("0.weight", (2, 0, 1)) == ({feat(traced.input_names[0], "a", 0)}, {unit("0", 2)})


# the numeric cross-check against autodiff -----------------------------------------------------

class _Op(nn.Module):
    """fn(*data, *params); every data input arrives flat, so each element gets its own label."""

    def __init__(self, fn, data_shapes, params):
        super().__init__()
        self.fn, self.data_shapes, self.names = fn, data_shapes, list(params)
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v.clone()))

    def forward(self, *flat):
        data = [f.reshape(s) for f, s in zip(flat, self.data_shapes)]
        return self.fn(*data, *[getattr(self, n) for n in self.names])


def _boolean(fn, data_shapes, params):
    flat = [torch.randn(1, torch.Size(s).numel()) for s in data_shapes]
    names = [f"d{i}" for i in range(len(flat))]
    traced = fs.trace(_Op(fn, data_shapes, params), dict(zip(names, flat)),
                      {n: fs.Features([str(j) for j in range(f.shape[1])]) for n, f in zip(names, flat)})
    pool = SetPool()
    prop = LabelPropagator(traced, pool, "deps")
    out = prop.run(*_placeholder_args(traced))
    out = out[0] if isinstance(out, (tuple, list)) else out
    offsets = dict(zip(names, torch.tensor([0] + [f.shape[1] for f in flat]).cumsum(0).tolist()))
    n_labels = sum(f.shape[1] for f in flat)

    def as_bool(ids, shape):
        dense = ids.expand(shape).reshape(-1)
        res = torch.zeros(dense.numel(), n_labels, dtype=torch.bool)
        for k, sid in enumerate(dense.tolist()):
            for lid in pool.sets[sid]:
                lab = pool.labels[lid]
                res[k, offsets[lab.group] + lab.index] = True
        return res

    meets = {}
    for name, shape in traced.state_shapes().items():
        terms = prop.meets.get(name)
        meets[name] = as_bool(terms.dense(pool), shape) if terms else \
            torch.zeros(torch.Size(shape).numel(), n_labels, dtype=torch.bool)
    return as_bool(out.ids, out.shape), meets


def _autodiff(fn, data_shapes, params, trials, dtype=torch.float32):
    """Non-zero patterns of the Jacobian and of each parameter's mixed derivative, united over
    `trials` random points (inputs, parameters and cotangent), vectorised with vmap."""
    torch.manual_seed(0)
    sizes = [torch.Size(s).numel() for s in data_shapes]
    flat = torch.randn(trials, sum(sizes), dtype=dtype)
    ps = {k: torch.randn((trials,) + tuple(v.shape), dtype=dtype) for k, v in params.items()}

    def f(flat, ps):
        parts = torch.split(flat, sizes)
        return fn(*[p.reshape(s) for p, s in zip(parts, data_shapes)], *[ps[k] for k in params])

    def pattern(j):
        return (j != 0).reshape(trials, -1, flat.shape[1]).any(0)

    out_pattern = pattern(vmap(jacrev(f))(flat, ps))
    c = torch.randn((trials,) + tuple(f(flat[0], {k: v[0] for k, v in ps.items()}).shape), dtype=dtype)
    meets = {}
    for k in params:
        def g(flat, ps, c, k=k):
            return grad(lambda pk: (c * f(flat, {**ps, k: pk})).sum())(ps[k])
        meets[k] = pattern(vmap(jacrev(g))(flat, ps, c))
    return out_pattern, meets


def _cross_check(fn, data_shapes, params, trials=2, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bool_out, bool_meets = _boolean(fn, data_shapes, params)
        grad_out, grad_meets = _autodiff(fn, data_shapes, params, trials, dtype)
    assert torch.equal(bool_out, grad_out), "output dependence differs from the Jacobian's pattern"
    for k in params:
        assert torch.equal(bool_meets[k], grad_meets[k]), f"meetings of {k} differ from the mixed derivative"


CONV_CASES = [
    # (conv, input shape, weight shape, keyword arguments)
    (F.conv1d, (2, 2, 7), (4, 2, 3), dict(stride=2, padding=1)),
    (F.conv1d, (1, 4, 9), (4, 2, 2), dict(stride=3, padding=2, dilation=2, groups=2)),
    (F.conv1d, (1, 3, 6), (6, 1, 3), dict(padding="same", dilation=2, groups=3)),
    (F.conv1d, (1, 2, 6), (2, 2, 4), dict(padding="same")),
    (F.conv2d, (1, 4, 5, 6), (4, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    (F.conv2d, (1, 2, 5, 5), (3, 2, 2, 3), dict(padding="valid")),
    (F.conv_transpose1d, (1, 4, 4), (4, 1, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    (F.conv_transpose1d, (2, 2, 3), (2, 2, 2), dict(stride=3, dilation=2, output_padding=2)),
    (F.conv_transpose2d, (1, 2, 3, 3), (2, 3, 2, 3), dict(stride=(2, 1), padding=(0, 1))),
    (F.conv3d, (1, 2, 3, 4, 3), (2, 1, 2, 2, 2), dict(stride=(1, 2, 1), padding=1, groups=2)),
    # the generic overloads, as a decomposition or a hand-written graph may call them
    (lambda x, w, b: aten.convolution.default(x, w, b, [2], [1], [1], True, [1], 2), (1, 4, 4), (4, 1, 3), {}),
    (lambda x, w, b: aten._convolution.default(x, w, b, [1, 2], [0, 1], [2, 1], False, [0, 0], 1,
                                               False, False, False, False), (1, 2, 5, 5), (3, 2, 2, 2), {}),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_matches_autodiff(case):
    conv, xs, ws, kw = CONV_CASES[case]
    c_out = conv(torch.zeros(xs), torch.zeros(ws), None, **kw).shape[1]

    def fn(x, w, b):
        return conv(x, w, b, **kw)

    weight, bias = torch.randn(ws), torch.randn(c_out)
    _cross_check(fn, [xs], {"w": weight, "b": bias})                          # parameter weight
    _cross_check(fn, [xs, ws], {"b": bias})                                    # data weight
    _cross_check(lambda w, x, b: fn(x, w, b), [ws], {"x": torch.randn(xs), "b": bias})  # parameter input


POOL_CASES = [
    (lambda x: F.max_pool1d(x, 3, 2, 1, 2, ceil_mode=True), (1, 2, 8), 40),
    (lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1)), (1, 1, 4, 5), 60),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), (1, 2, 5, 6), 1),
    (lambda x: F.avg_pool1d(x, 2, 3, 1, ceil_mode=True), (1, 1, 8), 1),
    (lambda x: F.adaptive_avg_pool2d(x, (3, 4)), (1, 1, 5, 7), 1),
    (lambda x: F.adaptive_avg_pool3d(x, (2, 1, 3)), (1, 1, 3, 2, 5), 1),
    (lambda x: F.adaptive_max_pool1d(x, 4), (1, 2, 6), 40),
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), (1, 1, 3, 4), 1),
    (lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True), (1, 1, 3, 4), 1),
    # in float64: the float32 kernel computes one weight that is 0 in exact arithmetic as
    # 1.49e-8 (a floating-point zero, see test_interpolation_float32_rounding_residue)
    (lambda x: F.interpolate(x, scale_factor=3, mode="linear"), (1, 2, 3), 1, torch.float64),
    (lambda x: F.interpolate(x, size=(4, 3), mode="bicubic"), (1, 1, 5, 5), 1),
    (lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), (1, 1, 6, 5), 1),
    (lambda x: F.interpolate(x, size=(2, 3, 5), mode="trilinear"), (1, 1, 3, 2, 3), 1),
]


@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_pooling_matches_autodiff(case):
    # Max pooling picks one element per window at each point: the pattern is the union over
    # enough random points (a window of w elements is missed with probability (1 - 1/w)^trials).
    fn, shape, trials, *dtype = POOL_CASES[case]
    _cross_check(fn, [shape], {}, trials, *dtype)


def _interp_eye(op, n_in, n_out, dtype):
    """The weights [n_out, n_in] of a 2-d interpolation operator along its first spatial axis."""
    eye = torch.eye(n_in, dtype=dtype).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2).contiguous()
    return op(eye, [n_out, 2], False, None, None)[:, 0, :, 0].t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interpolation_windows_ignore_rounding_residue(dtype):
    # Antialiased 5 -> 3 puts a filter tap exactly on the edge of its support (bilinear) or on
    # a zero of the cubic filter (bicubic): the weight is 0 in exact arithmetic, but the kernels
    # compute it as 7.1e-17 (float64) or 1.8e-14 and 3.8e-8 (float32). The windows are those
    # of exact arithmetic (proofs/prove_conv_pool.py), whatever the model's dtype.
    bic = aten._upsample_bicubic2d_aa.default
    w = _interp_eye(bic, 5, 3, dtype).abs()
    assert 0 < w[0, 2] < 1e-6 * w[0].max() and 0 < w[2, 2] < 1e-6 * w[2].max()
    for name, want in (("_upsample_bilinear2d_aa", ((0, 1), (1, 2, 3), (3, 4))),
                       ("_upsample_bicubic2d_aa", ((0, 1, 3), (0, 1, 2, 3, 4), (1, 3, 4)))):
        op = getattr(aten, name).default

        def run(x, size, scales, op=op):
            return op(x, size, False, *scales)
        assert interpolation_windows(run, 2, 0, 5, 3, None) == want
    traced = fs.trace(_Op(lambda x: F.interpolate(x, size=(3, 2), mode="bicubic", antialias=True),
                          [(1, 1, 5, 2)], {}).to(dtype),
                      {"d0": torch.randn(1, 10, dtype=dtype)}, {"d0": fs.Features([str(j) for j in range(10)])})
    labels, shape = output_labels(traced)
    rows = [sorted({int(l.name) // 2 for l in labels[k]}) for k in range(0, 6, 2)]  # input rows, column 0
    assert rows == [[0, 1, 3], [0, 1, 2, 3, 4], [1, 3, 4]]


def test_interpolation_float32_rounding_residue():
    # A named divergence of the gradient map (proofs/README.md, "floating-point zeros"):
    # linear 3 -> 9 maps output 1 to source position exactly 0 (weight 1 on input 0, 0 on
    # input 1); float32 computes the weight of input 1 as 1.49e-8, float64 as 0. The rule
    # keeps the exact windows, so a float32 Jacobian has exactly that one extra entry per
    # channel, and a float64 one none (test_pooling_matches_autodiff).
    fn, shape = (lambda x: F.interpolate(x, scale_factor=3, mode="linear")), (1, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bool_out, _ = _boolean(fn, [shape], {})
        grad_out, _ = _autodiff(fn, [shape], {}, 1)
    extra = grad_out & ~bool_out
    assert not (bool_out & ~grad_out).any()
    # output element (channel c, position 1) is row 9c + 1; input (c, 1) is column 3c + 1
    assert torch.nonzero(extra).tolist() == [[1, 1], [10, 4]]
