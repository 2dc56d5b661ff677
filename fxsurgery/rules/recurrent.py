"""Recurrent layers: the fused `aten.lstm` / `aten.gru` / `aten.rnn_tanh` / `aten.rnn_relu`
(one graph node for a whole multi-layer, possibly bidirectional network) and the single-step
cells (`nn.LSTMCell`, `nn.GRUCell`, `nn.RNNCell`).

deps mode, per layer and direction, per batch element, walking time in the direction's order
(each gate reads the whole input step and the whole previous hidden state):

    A_t    = in_t  U  H_{t-1}                  in_t: the layer input at step t, all features
    C_t[j] = C_{t-1}[j]  U  A_t                LSTM cell unit j (C_{-1} = c0[j])
    h_t[j] = C_t[j]         LSTM               (with a projection: U_j C_t[j], all units)
           = A_t            GRU, RNN
    H_t    = U_j h_t[j]                        (H_{-1} = U_j h0[j])

so that output[t, b] depends on the input up to t (from t on, for the reverse direction),
with the cell state's per-unit structure surviving only the first step. Every weight and
bias enters non-linearly at every step: it meets everything the op's data depend on, except
in the last layer, which no later layer mixes again: there the weights of one direction never
see the other direction's initial state, and over a single step gate row g*H + j sees the
initial cell state of unit j only (see `_record_deps`). A learned initial state meets
everything else of its batch element. All of this equals the autodiff pattern at generic
points (tests/test_rules_recurrent_attention.py); an initial state that is the constant zero
(nn.LSTM's default) is not generic: over a single step W_hh and the forget-gate rows then
meet nothing, which the rule does not exploit (a named divergence of the gradient map).

The Elman network with relu (`rnn_relu`, `rnn_relu_cell`) is the exception: relu'' = 0, so
with weights that carry no label it is piecewise *linear* in its data (x, h0), and a weight
meets only the operand it multiplies (see `_record_deps_relu`): W_ih[r, i] meets what input
column i depends on over all steps and batch elements (x[..., i] in layer 0, hidden unit i of
the previous layer above), W_hh[r, m] what unit m of the state entering each step depends on
(h0[k, :, m], then the states after every step but the last), and the biases, a learned
initial state and a learned input meet nothing. Its outputs' dependence is as above.

keys mode: layer k's hidden units are labelled `{prefix}.l{k}` (`{prefix}.l{k}_reverse`),
`prefix` being the module path of the weights; a weight row `g*H + j` is aligned with unit j
and gate g (a unit of `{group}.gate`), a `W_ih` column meets the keys of that input column (the
units of the previous layer, both directions concatenated) and a `W_hh` column the units of
its own layer (and what the initial state carries there). With `proj_size`, `h` has the units
`{group}.proj` and `W_hr[p, j]` meets cell unit j, aligned with projected unit p. A single-gate
RNN's rows carry no gate label. An initial state that is a parameter is aligned with the units
of its layer. Cells (`lstm_cell`...) name their units after the module path (`cell`, `cell.gate`).
"""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor, ParamRef, compress
from ..labels import EMPTY
from ._ops import ops
from .registry import register

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# small id-tensor helpers ----------------------------------------------------------------
def _u(ctx, *ids):
    out = ids[0]
    for t in ids[1:]:
        out = ctx.pool.union_ids(out, t)
    return out


def _red(ctx, ids: torch.Tensor, dims) -> torch.Tensor:
    return ctx.pool.reduce_ids(ids, dims, keepdim=True) if ids.dim() else ids


def _total(ctx, lt) -> int:
    return lt.total(ctx.pool) if isinstance(lt, LabelTensor) else EMPTY


def _const(set_id: int, ndim: int) -> torch.Tensor:
    return torch.full([1] * ndim, set_id, dtype=torch.int64)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b))


def _bcast(tensors):
    shape = torch.broadcast_shapes(*[t.shape for t in tensors])
    return [t.expand(shape) for t in tensors]


