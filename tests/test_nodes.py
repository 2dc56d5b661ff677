"""Nodes are named one way in every message: "node %name (module.path)", read from the innermost
module torch.export traced the node in (the passes once said "(in module.path)")."""
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.nodes import describe_node, in_module, module_path, module_paths, node_tag
from fxsurgery.passes import SizingError

OBS = ["hp", "mana", "x", "y"]


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, obs):
        return self.fc(obs).view(-1, 2, 4).sum(1)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Inner()
        self.out = nn.Linear(4, 2)

    def forward(self, obs):
        return self.out(self.block(obs)).relu()


def _nodes():
    ep = torch.export.export(Outer().eval(), (torch.randn(2, 4),))
    return {n.name: n for n in ep.graph.nodes}


def test_a_node_is_named_with_its_innermost_module():
    nodes = _nodes()
    linear = nodes["linear"]
    assert module_paths(linear) == ["", "block", "block.fc"]
    assert module_path(linear) == "block.fc"
    assert node_tag(linear) == "%linear (block.fc)"
    assert describe_node(linear) == "node %linear (block.fc)"


def test_a_node_is_in_its_modules_and_their_parents_not_in_a_prefix_of_a_name():
    linear = _nodes()["linear"]
    assert in_module(linear, "block") and in_module(linear, "block.fc")
    assert not in_module(linear, "bl") and not in_module(linear, "block.f") and not in_module(linear, "out")


def test_a_node_at_the_top_level_or_without_a_stack_has_no_module():
    nodes = _nodes()
    assert describe_node(nodes["relu"]) == "node %relu"
    assert module_paths(nodes["obs"]) == [] and describe_node(nodes["obs"]) == "node %obs"


@pytest.mark.usefixtures("quiet")
def test_a_pass_names_the_node_as_the_rest_of_the_library_does():
    tr = fs.trace(Outer().eval(), {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    with pytest.raises(SizingError, match=r"^node %sum_1 \(block\): takes the units of block\.fc in blocks of 2"):
        fs.passes.widen(tr, "block.fc", by=2)
