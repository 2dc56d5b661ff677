"""Hypothesis strategies for property tests of fxsurgery (and of anything taking a model).

    from hypothesis import given
    from fxsurgery.testing import architectures, build, models

    @given(models(max_layers=3, ops=["linear", "relu", "mha"]))
    def test_something(built):
        model, example_inputs, features = built
        ...

A random model is described by a frozen `ArchSpec` (inputs, stream width, layers, outputs)
whose repr reads like a model description; `build(spec, seed)` turns it into
(model in eval mode, example_inputs, features).

Modules: specs (the dataclasses), modules (build and the torch layers), architectures (the
strategies; note that `fxsurgery.testing.architectures` is the strategy function, which
shadows its module as an attribute of this package).
"""
from .architectures import architectures, input_specs, inputs_for, layer_specs, models
from .modules import Built, build, features_of, make_inputs
from .specs import ACTIVATIONS, LAYER_KINDS, OUTPUT_KINDS, ArchSpec, InputSpec, LayerSpec

__all__ = [
    "ArchSpec", "InputSpec", "LayerSpec", "LAYER_KINDS", "ACTIVATIONS", "OUTPUT_KINDS",
    "build", "Built", "make_inputs", "features_of",
    "architectures", "input_specs", "layer_specs", "models", "inputs_for",
]