def _fit_last(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Expands a size-1 last axis to n (for concatenation)."""
    return ids.expand(list(ids.shape[:-1]) + [n]) if ids.shape[-1] == 1 else ids


def _kind(ctx) -> str:
    return ctx.node.target._schema.name.split("::")[-1]


def _prefix(weight, kind: str, ctx) -> str:
    """The module path of a recurrent layer's weights: `core` for `core.weight_ih_l0`."""
    if isinstance(weight, LabelTensor) and weight.refs:
        path = weight.refs[0].name.rpartition(".")[0]
        return path or kind
    return f"{kind}@{ctx.node.name}"


# parameters ----------------------------------------------------------------------------
class _Layer:
    """The weights of one layer and direction of a fused recurrent op."""

    def __init__(self, chunk, has_biases: bool, proj: bool, gates: int):
        self.w_ih, self.w_hh = chunk[0], chunk[1]
        self.b_ih, self.b_hh = (chunk[2], chunk[3]) if has_biases else (None, None)
        self.w_hr = chunk[-1] if proj else None
        self.hidden = self.w_ih.shape[0] // gates           # H: cell / gate units
        self.out = self.w_hr.shape[0] if proj else self.hidden  # width of h

    @property
    def operands(self):
        return [p for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr) if isinstance(p, LabelTensor)]


def _layers(params, has_biases: bool, num_layers: int, dirs: int, gates: int):
    n = num_layers * dirs
    per = len(params) // n if n else 0
    base = 4 if has_biases else 2
    if per * n != len(params) or per not in (base, base + 1):
        raise ValueError(f"{len(params)} weights do not fit {num_layers} layers x {dirs} directions "
                         f"({'with' if has_biases else 'without'} biases)")
    proj = per == base + 1
    return [[_Layer(params[(l * dirs + d) * per:(l * dirs + d + 1) * per], has_biases, proj, gates)
             for d in range(dirs)] for l in range(num_layers)], proj


def _all_free(operands) -> bool:
    return all(op.is_free for op in operands if isinstance(op, LabelTensor))


def _param_only(ctx, operands):
    """Every operand is free: the results are functions of the parameters alone."""
    refs = tuple(ParamRef(r.name, r.shape, everything=True)
                 for op in operands if isinstance(op, LabelTensor) for r in op.refs)
    return tuple(LabelTensor.empty(v.shape, refs=refs) for v in ctx.out) if isinstance(ctx.out, (tuple, list)) \
        else LabelTensor.empty(ctx.out.shape, refs=refs)


def _gate_rows(ctx, group: str, gates: int, hidden: int) -> torch.Tensor:
    """Row g*H + j of a gate-stacked weight: {unit j of group, gate g}, shape [G*H]."""
    units = ctx.units(group, hidden).repeat(gates)
    if gates == 1:
        return units
    gate = ctx.units(f"{group}.gate", gates).repeat_interleave(hidden)
    return ctx.pool.union_ids(units, gate)


def _record_keys(ctx, layer: _Layer, group: str, gates: int, in_keys: torch.Tensor, h0_keys: torch.Tensor):
    """keys mode: what each weight of one layer and direction meets and is aligned with.
    `in_keys` [I] holds the keys of the layer input's columns, `h0_keys` [Hout] those of the
    initial hidden state's columns (usually empty)."""
    rows = _gate_rows(ctx, group, gates, layer.hidden)
    h_units = ctx.units(f"{group}.proj", layer.out) if layer.w_hr is not None else ctx.units(group, layer.out)
    for w, cols in ((layer.w_ih, in_keys), (layer.w_hh, ctx.pool.union_ids(h_units, h0_keys))):
        if isinstance(w, LabelTensor) and w.is_param:
            ctx.meet(w, _fit_last(cols.reshape(1, -1), w.shape[1]), rows.reshape(-1, 1))
    for b in (layer.b_ih, layer.b_hh):
        if isinstance(b, LabelTensor) and b.is_param:
            ctx.meet(b, _const(EMPTY, 1), rows)
    if isinstance(layer.w_hr, LabelTensor) and layer.w_hr.is_param:
        ctx.meet(layer.w_hr, ctx.units(group, layer.hidden).reshape(1, -1),
                 ctx.units(f"{group}.proj", layer.out).reshape(-1, 1))
    return h_units


