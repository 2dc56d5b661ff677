"""Recurrent layers and attention: answers worked out by hand, then the boolean mapping of the
fused `aten.lstm` / `aten.gru` and of `aten.scaled_dot_product_attention` cross-checked
against autodiff at random points (output dependence: the Jacobian's non-zero pattern;
parameter meets: the mixed derivative d/dz d<c, op(theta, z)>/dtheta)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev
from torch.utils._pytree import tree_flatten

import fxsurgery as fs
from fxsurgery.propagate import META_KEY
from fxsurgery.rules import REGISTRY

from helpers import Block, Causal, Recurrent, WithState, element, key, names

# The tensors here are tiny: intra-op threads only add contention (3x slower on 2 cores).
pytestmark = [pytest.mark.filterwarnings("ignore:.*_flat_weights.*"), pytest.mark.usefixtures("one_thread")]

FEATS = ["a", "b", "c"]
ALL = {f"x:{f}" for f in FEATS}


def _map(model, inputs, features):
    """Traces and maps, failing on any fallback (every operator must have a rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.UnknownOperatorWarning)
        traced = fs.trace(model.eval(), inputs, features)
        return traced, fs.interaction_map(traced)


def _times(prefix: str, ts) -> set[str]:
    return {f"x:{prefix}{t}" for t in ts}


# LSTM ----------------------------------------------------------------------------------
def test_two_layer_lstm_batch_first():
    H = 4
    model = Recurrent(nn.LSTM(3, H, num_layers=2, batch_first=True), H)
    _, im = _map(model, (torch.randn(2, 5, 3),), {"x": fs.Features(FEATS)})
    for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
              "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"):
        # every weight and bias enters every step non-linearly: it meets every feature
        assert names(im.labels_of(f"core.{p}")) == ALL, p
        assert bool(im.params_for("b")[f"core.{p}"].all()), p
    assert names(im.labels_of("head.weight")) == ALL
    # keys: rows are gate blocks (i, f, g, o) over the same units
    for g in range(4):
        for j in range(H):
            row = g * H + j
            aligned0 = {f"core.l0[{j}]", f"core.l0.gate[{g}]"}
            aligned1 = {f"core.l1[{j}]", f"core.l1.gate[{g}]"}
            assert key(im, "core.weight_ih_l0", (row, 1)) == ({"x:b"}, aligned0)
            assert key(im, "core.weight_hh_l0", (row, 3)) == ({"core.l0[3]"}, aligned0)
            assert key(im, "core.bias_ih_l0", (row,)) == (set(), aligned0)
            assert key(im, "core.bias_hh_l0", (row,)) == (set(), aligned0)
            assert key(im, "core.weight_ih_l1", (row, 2)) == ({"core.l0[2]"}, aligned1)
            assert key(im, "core.weight_hh_l1", (row, 0)) == ({"core.l1[0]"}, aligned1)
    # the output carries the units of the last layer
    assert key(im, "head.weight", (1, 3)) == ({"core.l1[3]"}, {"head[1]"})


class TimeScaled(nn.Module):
    """A recurrent core whose output is scaled per time step by a parameter, so that the
    parameter's element t meets what output step t depends on."""

    def __init__(self, core, steps, width):
        super().__init__()
        self.core = core
        self.scale = nn.Parameter(torch.randn(steps, width))

    def forward(self, x):
        out = self.core(x)[0]
        return out * self.scale


def test_lstm_time_prefix_and_bidirectional_halves():
    T, H = 4, 3
    feats = {"x": fs.Features([f"t{t}" for t in range(T)], dim=1)}
    _, im = _map(TimeScaled(nn.LSTM(2, H, batch_first=True), T, H), (torch.randn(2, T, 2),), feats)
    for t in range(T):
        for j in range(H):
            assert element(im, "scale", (t, j)) == _times("t", range(t + 1))
    # the weights meet every step
    assert names(im.labels_of("core.weight_ih_l0")) == _times("t", range(T))

    model = TimeScaled(nn.LSTM(2, H, batch_first=True, bidirectional=True), T, 2 * H)
    _, im = _map(model, (torch.randn(2, T, 2),), feats)
    for t in range(T):
        for j in range(H):
            assert element(im, "scale", (t, j)) == _times("t", range(t + 1))          # forward
            assert element(im, "scale", (t, H + j)) == _times("t", range(t, T))       # reverse
    for k in range(2 * H):  # keys: the output concatenates the two directions' units
        unit = f"core.l0[{k}]" if k < H else f"core.l0_reverse[{k - H}]"
        assert key(im, "scale", (0, k))[1] == {unit}


