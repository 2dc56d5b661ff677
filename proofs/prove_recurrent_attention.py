"""Recurrent layers and attention, written as their defining recurrences and softmax sums.

- LSTM: gates = x W_ih^T + b_ih + h W_hh^T + b_hh split as (i, f, g, o); c' = s(f) c + s(i) tanh(g);
  h' = s(o) tanh(c'). GRU: r, z = s(.), n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)),
  h' = (1 - z) n + z h. Elman: h' = tanh(...) or relu(...). Time-major, unrolled over a short
  sequence, one or two layers, one or two directions.
- scaled dot-product attention: softmax(q k^T * scale + mask) v over the allowed keys (a causal
  or boolean mask removes keys, a float mask is added to the scores).

Every output is checked (sequence output, final states; attention weights and log-sum-exp for
the math / flash variants), and every weight's meets, through all time steps.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
import torch

from proof_harness import Case, D, Instance, check_case, ew, main, proof_params

sig = lambda v: 1 / (1 + sp.exp(-v))  # noqa: E731
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _mm(a, W):
    return np.asarray(a @ W.T, dtype=object)


def cell(kind, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step on (B, I) and (B, H) object arrays; returns (h', c')."""
    gi = _mm(x, w_ih) + (b_ih if b_ih is not None else 0)
    gh = _mm(h, w_hh) + (b_hh if b_hh is not None else 0)
    H = w_hh.shape[1]
    if kind == "lstm":
        g = gi + gh
        i, f, gg, o = (g[:, k * H:(k + 1) * H] for k in range(4))
        c2 = ew(lambda f_, c_, i_, g_: sig(f_) * c_ + sig(i_) * sp.tanh(g_), f, c, i, gg)
        return ew(lambda o_, c_: sig(o_) * sp.tanh(c_), o, c2), c2
    if kind == "gru":
        r = ew(lambda a, b: sig(a + b), gi[:, :H], gh[:, :H])
        z = ew(lambda a, b: sig(a + b), gi[:, H:2 * H], gh[:, H:2 * H])
        n = ew(lambda a, r_, b: sp.tanh(a + r_ * b), gi[:, 2 * H:], r, gh[:, 2 * H:])
        return ew(lambda z_, n_, h_: (1 - z_) * n_ + z_ * h_, z, n, h), None
    act = sp.tanh if kind == "rnn_tanh" else (lambda v: sp.Max(0, v))
    return ew(act, gi + gh), None