def _scan(ctx, inp: torch.Tensor, h0: torch.Tensor, c0, steps: int, reverse: bool, proj: bool, extra: int):
    """deps mode, one layer and direction. `inp` [T', B', 1]: the union of the layer input over
    its features; `h0` [B', Hout'], `c0` [B', H'] (None for GRU / RNN). Returns the hidden
    state per step [T, B*, Hout*], the last hidden state and the last cell state."""
    hprev = _red(ctx, h0, [1])
    c = c0
    outs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    constant_input = inp.shape[0] == 1
    h = None
    for n, t in enumerate(order):
        a = _u(ctx, inp[t if inp.shape[0] > 1 else 0], hprev, _const(extra, 2))
        if c is not None:
            c_new = compress(_u(ctx, c, a))
            h_new = _red(ctx, c_new, [1]) if proj else c_new
        else:
            c_new, h_new = None, compress(a)
        h_next = _red(ctx, h_new, [1])
        fixed = constant_input and h is not None and _same(h_new, h) and _same(h_next, hprev) \
            and (c is None or _same(c_new, c))
        h, hprev, c = h_new, h_next, c_new
        outs[t] = h
        if fixed:  # the state no longer changes and neither does the input: a fixed point
            for t2 in list(order)[n + 1:]:
                outs[t2] = h
            break
    last = outs[0] if reverse else outs[-1]
    per_step = _bcast(outs)
    seq = compress(torch.stack(per_step, 0))
    return seq, last, c


