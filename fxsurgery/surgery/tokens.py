"""Comparable label identities across two interaction maps.

The old and new maps number their labels independently. A *token* is a label's identity for
surgery: features, categories and inputs compare by (kind, input, name), never by position, so
that a reordered feature is found at its new place; units compare by (hidden axis, position)
after the user's renames and unit maps. Label sets become frozensets of tokens, memoised per
set id.
"""
from __future__ import annotations

import bisect

import numpy
import torch

from ..labels import Label
from ..setpool import SetPool
from .._sort import isin, unique
from .renames import rename_prefix
from .splits import SplitBlock, digits
from .units import category_units, check_units, unit_sizes

__all__ = ["LabelSpace", "describe"]


class LabelSpace:
    """Tokens of the labels of an old and a new map.

    `units`: hidden-axis group -> the old positions that survive, in new order (new unit k is
    old unit units[group][k]); groups are named as in the new model (the old name is accepted).
    A string value declares an alias instead: `units={"mid": "fc1"}` says that the new hidden
    axis `mid` belongs to an inserted layer whose unit j stands for unit j of `fc1` (new-side
    labels of `mid` get the tokens of `fc1`'s units); see `unit_aliases`.
    """

    def __init__(self, old_map, new_map, rename=None, units=None, splits=None):
        old_pool, new_pool = old_map.pool, new_map.pool
        self.pools = {"old": old_pool, "new": new_pool}
        self.rename = dict(rename or {})
        self._ids: dict[tuple, int] = {}
        self.info: dict[int, Label] = {}     # token -> a label to show for it (block tokens: made on demand)
        self._n_tokens = 0
        self._token_tensors: dict[str, torch.Tensor] = {}
        self._token_masks: dict[str, torch.Tensor] = {}
        self._memo_t: dict[str, torch.Tensor] = {}
        self._categories: list[int] = []
        self.old_groups = unit_sizes(old_pool)
        self.new_groups = unit_sizes(new_pool)
        # new group -> {old pos: new pos}; inserted new group -> the group it stands for
        self.unit_maps, self.unit_aliases = check_units(units, self.rename, self.old_groups, self.new_groups)
        # Units that stand for categories (a tied output projection) match by category.
        old_cat = {rename_prefix(g, self.rename): v for g, v in category_units(old_map).items()}
        new_cat = category_units(new_map)
        self.category_units = {"old": {g: v for g, v in old_cat.items() if g in new_cat and g not in self.unit_maps},
                               "new": {g: v for g, v in new_cat.items() if g in old_cat and g not in self.unit_maps}}
        # Unit axes the graph cuts into parts (fused q/k/v, heads) match part by part.
        old_split, new_split = splits or ({}, {})
        old_split = {rename_prefix(g, self.rename): c for g, c in old_split.items()}
        both = {g for g in old_split if g in new_split and len(old_split[g]) == len(new_split[g])
                and g not in self.unit_maps}
        self.unit_splits = {"old": {g: old_split[g] for g in both}, "new": {g: new_split[g] for g in both}}
        # Plain hidden axes (no alias, categories, parts or unit map) number their units in one
        # block of tokens each: ("u", group, index) is block start + index, no entry per unit.
        self._blocks: dict[str, tuple[int, int]] = {}    # group -> (first token, size)
        self._block_starts: list[int] = []
        self._block_groups: list[str] = []
        self._split_blocks: dict[str, SplitBlock | None] = {}   # group -> its block (None: none)
        self._block_split: list[SplitBlock | None] = []         # per block: its SplitBlock, if any
        self.label_tokens = {"old": self._range_tokens(old_pool, "old"), "new": self._range_tokens(new_pool, "new")}
        old_set, new_set = set(self.label_tokens["old"]), set(self.label_tokens["new"])
        self.new_only = frozenset(new_set - old_set)
        self.removed = frozenset(old_set - new_set)
        self.categories = frozenset(t for t in self._categories if t in old_set or t in new_set)
        self.removed_data = frozenset(self.removed - self.categories)
        # Token sets are interned in a pool of their own whose labels are the tokens: its set
        # ids are the token-set numbers (0 the empty set, 1 + t the set {t}), whole batches are
        # interned in tensor code, and a frozenset exists only for a set someone looks into
        # (a 32-layer decoder's keys hold millions of sets; one Python object each was most of
        # a plan).
        self._tpool = SetPool()
        self._tpool.label_range("unit", "token", self._n_tokens)
        self.tset_tokens = self._tpool.sets     # number -> frozenset of tokens, made on demand
        self._flag_t = torch.zeros((0, 4), dtype=torch.int8)   # per number: flags, -1 unknown
        self._strip_masks: dict[frozenset, torch.Tensor] = {}

    # tokens ---------------------------------------------------------------------------
    def _intern(self, key: tuple, label: Label) -> int:
        if key[0] == "u":   # every (group, index) unit token lives in its group's block
            start, size = self._block(key[1])
            if 0 <= key[2] < size:
                return start + key[2]
        if key[0] == "us":  # so does every (group, parts) of an axis cut into parts
            blk = self._split_block(key[1])
            t = blk.token(key[2]) if blk is not None else None
            if t is not None:
                return t
        t = self._ids.get(key)
        if t is None:
            t = self._ids[key] = self._n_tokens
            self._n_tokens += 1
            self.info[t] = label
            if label.kind == "category":
                self._categories.append(t)
        return t

    def _plain(self, group: str, side: str) -> bool:
        """Whether a unit group's tokens are (group, index) with nothing to look up."""
        if side == "new" and group in self.unit_aliases:
            return False
        return group not in self.category_units[side] and group not in self.unit_splits[side] \
            and (side == "new" or group not in self.unit_maps)

    def _block(self, group: str) -> tuple[int, int]:
        b = self._blocks.get(group)
        if b is None:
            size = max(self.new_groups.get(group, 0),
                       max((n for g, n in self.old_groups.items() if rename_prefix(g, self.rename) == group),
                           default=0))
            b = self._blocks[group] = (self._n_tokens, size)
            self._block_starts.append(self._n_tokens)
            self._block_groups.append(group)
            self._block_split.append(None)
            self._n_tokens += size
        return b

    def _split_block(self, group: str) -> SplitBlock | None:
        """The block of a group cut into parts on both sides (None when its radices would
        number far more tokens than it has units: then parts are looked up one by one)."""
        if group in self._split_blocks:
            return self._split_blocks[group]
        n_old = max((n for g, n in self.old_groups.items() if rename_prefix(g, self.rename) == group), default=0)
        sides = {"old": (n_old, self.unit_splits["old"][group]), "new": (self.new_groups.get(group, 0),
                                                                        self.unit_splits["new"][group])}
        blk = SplitBlock(self._n_tokens, sides)
        if blk.size > 4 * max(n_old, sides["new"][0]) + 64:
            blk = None
        else:
            self._block_starts.append(self._n_tokens)
            self._block_groups.append(group)
            self._block_split.append(blk)
            self._n_tokens += blk.size
        self._split_blocks[group] = blk
        return blk

    def _range_tokens(self, pool, side: str) -> list[int]:
        """The token of every label of a pool, range by range: a plain unit range is arithmetic
        on its group's block, the others are looked up label by label."""
        out: list[int] = []
        for r in pool.all_ranges():
            group = r.group if side == "new" or r.kind != "unit" else rename_prefix(r.group, self.rename)
            if r.kind == "unit" and r.names is None and self._plain(group, side):
                start, size = self._block(group)
                if r.first + r.n <= size:
                    out.extend(range(start + r.first, start + r.first + r.n))
                    continue
            if r.kind != "unit":
                ids = self._ids
                for k in range(r.n):   # one dict read per label; a Label only for a new token
                    t = ids.get(("x", r.kind, r.group, r.names[k] if r.names is not None else str(r.first + k)))
                    out.append(t if t is not None else self._token(r.label(k), side))
                continue
            cu = self.category_units[side].get(group)
            if r.kind == "unit" and r.names is None and cu is not None \
                    and not (side == "new" and group in self.unit_aliases):
                out.extend(self._category_unit_tokens(r, group, cu, side))
                continue
            chunks = self.unit_splits[side].get(group)
            if r.kind == "unit" and r.names is None and chunks is not None and cu is None \
                    and not (side == "new" and group in self.unit_aliases):
                out.extend(self._split_unit_tokens(r, group, chunks))
                continue
            out.extend(self._token(r.label(k), side) for k in range(r.n))
        return out

    def _split_unit_tokens(self, r, group: str, chunks: list[int]) -> list[int]:
        """`_token` of the units of an axis cut into parts (heads): the parts of every unit
        computed in tensor code, then one dict read per unit and a Label only for a new token."""
        index = torch.arange(r.first, r.first + r.n, dtype=torch.int64)
        blk = self._split_block(group)
        if blk is not None:   # arithmetic on the group's block: no entry per unit
            return blk.tokens(index, chunks).tolist()
        cols = []
        for c in chunks:   # digits(), column by column
            cols.append((index // c).tolist())
            index = index % c
        cols.append(index.tolist())
        ids, out = self._ids, []
        for k, parts in enumerate(zip(*cols)):
            key = ("us", group, parts)
            t = ids.get(key)
            out.append(t if t is not None else
                       self._intern(key, Label("unit", group, ".".join(map(str, parts)), r.first + k)))
        return out

    def _category_unit_tokens(self, r, group: str, cu: dict, side: str) -> list[int]:
        """`_token` of a tied vocabulary's units (unit r of `group` is category cu[r]), with a
        dict read per unit and a Label only for a new token."""
        ids, out = self._ids, []
        for k in range(r.n):
            index = r.first + k
            cat = cu.get(index)
            if cat is None:
                out.append(self._token(r.label(k), side))
                continue
            key = ("uc", group, cat.group, cat.name)
            t = ids.get(key)
            out.append(t if t is not None else self._intern(key, Label("unit", group, cat.name, index)))
        return out

    def _token(self, lab: Label, side: str) -> int:
        if lab.kind != "unit":
            return self._intern(("x", lab.kind, lab.group, lab.name), lab)
        if side == "new" and lab.group in self.unit_aliases:
            # An inserted layer's unit j is the unit j of the group it stands for.
            target = self.unit_aliases[lab.group]
            tlab = _unit_label(self.pools["new"], target, lab.index)
            return self._token(tlab, "new")
        group = lab.group if side == "new" else rename_prefix(lab.group, self.rename)
        cat = self.category_units[side].get(group, {}).get(lab.index)
        if cat is not None:
            return self._intern(("uc", group, cat.group, cat.name), Label("unit", group, cat.name, lab.index))
        chunks = self.unit_splits[side].get(group)
        if chunks is not None:
            parts = digits(lab.index, chunks)
            return self._intern(("us", group, parts), Label("unit", group, ".".join(map(str, parts)), lab.index))
        if side == "new":
            return self._intern(("u", lab.group, lab.index), lab)
        umap = self.unit_maps.get(group)
        if umap is None:
            index = lab.index
        else:
            index = umap.get(lab.index)
            if index is None:  # pruned: a label the new model lacks
                return self._intern(("pruned", group, lab.index), lab)
        return self._intern(("u", group, index), Label("unit", group, str(index), index))

    def tokens(self, side: str, set_id: int) -> frozenset:
        """The tokens of one set id of one side."""
        return self.tset_tokens[self.tset(side, set_id)]

    # token sets: label sets of either side, numbered once -------------------------------
    def tset(self, side: str, set_id: int) -> int:
        """The number of the token set of a set id (equal sets of both sides: equal numbers)."""
        memo = self._set_memo(side)   # the one memo, shared with `translate`
        t = int(memo[set_id])
        if t < 0:
            t = int(self.translate(side, torch.tensor([set_id], dtype=torch.int64))[1][0])
        return t

    def translate(self, side: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-set numbers of an id tensor (same shape), and the distinct numbers found."""
        uniq, inverse = unique(ids)
        memo = self._set_memo(side)
        got = memo.index_select(0, uniq)
        miss = got < 0
        if bool(miss.any()):
            todo = uniq.masked_select(miss)
            members, seg = self.pools[side].members(todo)
            toks = self.token_ids(side).index_select(0, members)
            memo.index_copy_(0, todo, self._tpool.intern_segments(toks, seg, todo.numel()))
            got = memo.index_select(0, uniq)
        return got.index_select(0, inverse.reshape(-1)).reshape(inverse.shape), got

    def stripped(self, tsets: torch.Tensor, universal: frozenset, extra: frozenset) -> torch.Tensor:
        """Each token set of `tsets` without the tokens of `universal`, with those of `extra`
        added, in tensor code (a vocabulary axis has a hundred thousand distinct sets)."""
        uniq, inverse = unique(tsets)
        members, seg = self._tpool.members(uniq)
        if universal:
            keep = ~self._mask_of(universal).index_select(0, members)
            members, seg = members.masked_select(keep), seg.masked_select(keep)
        if extra:
            more = torch.tensor(sorted(extra), dtype=torch.int64)
            members = torch.cat([members, more.repeat(uniq.numel())])
            seg = torch.cat([seg, torch.arange(uniq.numel()).repeat_interleave(more.numel())])
        out = self._tpool.intern_segments(members, seg, uniq.numel())
        return out.index_select(0, inverse.reshape(-1)).reshape(tsets.shape)

    def _mask_of(self, toks: frozenset) -> torch.Tensor:
        """Per token: is it in `toks` (the last few asked for are kept: the labels every element
        of a parameter holds are the same residual stream for a layer's q, k and v)."""
        m = self._strip_masks.get(toks)
        if m is None:
            m = torch.zeros(self._n_tokens, dtype=torch.bool)
            # numpy.fromiter reads the frozenset without a list (a stream's 260k tokens)
            m.index_fill_(0, torch.from_numpy(numpy.fromiter(toks, dtype=numpy.int64, count=len(toks))), True)
            if len(self._strip_masks) >= 4:
                self._strip_masks.pop(next(iter(self._strip_masks)))
            self._strip_masks[toks] = m
        return m

    def _set_memo(self, side: str) -> torch.Tensor:
        """Per set id of one side: its token-set number, -1 until asked (grown with the pool)."""
        memo = self._memo_t.get(side)
        n = self.pools[side].n_sets
        if memo is None or memo.numel() < n:
            grown = torch.full((n,), -1, dtype=torch.int64)
            if memo is not None:
                grown[:memo.numel()] = memo
            memo = self._memo_t[side] = grown
        return memo

    def _flags_of(self, tsets: torch.Tensor) -> torch.Tensor:
        """Per token-set number: (holds a new label, ... and all of them categories, holds a
        removed label, holds a removed feature, input or unit), computed once per number."""
        n = self._tpool.n_sets
        if self._flag_t.shape[0] < n:   # grown by half at least: the pool grows per parameter
            grown = torch.full((max(n, self._flag_t.shape[0] * 3 // 2), 4), -1, dtype=torch.int8)
            grown[:self._flag_t.shape[0]] = self._flag_t
            self._flag_t = grown
        got = self._flag_t.index_select(0, tsets)
        miss = got[:, 0] < 0
        if bool(miss.any()):
            todo = unique(tsets.masked_select(miss))[0]
            members, seg = self._tpool.members(todo)
            k = todo.numel()

            def count(mask):
                return torch.zeros(k, dtype=torch.int64).index_add_(
                    0, seg, mask.index_select(0, members).to(torch.int64))

            new = count(self.token_mask("new_only")) > 0
            new_other = count(self.token_mask("new_only") & ~self.token_mask("categories")) > 0
            gone = count(self.token_mask("removed")) > 0
            gone_data = count(self.token_mask("removed_data")) > 0
            self._flag_t.index_copy_(0, todo, torch.stack([new, new & ~new_other, gone, gone_data], 1).to(torch.int8))
            got = self._flag_t.index_select(0, tsets)
        return got.bool()

    def hits(self, tsets: torch.Tensor, which: int) -> list[int]:
        """The token sets of `tsets` (distinct numbers) whose flag `which` is set (see `flags`)."""
        if not tsets.numel():
            return []
        return tsets.masked_select(self._flags_of(tsets)[:, which]).tolist()

    def flags(self, tsets: torch.Tensor, uniq: torch.Tensor, which: int) -> torch.Tensor:
        """A flag of each token set of `tsets` (whose distinct values are `uniq`): 0 holds a new
        label, 1 ... and all of them categories, 2 holds a removed label, 3 holds a removed
        feature, input or unit."""
        hits = self.hits(uniq, which)
        if not hits:
            return torch.zeros(tsets.shape, dtype=torch.bool)
        if len(hits) == 1:
            return tsets == hits[0]
        return isin(tsets, hits)

    def token_ids(self, side: str) -> torch.Tensor:
        """The token of every label id of one side, as a tensor (for whole batches of members)."""
        t = self._token_tensors.get(side)
        if t is None:
            t = self._token_tensors[side] = torch.tensor(self.label_tokens[side], dtype=torch.int64)
        return t

    def token_mask(self, which: str) -> torch.Tensor:
        """Per token: is it in `which` ("new_only", "removed", "removed_data", "categories", or
        "gone": new or removed)."""
        t = self._token_masks.get(which)
        if t is None:
            toks = self.new_only | self.removed if which == "gone" else getattr(self, which)
            t = torch.zeros(self._n_tokens, dtype=torch.bool)
            if toks:
                t[torch.tensor(sorted(toks), dtype=torch.int64)] = True
            self._token_masks[which] = t
        return t

    def label(self, token: int) -> Label:
        lab = self.info.get(token)
        if lab is None:
            k = bisect.bisect_right(self._block_starts, token) - 1
            group, blk = self._block_groups[k], self._block_split[k]
            if blk is not None:
                parts = blk.parts(token)
                lab = self.info[token] = Label("unit", group, ".".join(map(str, parts)), blk.index(parts))
            else:
                index = token - self._block_starts[k]
                lab = self.info[token] = Label("unit", group, str(index), index)
        return lab

    def inserted(self, group: str) -> str | None:
        """The group an inserted hidden axis stands for (None if `group` is not an alias)."""
        return self.unit_aliases.get(group)


def _unit_label(pool, group: str, index: int) -> Label:
    """The new model's Label of unit `index` of `group` (found through the group's ranges)."""
    for r in pool.ranges("unit", group):
        if r.first <= index < r.first + r.n:
            return r.label(index - r.first)
    return Label("unit", group, str(index), index)


def describe(tokens, space: LabelSpace, limit: int = 3) -> str:
    """A short text for a set of tokens: `obs: armor, speed; fc1 +16 units`."""
    by_group: dict[tuple[str, str], list[Label]] = {}
    for t in tokens:
        lab = space.label(t)
        by_group.setdefault((lab.kind, lab.group), []).append(lab)
    parts = []
    for (kind, group), labs in sorted(by_group.items()):
        labs.sort(key=lambda l: (l.index, l.name))
        if kind == "unit":
            idx = [l.index for l in labs]
            if len(idx) <= limit:
                parts.append(f"{group}[{', '.join(map(str, idx))}]")
            else:
                parts.append(f"{len(idx)} units of {group}")
        elif kind == "input":
            parts.append(f"input {group}")
        else:
            names = [l.name for l in labs]
            shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit})" if len(names) > limit else "")
            parts.append(f"{group}: {shown}")
    return "; ".join(parts)
