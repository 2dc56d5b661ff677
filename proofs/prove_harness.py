"""Checks of the proof machinery itself: the two ways of evaluating derivatives agree, a wrong
formula is caught by the value check, and a wrong rule (unsound or inexact) is caught."""
from __future__ import annotations

import numpy as np
import sympy as sp
import torch

import prove_conv_pool
import prove_norms
import prove_recurrent_attention
import prove_reductions
from fxsurgery.rules import REGISTRY
from fxsurgery.rules.helpers import mixing, no_dependence
from proof_harness import (D, Instance, _as_outputs, _patterns_chain, _patterns_symbolic, _sampler, _symbols, ew,
                           run_instance)

aten = torch.ops.aten


def _sample_instances():
    picks = {"aten.layer_norm.default", "aten.group_norm.default", "aten.softmax.int", "aten.median.dim",
             "aten.max_pool2d.default", "aten.upsample_bicubic2d.default", "aten.conv1d.default",
             "aten.gru_cell.default", "aten.rnn_relu_cell.default"}
    for mod in (prove_norms, prove_reductions, prove_conv_pool, prove_recurrent_attention):
        for case in mod.CASES:
            if case.op in picks:
                yield from case.instances[:2]


def test_chain_rule_evaluation_matches_symbolic_derivatives():
    """_patterns_chain (used for recurrences) gives exactly the patterns of sympy's derivative
    expressions on a sample of instances of every kind of operator."""
    for inst in _sample_instances():
        arrays, label_of, params = _symbols(inst)
        outs = [None if m is None else ew(sp.sympify, np.asarray(m, dtype=object))
                for m in _as_outputs(inst.math(*arrays))]
        by_sym = {s: o for o, a in zip(inst.operands, arrays) if o.role != "const" for s in np.asarray(a).reshape(-1)}
        got = []
        for method in (_patterns_symbolic, _patterns_chain):
            jac, mixed = method(outs, label_of, params, _sampler(by_sym, inst.points, np.random.default_rng(0)),
                                inst.points)
            got.append(({k for k, v in jac.items() if v}, {k for k, v in mixed.items() if v}))
        assert got[0] == got[1], f"{inst.op} [{inst.label}]: the two derivative evaluations disagree"


def _relu_instance(math=lambda X: ew(lambda x: sp.Max(0, x), X)):
    return Instance("aten.relu.default", [D("x", (2, 3))], lambda o, x: o(x), math)


def test_a_wrong_formula_is_caught_by_the_value_check():
    out = run_instance(_relu_instance(math=lambda X: X))
    assert out.error and "formula is wrong" in out.error


def test_an_unsound_rule_is_caught():
    reg = REGISTRY.copy("unsound")
    reg.replace(aten.relu.default, lambda ctx, x: no_dependence(ctx))
    out = run_instance(_relu_instance(), registry=reg)
    assert out.missing and not out.extra


def test_an_inexact_rule_is_caught():
    reg = REGISTRY.copy("inexact")
    reg.replace(aten.relu.default, lambda ctx, x: mixing(ctx, x, [0, 1]))  # every output on every input
    out = run_instance(_relu_instance(), registry=reg)
    assert out.extra and not out.missing
    assert run_instance(_relu_instance()).ok
