"""The README's guide to adding a rule, followed step by step, so it cannot drift."""
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.rules.helpers import elementwise
from helpers import element


@torch.library.custom_op("fxsurgery_guide::my_activation", mutates_args=())
def my_activation(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@my_activation.register_fake
def _(x):
    return torch.empty_like(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(my_activation(x))


def test_a_rule_written_as_the_guide_says_replaces_the_fallback():
    registry = fs.REGISTRY.copy("guide")
    op = torch.ops.fxsurgery_guide.my_activation.default

    @registry.register(op, family="elementwise")  # the guide's decorator, on a test registry
    def my_activation_rule(ctx, x):
        return elementwise(ctx, x)

    assert op in registry and op not in fs.REGISTRY
    traced = fs.trace(Net(), (torch.randn(1, 2),), {"x": fs.Features(["a", "b"])})
    imap = fs.interaction_map(traced, registry=registry)
    assert element(imap, "fc.weight", (0, 1)) == {"x:b"}  # exact, where the fallback says {a, b}
    assert not imap.notes
