"""Tokens of hidden axes that the graph cuts into parts (heads x positions) are numbered by
arithmetic on one block per axis (`SplitBlock`); the plans must be what the one-entry-per-unit
numbering gave, and equal parts of the two sides must get one token."""
import itertools

import torch

import fxsurgery as fs
from fxsurgery.surgery import tokens as tokens_mod
from fxsurgery.surgery.splits import SplitBlock, digits


def test_equal_parts_get_one_token_and_distinct_parts_distinct_tokens():
    # old: 4 heads of 8 (rows r = head*8 + pos); new: 6 heads of 8, and 3 heads of 12 elsewhere
    for old, new in [((32, [8]), (48, [8])), ((24, [12]), (32, [8])), ((48, [16, 4]), (64, [16, 4]))]:
        blk = SplitBlock(100, {"old": old, "new": new})
        seen = {}
        for (n, chunks) in (old, new):
            toks = blk.tokens(torch.arange(n), chunks).tolist()
            for i, t in enumerate(toks):
                parts = digits(i, chunks)
                assert seen.setdefault(parts, t) == t          # equal parts: one token
                assert blk.parts(t) == parts                   # and it decodes back
                assert blk.token(parts) == t                   # one part tuple encodes the same
        assert len(set(seen.values())) == len(seen)            # distinct parts: distinct tokens
        assert all(100 <= t < 100 + blk.size for t in seen.values())
        for parts in seen:                                     # the label shows the old index first
            n, chunks = old
            i = blk.index(parts)
            assert digits(i, chunks if i < n and digits(i, chunks) == parts else new[1]) == parts


def _attention(heads, dim=8):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(heads * dim, heads, batch_first=True)
            self.out = torch.nn.Linear(heads * dim, 3)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0])
    torch.manual_seed(0)
    return Net().eval()


def test_plans_with_heads_added_are_those_of_the_unit_by_unit_numbering(monkeypatch):
    old, new = _attention(2), _attention(3)
    x = torch.randn(2, 5, 16)
    t_old = fs.trace(old, {"x": x}, {"x": None})
    t_new = fs.trace(new, {"x": torch.randn(2, 5, 24)}, {"x": None})
    with_blocks = fs.plan(t_old, t_new)
    monkeypatch.setattr(tokens_mod.LabelSpace, "_split_block", lambda self, group: None)
    without = fs.plan(t_old, t_new)
    assert str(with_blocks.table()) == str(without.table())
    for name, pp in without.params.items():
        a, b = with_blocks.params[name].match, pp.match
        for x_, y_ in itertools.zip_longest(a.blocks, b.blocks):
            assert torch.equal(x_.index, y_.index)