def _time_major(ids: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return ids.transpose(0, 1) if batch_first else ids


def _full_rnn(ctx, kind, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    gates = GATES[kind]
    lstm = kind == "lstm"
    dirs = 2 if bidirectional else 1
    layers, proj = _layers(list(params), bool(has_biases), int(num_layers), dirs, gates)
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    operands = [x, h0, c0] + [p for row in layers for layer in row for p in layer.operands]
    if any(op.is_param for op in operands if isinstance(op, LabelTensor)) and _all_free(operands):
        return _param_only(ctx, operands)

    unbatched = x.ndim == 2                                         # [T, I]: one sequence
    xs = x.ids.unsqueeze(1) if unbatched else _time_major(x.ids, bool(batch_first))  # [T', B', I']
    steps = x.shape[1] if batch_first and not unbatched else x.shape[0]

    def state(lt):  # [L*dirs', B', H']
        if lt is None:
            return None
        return lt.ids.unsqueeze(1) if lt.ids.dim() == 2 else lt.ids

    h0s, c0s = state(h0), state(c0)

    def row(ids, k):
        return ids[k if ids.shape[0] > 1 else 0]

    prefix = _prefix(layers[0][0].w_ih, kind, ctx)
    groups = [[f"{prefix}.l{l}" + ("_reverse" if d else "") for d in range(dirs)] for l in range(num_layers)]

    if ctx.keys:
        in_keys = _red(ctx, xs, [0, 1]).reshape(-1)                   # keys of x's columns
        h_last, c_last, outs = [], [], None
        for l in range(num_layers):
            units = []
            for d in range(dirs):
                layer = layers[l][d]
                h0_cols = _red(ctx, row(h0s, l * dirs + d), [0]).reshape(-1)
                hu = _record_keys(ctx, layer, groups[l][d], gates, in_keys, h0_cols)
                units.append(hu)
                h_last.append(hu.reshape(1, -1))
                c_last.append(ctx.units(groups[l][d], layer.hidden).reshape(1, -1))
            in_keys = torch.cat(units)
            outs = in_keys
        seq = outs.reshape(1, 1, -1)
        hn = torch.stack(_bcast(h_last), 0)
        cn = torch.stack(_bcast(c_last), 0)
        _meet_states(ctx, x, [(h0, hn), (c0, cn)], unbatched)
    else:
        extras = [[ctx.pool.union_many(_total(ctx, p) for p in layers[l][d].operands if not p.is_param)
                   for d in range(dirs)] for l in range(num_layers)]
        inp = _red(ctx, xs, [2])                                      # [T', B', 1]
        h_last, c_last, seq, scans = [], [], None, []
        for l in range(num_layers):
            outs = []
            scans.append(outs)
            for d in range(dirs):
                layer = layers[l][d]
                hrow = _red(ctx, row(h0s, l * dirs + d), [1])         # [B', 1]: all units mix
                crow = row(c0s, l * dirs + d) if lstm else None
                s, hl, cl = _scan(ctx, inp, hrow, crow, steps, bool(d), proj, extras[l][d])
                outs.append(s)
                h_last.append(hl)
                if lstm:
                    c_last.append(cl)
            inp = _red(ctx, outs[0], [2])
            for s in outs[1:]:
                inp = ctx.pool.union_ids(inp, _red(ctx, s, [2]))
            seq = outs
        width = layers[-1][0].out
        seq = torch.cat([_fit_last(s, width) for s in _bcast_lead(seq)], -1) if dirs > 1 else seq[0]
        hn = torch.stack(_bcast(h_last), 0)
        cn = torch.stack(_bcast(c_last), 0) if lstm else None
        if kind == "rnn_relu" and _weights_free(layers):
            _record_deps_relu(ctx, layers, dirs, xs, h0s, scans, steps)
            _meet_nothing(ctx, [x, h0])
        else:
            _record_deps(ctx, layers, dirs, x, h0s, c0s, extras, steps)
            _meet_states(ctx, x, [(h0, None), (c0, None)], unbatched, xs, [h0s, c0s])

    if batch_first and not unbatched:
        seq = seq.transpose(0, 1)
    if unbatched:
        seq = seq.squeeze(1)
        hn = hn.squeeze(1) if hn.dim() == 3 else hn
        cn = cn.squeeze(1) if cn is not None and cn.dim() == 3 else cn
    results = [LabelTensor(compress(seq), ctx.out_shape(0)), LabelTensor(compress(hn), ctx.out_shape(1))]
    if lstm:
        results.append(LabelTensor(compress(cn), ctx.out_shape(2)))
    return tuple(results)


def _meet_states(ctx, x, states, unbatched: bool, xs=None, state_ids=None) -> None:
    """Data operands that are parameters: a learned initial state (or input sequence).

    keys mode: an initial state row is aligned with the units of its layer and direction
    (`states` pairs each operand with the unit ids of h_n / c_n) and meets nothing.
    deps mode: h0[k, b, :] and c0[k, b, :] meet everything else of batch element b; a learned
    input meets everything else (sound)."""
    pool = ctx.pool
    if ctx.keys:
        for op, units in states:
            if isinstance(op, LabelTensor) and op.is_param:
                aligned = units.squeeze(1) if unbatched and units.dim() == 3 else units
                ctx.meet(op, _const(EMPTY, op.ndim), aligned)
        if isinstance(x, LabelTensor) and x.is_param:
            other = pool.union_many(_total(ctx, op) for op, _ in states if isinstance(op, LabelTensor))
            ctx.meet(x, _const(other, x.ndim))
        return
    per_batch = [_red(ctx, xs, [0, 2]).reshape(-1)] + \
        [_red(ctx, ids, [0, 2]).reshape(-1) for ids in state_ids if ids is not None]
    everything = per_batch[0]
    for ids in per_batch[1:]:
        everything = pool.union_ids(everything, ids)                          # [B']
    for op, _ in states:
        if isinstance(op, LabelTensor) and op.is_param:
            view = [1, -1, 1] if op.ndim == 3 else [1, 1]
            ctx.meet(op, everything.reshape(view) if op.ndim == 3 else _red(ctx, everything, [0]).reshape(view))
    if isinstance(x, LabelTensor) and x.is_param:
        ctx.meet(x, _const(int(_red(ctx, everything, [0]).reshape(())), x.ndim))


def _bcast_lead(seqs):
    """Broadcasts [T, B, H] id tensors on their first two axes (for concatenation on the last)."""
    lead = torch.broadcast_shapes(*[s.shape[:2] for s in seqs])
    return [s.expand(list(lead) + [s.shape[2]]) for s in seqs]


def _record_deps(ctx, layers, dirs, x, h0s, c0s, extras, steps: int):
    """deps mode: every weight and bias enters every step non-linearly, so it meets everything
    the op's data depend on, with two exceptions, both in the last layer, where no later layer
    mixes the units and the directions again: its weights of one direction never see the other
    direction's initial state, and over a single step, gate row g*H + j (and column j of the
    projection) sees the initial cell state of its own unit j only."""
    pool = ctx.pool
    n_layers = len(layers)
    rows = n_layers * dirs
    totals = {}
    for key, s in (("h", h0s), ("c", c0s)):
        if s is not None:
            per_row = _red(ctx, s, [1, 2]).reshape(-1)
            totals[key] = [int(per_row[k if per_row.numel() > 1 else 0]) for k in range(rows)]
    base = pool.union_many([_total(ctx, x)] + [e for row in extras for e in row])
    for l in range(n_layers):
        last = l == n_layers - 1
        for d in range(dirs):
            k = l * dirs + d
            skip = {"h": set(), "c": set()}
            if last and dirs > 1:
                skip["h"].add(l * dirs + 1 - d)
                skip["c"].add(l * dirs + 1 - d)
            per_unit = None
            if last and steps == 1 and c0s is not None:
                skip["c"].add(k)
                per_unit = _red(ctx, c0s[k if c0s.shape[0] > 1 else 0], [0]).reshape(-1)  # [H']
            met = pool.union_many([base] + [t for key, ts in totals.items()
                                            for r, t in enumerate(ts) if r not in skip[key]])
            _meet_layer(ctx, layers[l][d], met, per_unit)


def _weights_free(layers) -> bool:
    """No weight or bias depends on a label (they are parameters or constants)."""
    return all(p.is_free for row in layers for layer in row for p in layer.operands)


def _meet_nothing(ctx, operands) -> None:
    for op in operands:
        if isinstance(op, LabelTensor) and op.is_param:
            ctx.meet(op, _const(EMPTY, op.ndim))


def _columns(ctx, ids: torch.Tensor, width: int) -> torch.Tensor:
    """[T*, B*, F*] -> [1, width]: per feature, the union over time and batch."""
    return _fit_last(_red(ctx, ids, [0, 1]).reshape(1, -1), width)


def _record_deps_relu(ctx, layers, dirs, xs, h0s, scans, steps: int) -> None:
    """deps mode, Elman network with relu, whose weights carry no label: relu'' = 0, so for
    fixed weights the network is piecewise linear in its data (x, h0), and the adjoint
    lam_t of each step's pre-activation is piecewise constant in them. Then

        d<c, out>/dW_ih[r, i] = sum_{t,b} lam_t[b, r] in_t[b, i]
        d<c, out>/dW_hh[r, m] = sum_{t,b} lam_t[b, r] h_{t-1}[b, m]
        d<c, out>/db[r]       = sum_{t,b} lam_t[b, r]

    so that W_ih[r, i] meets what input column i depends on, over all steps and batch
    elements (x[..., i] in layer 0; hidden unit i of the previous layer, both directions
    concatenated, above), W_hh[r, m] what the state entering each step depends on in unit m
    (h0[k, :, m], then the states after every step but the direction's last), and the biases
    nothing. `scans[l][d]`: the per-step hidden state ids [T*, B*, H*] of layer l, direction d."""
    for l, row in enumerate(layers):
        if l == 0:
            in_cols = _columns(ctx, xs, layers[0][0].w_ih.shape[1])
        else:
            in_cols = torch.cat([_columns(ctx, s, layers[l - 1][d].out) for d, s in enumerate(scans[l - 1])], -1)
        for d, layer in enumerate(row):
            k = l * dirs + d
            h0_row = h0s[k if h0s.shape[0] > 1 else 0]                         # [B', H']
            h_cols = _fit_last(_red(ctx, h0_row, [0]).reshape(1, -1), layer.out)
            if steps > 1:
                s = scans[l][d]
                if s.shape[0] > 1:  # the states after every step but the last, in the direction's order
                    s = s[1:] if d else s[:-1]
                h_cols = ctx.pool.union_ids(h_cols, _columns(ctx, s, layer.out))
            for w, cols in ((layer.w_ih, in_cols), (layer.w_hh, h_cols)):
                if w.is_param:
                    ctx.meet(w, cols)
            _meet_nothing(ctx, [layer.b_ih, layer.b_hh])


def _meet_layer(ctx, layer: "_Layer", met: int, per_unit) -> None:
    """Records `met` on every parameter of a layer, plus, per gate row / projection column,
    the cell-state labels `per_unit` [H'] of its own unit."""
    gates = layer.w_ih.shape[0] // layer.hidden
    for p in layer.operands:
        if not p.is_param:
            continue
        ids = _const(met, p.ndim)
        if per_unit is not None:
            if p is layer.w_hr:
                unit = per_unit.reshape(1, -1)
            else:
                unit = per_unit.repeat(gates) if per_unit.numel() > 1 else per_unit
                unit = unit.reshape([-1] + [1] * (p.ndim - 1))
            ids = ctx.pool.union_ids(ids, unit)
        ctx.meet(p, ids)


# fused multi-layer ops ---------------------------------------------------------------------
@register(*ops("lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input"), family="recurrent")
def recurrent(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _full_rnn(ctx, _kind(ctx), x, hx, params, has_biases, num_layers, dropout, train,
                     bidirectional, batch_first)


# single-step cells -----------------------------------------------------------------------
def _cell(ctx, kind, x, h, c, w_ih, w_hh, b_ih, b_hh):
    gates = GATES[kind]
    operands = [x, h, c, w_ih, w_hh, b_ih, b_hh]
    if any(isinstance(op, LabelTensor) and op.is_param for op in operands) and _all_free(operands):
        return _param_only(ctx, operands)
    lstm = c is not None
    out_shape = ctx.out_shape(0) if lstm else ctx.out_shape()
    unbatched = x.ndim == 1

    def batched(lt):
        return lt.ids.unsqueeze(0) if lt.ids.dim() == 1 else lt.ids

    layer = _Layer([w_ih, w_hh, b_ih, b_hh], True, False, gates)  # absent biases are None
    if ctx.keys:
        group = _prefix(w_ih, kind, ctx)
        in_keys = _red(ctx, batched(x), [0]).reshape(-1)
        h0_keys = _red(ctx, batched(h), [0]).reshape(-1)
        units = _record_keys(ctx, layer, group, gates, in_keys, h0_keys)
        ids = units.reshape(1, -1)
        out_h = ids
        out_c = ids
        for state in (h, c):  # a learned initial state is aligned with the units
            if isinstance(state, LabelTensor) and state.is_param:
                ctx.meet(state, _const(EMPTY, state.ndim), units.reshape([1] * (state.ndim - 1) + [-1]))
    else:
        weights_data = ctx.pool.union_many(_total(ctx, w) for w in (w_ih, w_hh, b_ih, b_hh)
                                           if isinstance(w, LabelTensor) and not w.is_param)
        a = _u(ctx, _red(ctx, batched(x), [1]), _red(ctx, batched(h), [1]), _const(weights_data, 2))
        out_h = compress(_u(ctx, batched(c), a)) if lstm else a
        out_c = out_h
    if not ctx.keys and kind == "rnn_relu" and all(p.is_free for p in layer.operands):
        # Piecewise linear in (x, h) (see _record_deps_relu): W_ih[r, i] meets x[:, i],
        # W_hh[r, m] meets h[:, m], biases, x and h nothing.
        for w, data in ((w_ih, x), (w_hh, h)):
            if w.is_param:
                ctx.meet(w, _columns(ctx, batched(data).unsqueeze(0), w.shape[1]))
        _meet_nothing(ctx, [x, h, b_ih, b_hh])
    elif not ctx.keys:
        # One step: gate row g*H + j sees the cell state of its own unit j only.
        met = ctx.pool.union_many([_total(ctx, x), _total(ctx, h), weights_data])
        per_unit = _red(ctx, batched(c), [0]).reshape(-1) if lstm else None
        _meet_layer(ctx, layer, met, per_unit)
        every = [batched(t) for t in (x, h, c) if isinstance(t, LabelTensor)]
        per_batch = _red(ctx, every[0], [1])
        for t in every[1:]:
            per_batch = ctx.pool.union_ids(per_batch, _red(ctx, t, [1]))    # [B', 1]
        for t in (x, h, c):  # a learned state meets everything else of its batch element
            if isinstance(t, LabelTensor) and t.is_param:
                ctx.meet(t, per_batch if t.ndim == 2 else _red(ctx, per_batch, [0]).reshape(1))
    if unbatched:
        out_h, out_c = out_h.reshape(-1), out_c.reshape(-1)
    if lstm:
        return LabelTensor(out_h, out_shape), LabelTensor(out_c, ctx.out_shape(1))
    return LabelTensor(out_h, out_shape)


@register(*ops("lstm_cell.default"), family="recurrent")
def lstm_cell(ctx, x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return _cell(ctx, "lstm", x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)


@register(*ops("gru_cell.default", "rnn_tanh_cell.default", "rnn_relu_cell.default"), family="recurrent")
def rnn_cell(ctx, x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return _cell(ctx, _kind(ctx).replace("_cell", ""), x, hx, None, w_ih, w_hh, b_ih, b_hh)