def rnn(kind, X, h0, c0, params, layers, dirs):
    """Time-major (T, B, I) input; h0, c0 (layers*dirs, B, H); params flat as torch orders them."""
    per = 4
    inp, hs, cs = X, [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = params[per * k: per * k + 4]
            h, c = h0[k], (c0[k] if c0 is not None else None)
            steps = range(inp.shape[0]) if d == 0 else reversed(range(inp.shape[0]))
            seq = {}
            for t in steps:
                h, c = cell(kind, inp[t], h, c, w_ih, w_hh, b_ih, b_hh)
                seq[t] = h
            outs.append(np.stack([seq[t] for t in range(inp.shape[0])]))
            hs.append(h)
            cs.append(c)
        inp = np.concatenate(outs, axis=-1)
    return inp, np.stack(hs), (np.stack(cs) if c0 is not None else None)


def rnn_case(kind, T=2, B=1, I=2, H=2, layers=1, dirs=1, learned_state=False):
    op = f"aten.{kind}.input"
    G = GATES[kind]
    ops_ = [D("x", (T, B, I)), D("h0", (layers * dirs, B, H))]
    if kind == "lstm":
        ops_.append(D("c0", (layers * dirs, B, H)))
    if learned_state:
        ops_ = [ops_[0]] + [replace(o, role="param") for o in ops_[1:]]
    n_state = len(ops_)
    for layer in range(layers):
        for d in range(dirs):
            sfx = f"l{layer}" + ("r" if d else "")
            i_in = I if layer == 0 else H * dirs
            ops_ += [replace(D(f"w_ih_{sfx}", (G * H, i_in)), role="param"),
                     replace(D(f"w_hh_{sfx}", (G * H, H)), role="param"),
                     replace(D(f"b_ih_{sfx}", (G * H,)), role="param"),
                     replace(D(f"b_hh_{sfx}", (G * H,)), role="param")]

    def call(o, x, *rest):
        state, params = list(rest[: n_state - 1]), list(rest[n_state - 1:])
        hx = state if kind == "lstm" else state[0]
        return o(x, hx, params, True, layers, 0.0, False, dirs == 2, False)

    def math_(X, *rest):
        state, params = rest[: n_state - 1], rest[n_state - 1:]
        out, hn, cn = rnn(kind, X, state[0], state[1] if kind == "lstm" else None, params, layers, dirs)
        return (out, hn, cn) if kind == "lstm" else (out, hn)

    tag = f"T={T} H={H}" + (f" {layers} layers" if layers > 1 else "") + (" bidirectional" if dirs == 2 else "") \
        + (" learned initial state" if learned_state else "")
    return Instance(op, ops_, call, math_, label=tag, method="chain")


def cell_case(kind, B=1, I=2, H=2):
    name = "lstm_cell" if kind == "lstm" else f"{kind}_cell"
    op = f"aten.{name}.default"
    G = GATES[kind]
    ops_ = [D("x", (B, I)), D("h", (B, H))] + ([D("c", (B, H))] if kind == "lstm" else []) + [
        replace(D("w_ih", (G * H, I)), role="param"), replace(D("w_hh", (G * H, H)), role="param"),
        replace(D("b_ih", (G * H,)), role="param"), replace(D("b_hh", (G * H,)), role="param")]
    if kind == "lstm":
        return Instance(op, ops_, lambda o, x, h, c, *w: o(x, [h, c], *w),
                        lambda X, Hh, Cc, *W: cell(kind, X, Hh, Cc, *W), method="chain")
    return Instance(op, ops_, lambda o, x, h, *w: o(x, h, *w), lambda X, Hh, *W: cell(kind, X, Hh, None, *W)[0],
                    method="chain")


# attention ---------------------------------------------------------------------------------

def attention(Q, K, V, mask=None, causal=False, scale=None, bool_mask=False):
    """Returns (output, weights, logsumexp) over the last two axes."""
    E = Q.shape[-1]
    s = scale if scale is not None else 1 / sp.sqrt(E)
    lead = np.broadcast_shapes(Q.shape[:-2], K.shape[:-2], V.shape[:-2])
    L, S = Q.shape[-2], K.shape[-2]
    Qb, Kb, Vb = (np.broadcast_to(A, lead + A.shape[-2:]) for A in (Q, K, V))
    M = None if mask is None else np.broadcast_to(mask, lead + (L, S))
    out = np.empty(lead + (L, V.shape[-1]), dtype=object)
    wts = np.empty(lead + (L, S), dtype=object)
    lse = np.empty(lead + (L,), dtype=object)
    for idx in np.ndindex(*lead):
        for i in range(L):
            allowed, scores = [], {}
            for j in range(S):
                if causal and j > i:
                    continue
                if M is not None and bool_mask:
                    keep = M[idx + (i, j)]
                    if not keep:
                        continue
                sc = sp.Add(*[Qb[idx + (i, e)] * Kb[idx + (j, e)] for e in range(E)]) * s
                if M is not None and not bool_mask:
                    sc = sc + M[idx + (i, j)]
                scores[j] = sc
                allowed.append(j)
            z = sp.Add(*[sp.exp(scores[j]) for j in allowed])
            for j in range(S):
                wts[idx + (i, j)] = sp.exp(scores[j]) / z if j in scores else sp.S.Zero
            for e in range(V.shape[-1]):
                out[idx + (i, e)] = sp.Add(*[wts[idx + (i, j)] * Vb[idx + (j, e)] for j in allowed])
            lse[idx + (i,)] = sp.log(z)
    return out, wts, lse


MASK = torch.tensor([[True, False, True], [True, True, False]])


def sdpa_instances(op, outputs, call_kw, heads=False, bool_mask="remove"):
    """Plain, causal, boolean mask (a constant) and float mask (labelled) instances, with q, k, v
    labelled, and once each as a parameter. `bool_mask`: "remove" (a False key takes no part),
    "add" (the math kernel adds a boolean mask as 0/1), None (not accepted)."""
    from proof_harness import C, variants
    lead = (1, 1) if heads else (1,)
    q, k, v = D("q", lead + (2, 2)), D("k", lead + (3, 2)), D("v", lead + (3, 2))
    out = []
    out += variants(op, [q, k, v], lambda o, q_, k_, v_: call_kw(o, q_, k_, v_),
                    lambda Q, K, V: outputs(attention(Q, K, V)), tag="plain")
    out += variants(op, [q, k, v], lambda o, q_, k_, v_: call_kw(o, q_, k_, v_, is_causal=True),
                    lambda Q, K, V: outputs(attention(Q, K, V, causal=True)), params=[], tag="causal")
    if bool_mask:
        out.append(Instance(op, [q, k, v, C("m", MASK)], lambda o, q_, k_, v_, m: call_kw(o, q_, k_, v_, attn_mask=m),
                            lambda Q, K, V, M: outputs(attention(Q, K, V, M.astype(float) if bool_mask == "add" else M,
                                                                 bool_mask=bool_mask == "remove")),
                            label="boolean mask" + (" (added as 0/1)" if bool_mask == "add" else "")))
    out.append(Instance(op, [q, k, v, D("m", (2, 3))], lambda o, q_, k_, v_, m: call_kw(o, q_, k_, v_, attn_mask=m),
                        lambda Q, K, V, M: outputs(attention(Q, K, V, M)), label="float mask (labelled)"))
    q4, k4, v4 = D("q", (1, 2, 2, 2)), D("k", (1, 2, 3, 2)), D("v", (1, 2, 3, 2))
    out.append(Instance(op, [q4, k4, v4], lambda o, q_, k_, v_: call_kw(o, q_, k_, v_, scale=0.7),
                        lambda Q, K, V: outputs(attention(Q, K, V, scale=sp.Rational(7, 10))), label="2 heads, scale"))
    return [replace(i, method="chain") for i in out]


def _sdpa(o, q, k, v, attn_mask=None, is_causal=False, scale=None):
    return o(q, k, v, attn_mask, 0.0, is_causal, scale=scale)


def _flash(o, q, k, v, attn_mask=None, is_causal=False, scale=None):
    return o(q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def _math(o, q, k, v, attn_mask=None, is_causal=False, scale=None):
    return o(q, k, v, attn_mask, 0.0, is_causal, scale=scale)


CASES: list[Case] = [
    Case("aten.lstm.input", [rnn_case("lstm"), rnn_case("lstm", learned_state=True),
                             rnn_case("lstm", T=2, H=1, dirs=2), rnn_case("lstm", T=2, I=1, H=1, layers=2)]),
    Case("aten.gru.input", [rnn_case("gru"), rnn_case("gru", H=1, dirs=2), rnn_case("gru", I=1, H=1, layers=2)]),
    Case("aten.rnn_tanh.input", [rnn_case("rnn_tanh"), rnn_case("rnn_tanh", dirs=2), rnn_case("rnn_tanh", layers=2)]),
    Case("aten.rnn_relu.input", [rnn_case("rnn_relu"), rnn_case("rnn_relu", dirs=2)]),
    Case("aten.lstm_cell.default", [cell_case("lstm")]),
    Case("aten.gru_cell.default", [cell_case("gru")]),
    Case("aten.rnn_tanh_cell.default", [cell_case("rnn_tanh")]),
    Case("aten.rnn_relu_cell.default", [cell_case("rnn_relu")]),
    Case("aten.scaled_dot_product_attention.default",
         sdpa_instances("aten.scaled_dot_product_attention.default", lambda r: r[0], _sdpa)),
    Case("aten._scaled_dot_product_flash_attention_for_cpu.default",
         sdpa_instances("aten._scaled_dot_product_flash_attention_for_cpu.default", lambda r: (r[0], r[2]), _flash,
                        heads=True, bool_mask=None)),
    Case("aten._scaled_dot_product_attention_math.default",
         sdpa_instances("aten._scaled_dot_product_attention_math.default", lambda r: (r[0], r[1]), _math,
                        bool_mask="add")),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "recurrent/attention: ")))
