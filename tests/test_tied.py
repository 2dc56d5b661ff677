"""Tied names: one helper groups the state_dict names that share a tensor, for the capture, the
planner, checkpoint streaming and the command line's checkpoint loading."""
import torch
import torch.nn as nn

from fxsurgery.tied import tied_groups, tied_names


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.ones(3))
        self.inner = nn.Module()
        self.inner.register_buffer("scale", self.scale)   # a buffer registered twice

    def forward(self, tok):
        return self.head(self.mid(self.emb(tok)) * self.scale)


def test_names_sharing_a_tensor_form_one_group_in_registration_order():
    assert tied_groups(Tied()) == [("emb.weight", "head.weight"), ("mid.weight",), ("mid.bias",),
                                   ("scale", "inner.scale")]


def test_every_name_maps_to_its_whole_group():
    names = tied_names(Tied())
    assert names["head.weight"] == names["emb.weight"] == ("emb.weight", "head.weight")
    assert names["inner.scale"] == ("scale", "inner.scale")
    assert names["mid.bias"] == ("mid.bias",)
    assert set(names) == {"emb.weight", "head.weight", "mid.weight", "mid.bias", "scale", "inner.scale"}


def test_the_capture_records_the_same_groups():
    import fxsurgery as fs
    tr = fs.trace(Tied().eval(), {"tok": torch.tensor([[0, 1, 4]])}, {"tok": fs.Categories([f"c{i}" for i in range(5)])})
    assert tr.aliases["emb.weight"] == ["emb.weight", "head.weight"]
    assert tr.aliases["scale"] == ["scale", "inner.scale"]