def test_bidirectional_two_layer_keys():
    H = 3
    model = Recurrent(nn.LSTM(3, H, num_layers=2, bidirectional=True), 2 * H)
    _, im = _map(model, (torch.randn(5, 2, 3),), {"x": fs.Features(FEATS)})
    for p in ("weight_ih_l1", "weight_ih_l1_reverse", "weight_hh_l0_reverse", "bias_hh_l1_reverse"):
        assert names(im.labels_of(f"core.{p}")) == ALL
    g, j = 2, 1
    row = g * H + j
    # the second layer reads both directions of the first, concatenated
    assert key(im, "core.weight_ih_l1", (row, 1)) == ({"core.l0[1]"}, {"core.l1[1]", "core.l1.gate[2]"})
    assert key(im, "core.weight_ih_l1", (row, H + 1)) == \
        ({"core.l0_reverse[1]"}, {"core.l1[1]", "core.l1.gate[2]"})
    assert key(im, "core.weight_hh_l0_reverse", (row, 2)) == \
        ({"core.l0_reverse[2]"}, {"core.l0_reverse[1]", "core.l0_reverse.gate[2]"})
    assert key(im, "head.weight", (0, H + 2)) == ({"core.l1_reverse[2]"}, {"head[0]"})


def test_lstm_projection_keys():
    model = Recurrent(nn.LSTM(3, 4, num_layers=2, proj_size=2), 2)
    _, im = _map(model, (torch.randn(5, 2, 3),), {"x": fs.Features(FEATS)})
    assert key(im, "core.weight_hr_l0", (1, 3)) == ({"core.l0[3]"}, {"core.l0.proj[1]"})
    assert key(im, "core.weight_hh_l0", (4 + 2, 1)) == ({"core.l0.proj[1]"}, {"core.l0[2]", "core.l0.gate[1]"})
    assert key(im, "core.weight_ih_l1", (3, 0)) == ({"core.l0.proj[0]"}, {"core.l1[3]", "core.l1.gate[0]"})
    assert key(im, "head.weight", (1, 1)) == ({"core.l1.proj[1]"}, {"head[1]"})
    assert names(im.labels_of("core.weight_hr_l1")) == ALL


def test_gru_gates_and_initial_state():
    H = 4
    _, im = _map(WithState(nn.GRU(3, H, batch_first=True)), (torch.randn(2, 5, 3), torch.randn(1, 2, H)),
                 {"x": fs.Features(FEATS)})
    for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert names(im.labels_of(f"core.{p}")) == ALL | {"h0"}, p
    for g in range(3):  # r, z, n
        row = g * H + 2
        aligned = {"core.l0[2]", f"core.l0.gate[{g}]"}
        assert key(im, "core.weight_ih_l0", (row, 0)) == ({"x:a"}, aligned)
        # W_hh columns meet the layer's own units, and the initial state it multiplies at t=0
        assert key(im, "core.weight_hh_l0", (row, 1)) == ({"core.l0[1]", "h0"}, aligned)
        assert key(im, "core.bias_hh_l0", (row,)) == (set(), aligned)


