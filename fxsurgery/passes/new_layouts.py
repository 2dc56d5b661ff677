"""Placing a change in one layout: the new sequence of parts and the new sizes of its axes.

The new sequence puts the members in their new order. A run of positions holding one member
each (a feature or unit axis) or B members each (the heads axis of an attention) takes the
members it owns in the new order, in blocks of B; positions without the class (other groups
concatenated along the same axis) stay around it. Other structures a graph builds out of one
axis are recognised too, each for a reason named where it is handled: blocks that pair members
inside each head (rotary embeddings' rotate_half), a value holding the same offsets of every
head (a sliced half), positions that each hold members of every head (a rotary frequency),
positions holding members out of their own order.

When several axes vary jointly (a view that splits units into heads), the axis that takes the
change is the one whose size can change while every old position keeps its coordinates along
the others (and, of several, the one where it keeps them all: q/k/v thirds grow in place).

`coupled_order`: two classes that index the same positions one by one (a residual stream: the
embedding's units and every layer's output units added into it) must change together.
"""
from __future__ import annotations

from .layouts import ClassKey, Layout, Order, SizingError, _cls, _prod

__all__ = ["resize_parts", "new_sizes", "coupled_order"]


def resize_parts(lay: Layout, order: Order, where: str) -> list:
    """The new reduced sequence of parts (frozensets; new members as negative numbers)."""
    parts = lay.parts
    nonempty = [i for i, p in enumerate(parts) if p]
    if not nonempty:
        return list(parts)
    s, e = nonempty[0], nonempty[-1] + 1
    if len(nonempty) != e - s:
        raise SizingError(f"{where}: the positions of {_cls(order.cls)} are interleaved with other positions; "
                          "the change cannot be placed")
    run = parts[s:e]
    B = len(run[0])
    if any(len(p) != B for p in run) or len(frozenset().union(*run)) != B * len(run):
        raise SizingError(f"{where}: the positions of {_cls(order.cls)} overlap (each holds several members "
                          "shared with others); the change cannot be placed")
    present = frozenset().union(*run)
    strided = _strided_subset(run, present, order, lay.class_size)
    if strided is not None:
        return list(parts[:s]) + strided + list(parts[e:])
    # The members this run owns in the new order: its old members, and the new members that
    # follow one of them (or lead the order, when the run holds the first old member).
    first_old = next((m for m in order.members if m >= 0), None)
    owner = first_old in present if first_old is not None else True
    tokens = []
    for m in order.members:
        if m >= 0:
            owner = m in present
            if owner:
                tokens.append(m)
        elif owner:
            tokens.append(m)
    if len(tokens) % B:
        raise SizingError(f"{where}: takes {_cls(order.cls)} in blocks of {B} (heads, gates), but the change "
                          f"leaves {len(tokens)} members there, not a multiple of {B}")
    blocks = [frozenset(tokens[i:i + B]) for i in range(0, len(tokens), B)]
    old_blocks = set(run)
    bad = next((blk for blk in blocks if not (blk in old_blocks or all(m < 0 for m in blk))), None)
    if bad is None:
        firsts = [min(blk) for blk in run]
        if firsts != sorted(firsts):
            # The positions hold the members out of their own order (rotary's rotate_half puts
            # the second half of each head first): old positions stay where they are, new
            # blocks go before the old one they precede in the order. (Positions in member
            # order follow the new order instead: that is what a reordering asks.)
            blocks = _keep_positions(run, blocks, old_blocks)
    if bad is not None:
        patterned = _pattern_blocks(run, tokens, B)
        if patterned is None:
            patterned = _transversal_blocks(run, tokens)
        if patterned is None:
            raise SizingError(f"{where}: takes {_cls(order.cls)} in blocks of {B} (heads, gates); the change "
                              f"breaks a block ({sorted(bad)}): add or remove whole blocks")
        blocks = patterned
    return list(parts[:s]) + blocks + list(parts[e:])


