"""Element-wise, movement and reduction rules on small graphs, answers worked out by hand."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsurgery as fs
from helpers import element, key, names

ABCD = fs.Features(["a", "b", "c", "d"])


def deps_of(traced, node_name):
    """Per element label names of a node's value in the paper's (deps) mapping."""
    node = next(n for n in traced.graph.nodes if n.name == node_name)
    lt = node.meta["fxsurgery"]["deps"]
    return lt, node


def labels_at(imap, lt, index):
    return {str(l) for l in imap.pool.labels_in(int(lt.dense()[index]))}


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain, self.shift = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.gain + self.shift


def test_a_multiplied_parameter_meets_its_operand_an_added_one_nothing():
    imap = fs.interaction_map(fs.trace(Scale(), (torch.randn(2, 4),), {"x": ABCD}))
    assert [element(imap, "gain", (i,)) for i in range(4)] == [{"x:a"}, {"x:b"}, {"x:c"}, {"x:d"}]
    assert imap.labels_of("shift") == set()
    assert key(imap, "shift", (2,)) == (set(), {"x:c"})


class Moves(nn.Module):
    def forward(self, x):
        y = x.flip(-1)[:, 1:]                       # [d, c, b] -> take c, b after flip
        z = F.pad(y, (1, 0))                        # a padded position depends on nothing
        g = torch.gather(x, 1, torch.arange(4).flip(0).expand(2, 4))  # constant indices
        return z, g, x.permute(1, 0).reshape(-1)


def test_movement_rules_move_each_element_set():
    t = fs.trace(Moves(), (torch.randn(2, 4),), {"x": ABCD})
    imap = fs.interaction_map(t)
    out = next(n for n in t.graph.nodes if n.op == "output").args[0]
    z, g, flat = (n.meta["fxsurgery"]["deps"] for n in out)
    assert [labels_at(imap, z, (0, i)) for i in range(4)] == [set(), {"x:c"}, {"x:b"}, {"x:a"}]
    assert [labels_at(imap, g, (1, i)) for i in range(4)] == [{"x:d"}, {"x:c"}, {"x:b"}, {"x:a"}]
    assert [labels_at(imap, flat, (i,)) for i in range(8)] == [{"x:a"}, {"x:a"}, {"x:b"}, {"x:b"},
                                                               {"x:c"}, {"x:c"}, {"x:d"}, {"x:d"}]


class Reduce(nn.Module):
    def forward(self, x):
        return x.sum(0), x.softmax(-1), x.cumsum(-1), x.amax(-1, keepdim=True)


def test_reductions_union_and_softmax_mixes_its_axis():
    t = fs.trace(Reduce(), (torch.randn(2, 4),), {"x": ABCD})
    imap = fs.interaction_map(t)
    s, sm, cs, mx = (n.meta["fxsurgery"]["deps"] for n in next(n for n in t.graph.nodes if n.op == "output").args[0])
    assert labels_at(imap, s, (2,)) == {"x:c"}
    assert labels_at(imap, sm, (0, 0)) == {"x:a", "x:b", "x:c", "x:d"}
    assert [labels_at(imap, cs, (0, i)) for i in range(4)] == [{"x:a"}, {"x:a", "x:b"}, {"x:a", "x:b", "x:c"},
                                                               {"x:a", "x:b", "x:c", "x:d"}]
    assert labels_at(imap, mx, (1, 0)) == {"x:a", "x:b", "x:c", "x:d"}


class Where(nn.Module):
    def __init__(self):
        super().__init__()
        self.fill = nn.Parameter(torch.zeros(4))

    def forward(self, x, y):
        return torch.where(y > 0, x, self.fill) * 2


def test_a_condition_adds_no_dependence():
    t = fs.trace(Where(), (torch.randn(2, 4), torch.randn(2, 4)), {"x": ABCD})
    imap = fs.interaction_map(t)
    out = next(n for n in t.graph.nodes if n.op == "output").args[0][0].meta["fxsurgery"]["deps"]
    assert labels_at(imap, out, (0, 1)) == {"x:b"}  # y only selects: zero derivative
    assert imap.labels_of("fill") == set()


class ParamThroughMoves(nn.Module):
    """A parameter sliced and transposed before it is used."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.w[:2].t()


def test_parameter_provenance_follows_movement():
    imap = fs.interaction_map(fs.trace(ParamThroughMoves(), (torch.randn(1, 4),), {"x": ABCD}))
    assert element(imap, "w", (1, 3)) == {"x:d"}
    assert element(imap, "w", (2, 3)) == set()  # row 2 is sliced away: it meets nothing
    assert key(imap, "w", (1, 2)) == ({"x:c"}, {"w[1]"})


class InPlace(nn.Module):
    def forward(self, x, y):
        h = x.clone()
        h.add_(y)  # later readers of h see y too
        return h * 1.0


def test_in_place_operators_update_their_argument():
    t = fs.trace(InPlace(), (torch.randn(2), torch.randn(2)))
    imap = fs.interaction_map(t)
    out = next(n for n in t.graph.nodes if n.op == "output").args[0][0].meta["fxsurgery"]["deps"]
    assert labels_at(imap, out, (0,)) == {"x", "y"}


class ParamUsedTwice(nn.Module):
    """A parameter concatenated with itself, then moved again (rotary embeddings do this)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return x * torch.cat([self.w, self.w]).unsqueeze(0)


def test_a_parameter_moved_after_being_used_twice_keeps_its_provenance():
    imap = fs.interaction_map(fs.trace(ParamUsedTwice(), (torch.randn(3, 4),), {"x": ABCD}))
    assert element(imap, "w", (0,)) == {"x:a", "x:c"}
    assert element(imap, "w", (1,)) == {"x:b", "x:d"}