def test_relu_rnn_weights_meet_only_what_they_multiply():
    # relu'' = 0: the network is piecewise linear in x, so W_ih[r, i] meets feature i only,
    # W_hh the states entering each step (not x at the last step), the biases nothing.
    T, H = 4, 3
    feats = {"x": fs.Features([f"{f}{t}" for t in range(T) for f in "ab"], dim=1)}  # x[b, t*2 + f]

    class Net(nn.Module):
        def __init__(self, core):
            super().__init__()
            self.core = core

        def forward(self, x):
            return self.core(x.reshape(x.shape[0], T, 2))[0]

    def feature(f, ts):
        return {f"x:{f}{t}" for t in ts}

    _, im = _map(Net(nn.RNN(2, H, num_layers=2, nonlinearity="relu", batch_first=True)), (torch.randn(2, 2 * T),),
                 feats)
    everything = feature("a", range(T)) | feature("b", range(T))
    for r in range(H):
        assert element(im, "core.weight_ih_l0", (r, 0)) == feature("a", range(T))
        assert element(im, "core.weight_ih_l0", (r, 1)) == feature("b", range(T))
        for m in range(H):
            before_last = feature("a", range(T - 1)) | feature("b", range(T - 1))
            assert element(im, "core.weight_hh_l0", (r, m)) == before_last
            assert element(im, "core.weight_ih_l1", (r, m)) == everything
            assert element(im, "core.weight_hh_l1", (r, m)) == before_last
        for b in ("bias_ih_l0", "bias_hh_l0", "bias_ih_l1", "bias_hh_l1"):
            assert element(im, f"core.{b}", (r,)) == set()
    # keys mode is unchanged
    assert key(im, "core.weight_hh_l1", (1, 2)) == ({"core.l1[2]"}, {"core.l1[1]"})

    # reverse direction: the state entering each step excludes x at t = 0; a single step
    # and a cell: W_hh[r, m] meets h0[..., m] only
    _, im = _map(Net(nn.RNN(2, H, nonlinearity="relu", batch_first=True, bidirectional=True)),
                 (torch.randn(2, 2 * T),), feats)
    assert element(im, "core.weight_hh_l0_reverse", (0, 0)) == feature("a", range(1, T)) | feature("b", range(1, T))
    assert element(im, "core.weight_ih_l0_reverse", (2, 1)) == feature("b", range(T))

    class RNNCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.RNNCell(2, H, nonlinearity="relu")

        def forward(self, x, h):
            return self.cell(x, h)

    _, im = _map(RNNCell(), (torch.randn(2, 2), torch.randn(2, H)),
                 {"x": fs.Features(["a", "b"]), "h": fs.Features(["h0", "h1", "h2"])})
    assert element(im, "cell.weight_ih", (1, 0)) == {"x:a"}
    assert element(im, "cell.weight_hh", (1, 2)) == {"h:h2"}
    assert element(im, "cell.bias_hh", (1,)) == set()


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 2)

    def forward(self, x):
        h, c = self.cell(x[:, 0])
        h, c = self.cell(x[:, 1], (h, c))
        return h


def test_lstm_cell_unrolled():
    _, im = _map(Cell(), (torch.randn(2, 2, 3),), {"x": fs.Features(FEATS)})
    assert names(im.labels_of("cell.weight_hh")) == ALL
    assert key(im, "cell.weight_ih", (3 * 2 + 1, 2)) == ({"x:c"}, {"cell[1]", "cell.gate[3]"})
    assert key(im, "cell.weight_hh", (0, 1)) == ({"cell[1]"}, {"cell[0]", "cell.gate[0]"})


class LearnedState(nn.Module):
    """An LSTM whose initial state is learned, shared across the batch."""

    def __init__(self, n_in=3):
        super().__init__()
        self.core = nn.LSTM(n_in, 3, num_layers=2)
        self.h0 = nn.Parameter(torch.randn(2, 1, 3))
        self.c0 = nn.Parameter(torch.randn(2, 1, 3))

    def forward(self, x):
        state = [s.expand(-1, x.shape[1], -1).contiguous() for s in (self.h0, self.c0)]
        return self.core(x, state)


def test_learned_initial_state():
    _, im = _map(LearnedState(), (torch.randn(4, 2, 3),), {"x": fs.Features(FEATS)})
    assert names(im.labels_of("h0")) == ALL and names(im.labels_of("c0")) == ALL
    # a row of the initial state is aligned with the units of its layer
    assert key(im, "h0", (1, 0, 2)) == (set(), {"core.l1[2]"})
    assert key(im, "c0", (0, 0, 1)) == (set(), {"core.l0[1]"})


# attention -------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
def test_transformer_block(need_weights):
    D = 4
    traced, im = _map(Block(D, 2, need_weights), (torch.randn(2, 5, 3),), {"x": fs.Features(FEATS)})
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function" and hasattr(n.target, "_schema")}
    assert all(op in REGISTRY for op in ops)
    for p in ("inp.weight", "attn.in_proj_weight", "attn.out_proj.weight", "ln1.weight", "ln2.weight",
              "mlp.0.weight", "mlp.2.weight"):
        assert names(im.labels_of(p)) == ALL, p
    for p in ("inp.bias", "attn.in_proj_bias", "attn.out_proj.bias", "ln1.bias", "mlp.2.bias"):
        assert im.labels_of(p) == set(), p  # only added
    if not need_weights:  # sdpa: the output is aligned with the value projection's units
        meets, aligned = im.key_of("attn.out_proj.weight", (1, 3))
        assert [(l.kind, l.index) for l in meets] == [("unit", 2 * D + 3)]
        assert next(iter(meets)).group.startswith("attn.in_proj")
        assert names(aligned) == {"attn.out_proj[1]"}


