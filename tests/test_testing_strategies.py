"""The strategies of fxsurgery.testing generate models that build, run, export and use all
their inputs, and every layer kind and variant can actually be generated."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from fxsurgery.labels import Categories, Features
from fxsurgery.testing import (ACTIVATIONS, LAYER_KINDS, ArchSpec, InputSpec, LayerSpec,
                               architectures, build, inputs_for, make_inputs, models)

# nn.LSTM/GRU warn that export reassigns their flat weights; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:.*_flat_weights.*")

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _outputs(model, inputs) -> tuple[torch.Tensor, ...]:
    out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b))


def _changed_input(spec: InputSpec, x: torch.Tensor, trial: int) -> torch.Tensor:
    if spec.kind == "categories":
        # one element moves to another valid category: changing them all could permute the
        # tokens, which a mean over tokens does not see
        changed = x.clone().reshape(-1)
        k = trial % changed.numel()
        changed[k] = (changed[k] + 1 + trial % (spec.n - 1)) % spec.n
        return changed.reshape(x.shape)
    g = torch.Generator().manual_seed(trial)
    # large values of both signs, so that a max pooling or saturating activation that
    # ignores this input at one point cannot ignore it at all of them
    return torch.randn(x.shape, generator=g) * (1, 10, -10)[trial % 3]


def check_model(built) -> torch.export.ExportedProgram:
    """Builds, runs, is finite, exports to the same results, and depends on every input."""
    model, inputs, features = built
    spec = built.spec
    assert not model.training
    assert [type(f) for f in features.values()] == [
        Features if i.kind == "features" else Categories for i in spec.inputs]
    for i, x in zip(spec.inputs, inputs):
        assert tuple(x.shape) == i.shape(2) and len(features[i.name]) == i.n
        if i.kind == "features":
            assert x.dtype == torch.float32 and x.shape[-1] == i.n
        else:
            assert x.dtype == torch.long and 0 <= int(x.min()) and int(x.max()) < i.n

    out = _outputs(model, inputs)
    assert len(out) == len(spec.outputs)
    assert all(torch.isfinite(o).all() for o in out), spec

    program = torch.export.export(model, inputs)
    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user == [i.name for i in spec.inputs]   # features are matched by these names
    assert _same(_outputs(program.module(), inputs), out)

    for k, i in enumerate(spec.inputs):
        assert _depends_on(spec, k), f"the output of {spec!r} does not depend on input {i.name}"
    return program


def _depends_on(spec, k: int) -> bool:
    """Does changing input k change the output, for some seed and some change? A few tries,
    because at one point a ReLU may be dead or a max pooling may ignore the input."""
    for seed in range(5):
        model, inputs, _ = build(spec, seed)
        out = _outputs(model, inputs)
        for trial in range(6):
            changed = list(inputs)
            changed[k] = _changed_input(spec.inputs[k], inputs[k], trial)
            if not _same(_outputs(model, changed), out):
                return True
    return False


@SETTINGS
@given(models())
def test_generated_models_build_run_export_and_use_every_input(built):
    check_model(built)


@SETTINGS
@given(architectures(max_layers=2, max_width=5), st.integers(0, 3))
def test_build_is_deterministic_and_spec_repr_round_trips(spec, seed):
    assert eval(repr(spec)) == spec  # the printed counterexample rebuilds the model
    (m1, x1, _), (m2, x2, _) = build(spec, seed), build(spec, seed)
    assert _same(x1, x2) and _same(_outputs(m1, x1), _outputs(m2, x2))
    state1, state2 = m1.state_dict(), m2.state_dict()
    assert state1.keys() == state2.keys() and all(torch.equal(state1[k], state2[k]) for k in state1)


@settings(max_examples=5, deadline=None)
@given(st.data())
def test_inputs_for_gives_valid_inputs(data):
    spec = data.draw(architectures(max_layers=1))
    model, _, _ = build(spec)
    inputs = data.draw(inputs_for(spec))
    assert all(torch.isfinite(o).all() for o in _outputs(model, inputs))


def _find(strategy, condition):
    # The first example that satisfies condition (shrinking it would cost ~1 s each), from a
    # fixed seed so that a rare variant cannot make the test flaky.
    return find(strategy, condition, settings=settings(
        phases=[Phase.generate], database=None, derandomize=True, max_examples=1000))


# The ATen operator each layer kind must put in the exported graph.
OPERATOR = {"linear": "linear", **{a: a for a in ACTIVATIONS}, "dropout": "dropout",
            "layernorm": "layer_norm", "softmax": "softmax", "log_softmax": "log_softmax",
            "meanpool": "mean", "maxpool": "amax", "batchnorm": "batch_norm",
            "groupnorm": "group_norm", "split": ("split_with_sizes", "chunk"),
            "mix_tokens": "permute",
            "flatten": "reshape", "conv1d": "conv1d", "conv2d": "conv2d",
            "sdpa": "scaled_dot_product_attention", "mha": "scaled_dot_product_attention",
            "gru": "gru", "lstm": "lstm"}


def _operators(program) -> set[str]:
    # "aten.linear.default" -> "linear"
    return {str(n.target).split(".")[1] for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("aten.")}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_every_layer_kind_is_reachable(kind):
    spec = _find(architectures(ops=[kind], min_layers=1), lambda s: kind in s.kinds)
    assert {layer.kind for layer in spec.layers} == {kind}   # ops restricts the kinds
    expected = OPERATOR[kind] if isinstance(OPERATOR[kind], tuple) else (OPERATOR[kind],)
    assert set(expected) & _operators(check_model(build(spec)))


def test_categories_are_embedded():
    spec = _find(architectures(), lambda s: any(i.kind == "categories" for i in s.inputs))
    assert "embedding" in _operators(check_model(build(spec)))


def _conv1d(s, pred):
    return any(l.kind == "conv1d" and pred(l, c) for l, c in _layers_with_channels(s))


def _layers_with_channels(spec):
    # the channel count each layer receives (widths only change where width is set)
    c = spec.width
    for layer in spec.layers:
        yield layer, c
        c = layer.width or c


# name: (ops, condition on the spec, ATen operator that must then be in the graph or None)
VARIANTS = {
    "depthwise conv1d": (["conv1d"], lambda s: _conv1d(s, lambda l, c: l.groups == c), "conv1d"),
    "grouped conv1d": (["conv1d"], lambda s: _conv1d(s, lambda l, c: 1 < l.groups < c), "conv1d"),
    "conv1d kernel 3": (["conv1d"], lambda s: _conv1d(s, lambda l, c: l.kernel == 3), "conv1d"),
    "conv2d with 2 maps": (["conv2d"], lambda s: any(l.width for l in s.layers), "conv2d"),
    "split by torch.split": (["split"], lambda s: all(len(set(l.sizes)) > 1 for l in s.layers),
                             "split_with_sizes"),
    "split by torch.chunk": (["split"], lambda s: all(len(set(l.sizes)) == 1 for l in s.layers),
                             "chunk"),
    "groupnorm with groups": (["groupnorm"], lambda s: any(l.groups > 1 for l in s.layers),
                              "group_norm"),
    "multi-head mha": (["mha"], lambda s: any(l.heads > 1 for l in s.layers), None),
    "multi-head sdpa": (["sdpa"], lambda s: any(l.heads > 1 for l in s.layers), None),
    "residual": (["linear"], lambda s: any(l.residual for l in s.layers), "add"),
    "residual pooling": (["meanpool"], lambda s: all(l.residual for l in s.layers), "add"),
    "lstm changing width": (["lstm"], lambda s: any(l.width for l in s.layers), "lstm"),
    "embedding sequence": (None, lambda s: any(i.kind == "categories" and i.length
                                               for i in s.inputs), "embedding"),
    "scalar categories": (None, lambda s: any(i.kind == "categories" and not i.length
                                              for i in s.inputs), "embedding"),
    "entity features": (None, lambda s: any(i.entities for i in s.inputs), None),
    "raw features": (None, lambda s: any(i.raw for i in s.inputs), "pad"),
    "three inputs": (None, lambda s: len(s.inputs) == 3, "cat"),
    "two outputs": (None, lambda s: len(s.outputs) == 2, None),
    "flat output": (None, lambda s: "flat" in s.outputs, "flatten"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_reachable(variant):
    ops, condition, operator = VARIANTS[variant]
    spec = _find(architectures(ops=ops, min_layers=1 if ops else 0), condition)
    operators = _operators(check_model(build(spec)))
    assert operator is None or operator in operators, (spec, operators)


def test_build_rejects_specs_that_do_not_fit():
    x = (InputSpec("x0", n=3),)
    with pytest.raises(ValueError, match="does not divide"):
        build(ArchSpec(inputs=x, width=4, layers=(LayerSpec("mha", heads=3),)))
    with pytest.raises(ValueError, match="keep the shape"):
        build(ArchSpec(inputs=x, width=4, layers=(LayerSpec("linear", width=2, residual=True),)))
    with pytest.raises(ValueError, match="raw features"):
        build(ArchSpec(inputs=(InputSpec("x0", n=5, raw=True),), width=4))
    with pytest.raises(ValueError, match="identifier"):
        InputSpec("not a name")
    with pytest.raises(ValueError, match="unknown layer kind"):
        LayerSpec("transformer")
    with pytest.raises(ValueError, match="ops"):
        architectures(ops=["transformer"])


def test_build_keeps_the_global_rng_and_inputs_are_seeded():
    spec = ArchSpec(inputs=(InputSpec("x0", n=3, entities=2), InputSpec("c0", "categories", n=5)))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build(spec, seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert not _same(make_inputs(spec, 0), make_inputs(spec, 1))