def _strided_subset(run: list, present: frozenset, order: Order, size: int) -> list | None:
    """A value that holds the same offsets R of every group of P consecutive members (the second
    half of each head's dimensions, sliced off for rotary embeddings): when the order keeps
    every old member and adds whole groups at the end, the new positions are the old ones
    followed by the offsets R of each new group, in the old positions' pattern. None when the
    members present are not such a subset (then they are a range, handled by ownership)."""
    if not size or len(present) == size or max(present) - min(present) + 1 == len(present):
        return None
    for P in range(2, size):
        if size % P:
            continue
        R = sorted({m % P for m in present})
        if present != frozenset(g * P + r for g in range(size // P) for r in R):
            continue
        old = [m for m in order.members if m >= 0]
        new = [m for m in order.members if m < 0]
        if old != list(range(size)) or order.members[:size] != old or len(new) % P:
            return None
        patterns = [sorted(m % P for m in part) for part in run if all(m < P for m in part)]
        return list(run) + [frozenset(chunk[r] for r in pat)
                            for chunk in (new[i:i + P] for i in range(0, len(new), P)) for pat in patterns]
    return None


def _keep_positions(run: list, blocks: list, old_blocks: set) -> list:
    survivors = set(blk for blk in blocks if blk in old_blocks)
    before: dict = {}
    pending = []
    for blk in blocks:
        if blk in old_blocks:
            before[blk] = pending
            pending = []
        else:
            pending.append(blk)
    out = []
    for blk in run:
        if blk in survivors:
            out.extend(before.get(blk, []))
            out.append(blk)
    return out + pending


def _pattern_blocks(run: list, tokens: list, B: int) -> list | None:
    """Blocks that are not runs of consecutive members but follow one pattern within each
    group of P consecutive members (rotary embeddings pair member d with d + head_dim / 2
    inside each head): the new order must then come in whole groups, and a group of new
    members gets the old groups' pattern. None when there is no such P."""
    members = sorted(frozenset().union(*run))
    rank = {m: i for i, m in enumerate(members)}
    for P in range(2 * B, len(members) + 1, B):
        if len(members) % P:
            continue
        group_of = [{rank[m] // P for m in part} for part in run]
        if any(len(g) != 1 for g in group_of):
            continue
        groups = [next(iter(g)) for g in group_of]
        if groups != sorted(groups):      # each group's positions together, groups in order
            continue
        pattern = [tuple(sorted(rank[m] % P for m in part)) for part, g in zip(run, groups) if g == 0]
        per_group = {}
        for part, g in zip(run, groups):
            per_group.setdefault(g, []).append(tuple(sorted(rank[m] % P for m in part)))
        if any(p != pattern for p in per_group.values()):
            continue
        if len(tokens) % P:
            return None
        by_members = {frozenset(members[g * P:(g + 1) * P]): g for g in per_group}
        blocks = []
        for i in range(0, len(tokens), P):
            chunk = tokens[i:i + P]
            if all(m >= 0 for m in chunk) and frozenset(chunk) in by_members:
                g = by_members[frozenset(chunk)]
                blocks.extend(part for part, gg in zip(run, groups) if gg == g)
            elif all(m < 0 for m in chunk):
                blocks.extend(frozenset(chunk[r] for r in p) for p in pattern)
            else:
                return None
        return blocks
    return None


def _transversal_blocks(run: list, tokens: list) -> list | None:
    """Positions that each hold the same pattern of members from every group of P consecutive
    members (the head_dim axis of a [heads, head_dim] split seen from one head_dim position, a
    rotary frequency met by every head): a change in whole groups keeps the number of
    positions, and each position takes its pattern from the new groups too."""
    members = sorted(frozenset().union(*run))
    rank = {m: i for i, m in enumerate(members)}
    for P in range(1, len(members)):
        if len(members) % P or len(members) // P < 2:
            continue
        n_groups = len(members) // P
        patterns = []
        for part in run:
            by_group: dict[int, set] = {}
            for m in part:
                by_group.setdefault(rank[m] // P, set()).add(rank[m] % P)
            if len(by_group) != n_groups or len({frozenset(v) for v in by_group.values()}) != 1:
                break
            patterns.append(sorted(next(iter(by_group.values()))))
        else:
            if len(tokens) % P:
                return None
            chunks = [tokens[i:i + P] for i in range(0, len(tokens), P)]
            new = [c for c in chunks if all(m < 0 for m in c)]
            if any(not all(m < 0 for m in c) and not all(m >= 0 for m in c) for c in chunks):
                return None
            kept = frozenset(m for c in chunks if all(m >= 0 for m in c) for m in c)
            if kept != frozenset(members):
                return None   # whole old groups removed: not handled here
            return [frozenset(part) | frozenset(c[r] for c in new for r in pat) for part, pat in zip(run, patterns)]
    return None


def new_sizes(lay: Layout, new_parts: list, where: str) -> tuple:
    """New sizes of the layout's axes such that every old position keeps its coordinates along
    the axes that keep their size."""
    a, b, c = lay.abc
    m = len(new_parts)
    if m == len(lay.parts):       # a reordering (or nothing): the same shape
        return lay.sizes
    pos_new = {p: i for i, p in enumerate(new_parts) if p and all(x >= 0 for x in p)}
    olds = [(i, p) for i, p in enumerate(lay.parts) if p and p in pos_new]
    found = []
    for a2, c2 in {(m // c, c) if m % c == 0 else None, (a, m // a) if m % a == 0 else None} - {None}:
        if a2 != a and c2 != c:
            continue
        if c2 == c and any(i % c != pos_new[p] % c2 for i, p in olds):
            continue
        if a2 == a and any(i // c != pos_new[p] // c2 for i, p in olds):
            continue
        n2 = a2 * b * c2
        for k in range(len(lay.sizes)):
            rest = _prod(lay.sizes) // lay.sizes[k]
            if n2 % rest:
                continue
            sizes2 = lay.sizes[:k] + (n2 // rest,) + lay.sizes[k + 1:]
            if _keeps_coordinates(lay, sizes2, k, (a2, b, c2), pos_new, olds):
                found.append((sizes2, _keeps_coordinates(lay, sizes2, None, (a2, b, c2), pos_new, olds)))
    # Several axes could take the change (q/k/v thirds of 8 growing to 16, or 6 parts of 8):
    # the one where every old position keeps all its coordinates (the axis grows at its end
    # within each part) is the reading that keeps the parts what they were.
    exact = sorted({f for f, same in found if same})
    found = exact if len(exact) == 1 else sorted({f for f, _ in found})
    if len(found) != 1:
        raise SizingError(f"{where}: cannot tell how the axes {lay.axes} of sizes {lay.sizes} change "
                          f"({'no' if not found else 'several'} consistent shapes: {found})")
    return found[0]


def _keeps_coordinates(lay, sizes2, k, abc2, pos_new, olds) -> bool:
    a, b, c = lay.abc
    _, _, c2 = abc2
    for q, p in olds:
        q2 = pos_new[p]
        for r in range(b):
            old_flat = (q // c) * b * c + r * c + q % c
            new_flat = (q2 // c2) * b * c2 + r * c2 + q2 % c2
            o, n = _unravel(old_flat, lay.sizes), _unravel(new_flat, sizes2)
            if any(o[d] != n[d] for d in range(len(o)) if d != k):   # k=None: every axis
                return False
    return True


def _unravel(i: int, sizes) -> list:
    out = []
    for s in reversed(sizes):
        out.append(i % s)
        i //= s
    return out[::-1]


def coupled_order(lay_k: Layout, lay_j: Layout, order: Order, new_parts: list, cls_j: ClassKey,
                  counter) -> tuple[Order, dict] | None:
    """When class j indexes the same positions one by one as the changed class k (and holds all
    its members there), the order j must follow, and which member of k each of j's stands
    for; None otherwise."""
    if (lay_j.axes != lay_k.axes or lay_j.abc != lay_k.abc or not lay_j.covers or not lay_j.singletons
            or not lay_k.singletons or len(lay_j.parts) != len(lay_k.parts)):
        return None
    if any(bool(pj) != bool(pk) for pj, pk in zip(lay_j.parts, lay_k.parts)):
        return None
    j_of_k = {next(iter(pk)): next(iter(pj)) for pj, pk in zip(lay_j.parts, lay_k.parts) if pk}
    members = []
    for p in new_parts:
        if not p:
            continue
        (m,) = tuple(p)
        members.append(j_of_k[m] if m >= 0 else next(counter))
    return Order(cls_j, members), {j: k for k, j in j_of_k.items()}