def test_causal_sdpa_prefixes():
    T = 5
    _, im = _map(Causal(T), (torch.randn(2, T, 3),), {"x": fs.Features([f"t{t}" for t in range(T)], dim=1)})
    for t in range(T):
        assert element(im, "scale", (t, 0)) == _times("t", range(t + 1))
    assert names(im.labels_of("proj.weight")) == _times("t", range(T))


class GQA(nn.Module):
    def __init__(self, q_heads=4):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(q_heads, 1, 1))

    def forward(self, q, kv):
        return F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True) * self.scale


def test_gqa_heads():
    q, kv = torch.randn(1, 4, 3, 2), torch.randn(1, 2, 3, 2)
    _, im = _map(GQA(), {"q": q, "kv": kv}, {"kv": fs.Features(["h0", "h1"], dim=1)})
    for h in range(4):  # query head h reads key / value head h // 2
        assert element(im, "scale", (h, 0, 0)) == {"q", f"kv:h{h // 2}"}


# cross-checks against autodiff ----------------------------------------------------------
class Flat(nn.Module):
    """Takes every input flattened, so that each element carries its own label."""

    def __init__(self, fn, shapes, params=None):
        super().__init__()
        self.fn, self.shapes = fn, shapes
        self.mod = params

    def forward(self, *flat):
        return self.fn(self, *[t.reshape(s) for t, s in zip(flat, self.shapes)])


def _autodiff_check(module: Flat, names_: list[str], trials: int = 3):
    """Boolean vs gradient mapping: the op's output dependence and each parameter's meets."""
    module = module.double()
    ins = [torch.randn(math.prod(s), dtype=torch.float64) for s in module.shapes]
    feats = {n: fs.Features([str(i) for i in range(t.numel())]) for n, t in zip(names_, ins)}
    traced, im = _map(module, dict(zip(names_, ins)), feats)
    offset, z_size = {}, 0
    for n, t in zip(names_, ins):
        offset[n], z_size = z_size, z_size + t.numel()

    def mask(set_id):
        row = torch.zeros(z_size, dtype=torch.bool)
        for lid in im.pool.sets[set_id]:
            lab = im.pool.labels[lid]
            row[offset[lab.group] + lab.index] = True
        return row

    def rows(ids):
        return torch.stack([mask(int(s)) for s in ids.reshape(-1)])

    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    boolean = torch.cat([rows(a.meta[META_KEY]["deps"].dense()) for a in out_node.args[0]])
    params = {k: v.detach() for k, v in module.named_parameters()}

    def f(z, p):
        out = functional_call(module, p, tuple(torch.split(z, [t.numel() for t in ins])))
        return torch.cat([o.reshape(-1) for o in tree_flatten(out)[0]])

    gradient = torch.zeros_like(boolean)
    met = {k: torch.zeros(v.shape + (z_size,), dtype=torch.bool) for k, v in params.items()}
    for _ in range(trials):
        z = torch.randn(z_size, dtype=torch.float64)
        p = {k: torch.randn_like(v) for k, v in params.items()}
        gradient |= torch.autograd.functional.jacobian(lambda z: f(z, p), z).abs() > 1e-10
        if p:
            c = torch.randn(boolean.shape[0], dtype=torch.float64)
            mixed = jacrev(lambda z: grad(lambda q: (f(z, q) * c).sum())(p))(z)
            for k in met:
                met[k] |= mixed[k].abs() > 1e-10
    assert torch.equal(gradient, boolean), "output dependence differs from the Jacobian's pattern"
    for k in met:
        expected = rows(im.entries[k].meets.dense(im.pool)).reshape(met[k].shape)
        assert torch.equal(met[k], expected), f"{k}: meets differ from the mixed derivative's pattern"


@pytest.mark.parametrize("core, x_shape, h_shape", [
    (nn.LSTM(2, 2, num_layers=2, batch_first=True, bidirectional=True), (2, 3, 2), (4, 2, 2)),
    (nn.LSTM(2, 3, num_layers=2), (1, 2, 2), (2, 2, 3)),                      # one step: per-unit c0
    (nn.LSTM(2, 3, bidirectional=True, proj_size=2), (2, 2, 2), (2, 2, 3)),
    (nn.GRU(2, 3, num_layers=2, bias=False), (3, 2, 2), (2, 2, 3)),
    (nn.LSTMCell(2, 3), (2, 2), (2, 3)),
    (nn.GRUCell(2, 3), (2, 2), (2, 3)),
], ids=["lstm-bidir-2layer", "lstm-one-step", "lstm-proj", "gru", "lstm-cell", "gru-cell"])
def test_recurrent_matches_autodiff(core, x_shape, h_shape):
    lstm = isinstance(core, (nn.LSTM, nn.LSTMCell))
    h_out = h_shape[:-1] + (core.proj_size,) if getattr(core, "proj_size", 0) else h_shape
    shapes = [x_shape, h_out] + ([h_shape] if lstm else [])

    def fn(self, x, h, c=None):
        return self.mod(x, (h, c)) if lstm else self.mod(x, h)

    _autodiff_check(Flat(fn, shapes, core), ["x", "h", "c"][:len(shapes)])


def test_learned_initial_state_matches_autodiff():
    _autodiff_check(Flat(lambda self, x: self.mod(x), [(3, 2, 2)], LearnedState(2)), ["x"])


class LearnedRelu(nn.Module):
    """A relu Elman network (or cell) with a learned initial state, or a learned input."""

    def __init__(self, core, state_shape, learn="h0"):
        super().__init__()
        self.core, self.learn = core, learn
        self.p = nn.Parameter(torch.randn(state_shape))

    def forward(self, z):
        return self.core(self.p, z) if self.learn == "x" else self.core(z, self.p)


@pytest.mark.parametrize("module, shapes, names_", [
    (nn.RNN(2, 3, nonlinearity="relu"), [(3, 2, 2), (1, 2, 3)], ["x", "h"]),
    (nn.RNN(2, 2, num_layers=3, nonlinearity="relu", bidirectional=True, batch_first=True),
     [(2, 3, 2), (6, 2, 2)], ["x", "h"]),
    (nn.RNN(2, 2, num_layers=2, nonlinearity="relu", bidirectional=True), [(1, 2, 2), (4, 2, 2)], ["x", "h"]),
    (nn.RNN(2, 2, num_layers=2, nonlinearity="relu", bias=False), [(3, 2), (2, 2)], ["x", "h"]),   # unbatched
    (nn.RNNCell(2, 3, nonlinearity="relu"), [(2, 2), (2, 3)], ["x", "h"]),
    (LearnedRelu(nn.RNN(2, 2, num_layers=2, nonlinearity="relu", bidirectional=True), (4, 2, 2)),
     [(3, 2, 2)], ["x"]),
    (LearnedRelu(nn.RNN(2, 2, num_layers=2, nonlinearity="relu"), (3, 2, 2), learn="x"), [(2, 2, 2)], ["h"]),
    (LearnedRelu(nn.RNNCell(2, 3, nonlinearity="relu"), (2, 3)), [(2, 2)], ["x"]),
], ids=["one-layer", "bidir-3layer", "bidir-one-step", "unbatched", "cell", "learned-h0", "learned-x",
        "cell-learned-h"])
def test_relu_rnn_matches_autodiff(module, shapes, names_):
    """relu'' = 0: piecewise linear in the data, so a weight meets only what it multiplies, and
    biases, learned states and a learned input meet nothing. Each relu is active at a random
    point with probability 1/2: enough points see every piece that matters."""
    torch.manual_seed(0)

    def fn(self, *z):
        return self.mod(*z)

    _autodiff_check(Flat(fn, shapes, module), names_, trials=40)


class Learned(nn.Module):
    """An sdpa operand that is a parameter (a learned query, memory slot or bias)."""

    def __init__(self, slot, shape, kwargs):
        super().__init__()
        self.slot, self.kwargs = slot, kwargs
        self.p = nn.Parameter(torch.randn(shape)) if shape else None

    def forward(self, *args):
        args = list(args)
        if self.p is not None:
            args.insert(self.slot, self.p)
        return F.scaled_dot_product_attention(*args, **self.kwargs)


@pytest.mark.parametrize("shapes, kwargs, learned", [
    ([(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3)], {"is_causal": True}, None),        # L < S
    ([(1, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)], {"is_causal": True, "enable_gqa": True}, None),
    ([(2, 2, 3, 2), (2, 1, 4, 2), (1, 2, 4, 3), (1, 1, 3, 4)], {}, None),           # float mask, broadcast
    ([(1, 2, 4, 2), (1, 2, 4, 3)], {"is_causal": True}, (0, (2, 4, 2))),            # learned query
    ([(1, 2, 3, 2), (1, 2, 4, 3)], {"is_causal": True}, (1, (4, 2))),               # learned keys
    ([(1, 4, 3, 2), (1, 2, 3, 2)], {"is_causal": True, "enable_gqa": True}, (2, (1, 2, 3, 3))),
    ([(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3)], {}, (3, (3, 4))),                  # learned bias
], ids=["causal", "gqa", "float-mask", "query", "keys", "gqa-values", "bias"])
def test_sdpa_matches_autodiff(shapes, kwargs, learned):
    slot, shape = learned or (0, None)
    names_ = ["q", "k", "v", "mask"]
    if learned:
        del names_[slot]
    names_ = names_[:len(shapes)]

    def fn(self, *args):
        return self.mod(*args)

    _autodiff_check(Flat(fn, shapes, Learned(slot, shape, kwargs)), names_)


def test_sdpa_known_mask_restricts_positions():
    """A boolean mask computed from constants is read: a band lets row l see s in [l-1, l+1];
    a row that sees one position has the constant weight 1 and depends on that value only."""
    band = torch.ones(3, 4, dtype=torch.bool).triu(-1) & torch.ones(3, 4, dtype=torch.bool).tril(1)
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[:, 2] = True
    for allowed in (band, one):
        def fn(self, q, k, v, allowed=allowed):
            m = torch.ones(3, 4, dtype=torch.bool).triu(-1) & torch.ones(3, 4, dtype=torch.bool).tril(1) \
                if allowed is band else torch.arange(4).expand(3, 4) == 2
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        _autodiff_check(Flat(fn, [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3)]), ["q", "k", "v"])


def test_sdpa_math_adds_a_boolean_mask():
    """`_scaled_dot_product_attention_math` adds a boolean mask as 0 / 1 (the public operator
    turns it into 0 / -inf first): no position is removed, and the mask meets nothing."""
    aten = torch.ops.aten
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in ((1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3)))
    m = torch.arange(4).expand(3, 4) == 2
    out = aten._scaled_dot_product_attention_math(q, k, v, m, 0.0, False)[0]
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m.double()))

    def fn(self, q, k, v):
        return aten._scaled_dot_product_attention_math(q, k, v, torch.arange(4).expand(3, 4) == 2, 0.0, False)

    _autodiff_check(Flat(fn, [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3)]), ["q", "k", "v"])

    class Buffered(nn.Module):
        def __init__(self, math_kernel):
            super().__init__()
            self.math_kernel = math_kernel
            self.register_buffer("m", torch.tensor([[True, False, True], [True, True, False]]))

        def forward(self, q, k, v):
            if self.math_kernel:
                return aten._scaled_dot_product_attention_math(q, k, v, self.m, 0.0, False)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.m)

    ins = (torch.randn(1, 2, 2), torch.randn(1, 3, 2), torch.randn(1, 3, 2))
    for math_kernel in (False, True):  # a boolean mask buffer has zero derivative: it meets nothing
        _, im = _map(Buffered(math_kernel), ins, {n: fs.Features(["a", "b"]) for n in "qkv"})
        assert names(im.labels_of("m")) == set()


@pytest.mark.parametrize("variant", ["math", "flash_for_cpu"])
def test_sdpa_variants_match_autodiff(variant):
    """The math kernel returns (out, weights); the CPU flash kernel (out, logsumexp), whose
    logsumexp autograd treats as not differentiable: only its output is compared."""
    aten = torch.ops.aten

    def fn(self, q, k, v):
        if variant == "math":
            return aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, True)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]

    _autodiff_check(Flat(fn, [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)]), ["q", "k", "v"])
