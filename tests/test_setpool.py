"""The label-set pool against a reference of Python frozensets: every batched operation (interning,
unions, segment unions, reductions, membership) gives the set the reference gives, equal sets
get one id whatever the path that built them, and labels made as ranges read back as Labels."""
import random

import pytest
import torch

import fxsurgery as fs
from fxsurgery.labels import EMPTY, SetPool


def _pool_with_sets(seed=0, n_labels=60, n_sets=80):
    rng = random.Random(seed)
    pool = SetPool()
    pool.label_range("feature", "x", n_labels, [f"f{i}" for i in range(n_labels)])
    refs = [frozenset(rng.sample(range(n_labels), rng.randint(0, 6))) for _ in range(n_sets)]
    ids = [pool.intern(s) for s in refs]
    return pool, refs, ids, rng


def test_interning_is_canonical_and_reads_back():
    pool, refs, ids, _ = _pool_with_sets()
    for s, i in zip(refs, ids):
        assert pool.sets[i] == s
        assert pool.intern(sorted(s, reverse=True)) == i  # any order, same id
    assert len({i for i in ids}) == len(set(refs))
    assert pool.intern([]) == EMPTY
    assert pool.intern([5]) == pool.singleton(fs.Label("feature", "x", "f5", 5))


def test_batched_unions_equal_the_reference():
    pool, refs, ids, rng = _pool_with_sets(1)
    a = torch.tensor([rng.randrange(len(ids)) for _ in range(300)])
    b = torch.tensor([rng.randrange(len(ids)) for _ in range(300)])
    got = pool.union_pairs(torch.tensor(ids)[a], torch.tensor(ids)[b])
    for i, j, g in zip(a.tolist(), b.tolist(), got.tolist()):
        assert pool.sets[g] == refs[i] | refs[j]
        assert g == pool.intern(refs[i] | refs[j])  # a union is the interned set, not a copy
    # a subset united with its superset is the superset's id (the shortcut), both ways round
    big = pool.intern(range(0, 30))
    small = pool.intern([3, 7, 29])
    assert pool.union(small, big) == big and pool.union(big, small) == big
    assert pool.union(small, pool.intern([3, 31])) == pool.intern([3, 7, 29, 31])


def test_segment_union_reduce_and_union_many():
    pool, refs, ids, rng = _pool_with_sets(2)
    idt = torch.tensor(ids)
    seg = torch.tensor([rng.randrange(7) for _ in ids])
    got = pool.segment_union(idt, seg, 9)
    for s in range(9):
        want = frozenset().union(*[refs[k] for k in range(len(ids)) if int(seg[k]) == s])
        assert pool.sets[int(got[s])] == want
    grid = idt[:60].reshape(3, 4, 5)
    red = pool.reduce_ids(grid, [0, 2])
    assert red.shape == (1, 4, 1)
    for j in range(4):
        want = frozenset().union(*[refs[ids.index(int(v))] for v in grid[:, j, :].reshape(-1)])
        assert pool.sets[int(red[0, j, 0])] == want
    assert pool.reduce_ids(grid, [1], keepdim=False).shape == (3, 5)
    assert pool.sets[pool.union_many(ids[:10])] == frozenset().union(*refs[:10])


def test_membership_tables():
    pool, refs, ids, _ = _pool_with_sets(3)
    table = pool.contains_table(7)
    for s, i in zip(refs, ids):
        assert bool(table[i]) == (7 in s)
    q = torch.tensor(ids)
    assert pool.contains(q, torch.full_like(q, 7)).tolist() == [7 in s for s in refs]


def test_label_ranges_read_back_as_labels():
    pool = SetPool()
    ids = pool.label_ids("category", "tok", ["a", "b", "c"])
    assert pool.label_ids("category", "tok", ["a", "b", "c"]).tolist() == ids.tolist()  # described twice
    units = pool.unit_label_ids("fc", 3)
    more = pool.unit_label_ids("fc", 5)  # the axis seen wider later: the first three are the same labels
    assert more[:3].tolist() == units.tolist()
    assert pool.labels[int(more[4])] == fs.Label("unit", "fc", "4", 4)
    assert pool.labels[int(ids[1])] == fs.Label("category", "tok", "b", 1)
    assert pool.find_label(fs.Label("unit", "fc", "4", 4)) == int(more[4])
    assert pool.find_label(fs.Label("unit", "fc", "9", 9)) is None
    assert fs.Label("category", "tok", "c", 2) in pool.labels
    assert list(pool.labels) == [pool.labels[i] for i in range(len(pool.labels))]
    assert pool.class_sizes() == {("category", "tok"): 3, ("unit", "fc"): 5}
    # a single label asked for by value joins the group without disturbing its ranges
    lone = pool.label_id(fs.Label("unit", "fc", "7", 7))
    assert pool.labels[lone] == fs.Label("unit", "fc", "7", 7)
    assert pool.unit_label_ids("fc", 8).tolist()[7] == lone
    assert pool.sets[pool.singletons(ids)[2].item()] == {int(ids[2])}
    with pytest.raises(IndexError, match="out of range"):
        pool.labels[10 ** 6]


def test_the_python_and_tensor_paths_share_one_index():
    # Small batches are interned in Python, large ones in tensor code: the same set must get
    # the same id whichever path met it first (their hashes agree bit for bit).
    from fxsurgery.setpool import SMALL
    pool, _, _, rng = _pool_with_sets(4, n_sets=0)
    refs = [sorted(rng.sample(range(60), rng.randint(2, 5))) for _ in range(3 * SMALL)]
    members = torch.tensor([m for s in refs for m in s])
    segment = torch.tensor([k for k, s in enumerate(refs) for _ in s])
    big = pool.intern_segments(members, segment, len(refs)).tolist()  # tensor path
    assert [pool.intern(s) for s in refs] == big                      # Python path finds them
    fresh = [sorted(rng.sample(range(60), 7)) for _ in range(2 * SMALL)]
    small = [pool.intern(s) for s in fresh]                           # Python path first
    m2 = torch.tensor([m for s in fresh for m in s])
    s2 = torch.tensor([k for k, s in enumerate(fresh) for _ in s])
    assert pool.intern_segments(m2, s2, len(fresh)).tolist() == small
    assert len(pool.sets) == 1 + 60 + len({tuple(s) for s in refs} | {tuple(s) for s in fresh})


def test_table_agrees_with_a_dict_through_growth_collisions_and_long_probes():
    # Keys crowd into few slots (k1 from a small range, k2 repeated) and batches span the
    # tensor probe rounds, the Python tail of the last few keys and the table's growth.
    from fxsurgery._table import Table
    rng = random.Random(5)
    table, ref = Table(16), {}
    for size in [1, 3, 40, 700, 5, 2500, 60, 4000]:
        keys = list(dict.fromkeys((rng.randrange(40), rng.choice([7, -1, 1 << 40, rng.getrandbits(62)]))
                                  for _ in range(size)))
        keys = [k for k in keys if k not in ref]
        values = list(range(len(ref), len(ref) + len(keys)))
        table.put(torch.tensor([a for a, _ in keys], dtype=torch.int64),
                  torch.tensor([b for _, b in keys], dtype=torch.int64), torch.tensor(values, dtype=torch.int64))
        ref.update(zip(keys, values))
        asked = list(ref) + [(rng.randrange(50), rng.getrandbits(62)) for _ in range(300)]
        rng.shuffle(asked)
        got = table.get(torch.tensor([a for a, _ in asked]), torch.tensor([b for _, b in asked]))
        assert got.tolist() == [ref.get(k, -1) for k in asked]
    assert table.n == len(ref)


def test_the_small_path_reads_what_large_tensor_batches_did_not_copy_to_it():
    # Batches of more than MIRROR new sets or unions stay in the tensor tables only: the small
    # path must find them there, neither storing a set twice nor giving a union another id.
    from fxsurgery.setpool import MIRROR, SMALL
    pool = SetPool()
    a = pool.singletons(pool.unit_label_ids("gate", 3 * MIRROR))
    b = pool.singletons(pool.unit_label_ids("up", 3 * MIRROR))
    pairs = pool.union_pairs(a, b)                                      # tensor path, not copied
    n = pool.n_sets
    assert pool._sets_unmirrored and pool._unions_unmirrored
    recomputed = []
    intern_py = pool._intern_py
    pool._intern_py = lambda sets: recomputed.append(sets) or intern_py(sets)
    for k in range(0, 3 * MIRROR, 97):
        assert pool.union(int(a[k]), int(b[k])) == int(pairs[k])        # small union path
    assert not recomputed                                               # read from the memo
    for k in range(0, 3 * MIRROR, 97):
        assert pool.intern([int(pool.members_of(int(pairs[k]))[0]), 3 * MIRROR + k]) == int(pairs[k])
    few = pool.union_pairs(a[:SMALL], b[:SMALL])                        # a small batch at once
    assert few.tolist() == pairs[:SMALL].tolist() and pool.n_sets == n
    assert pool.sets[int(pairs[5])] == {5, 3 * MIRROR + 5}


def test_membership_searches_runs_of_every_length():
    rng = random.Random(6)
    pool = SetPool()
    pool.label_range("feature", "x", 500, [f"f{i}" for i in range(500)])
    refs = [frozenset(rng.sample(range(500), rng.choice([0, 1, 2, 3, 7, 64, 65, 300, 500]))) for _ in range(40)]
    ids = [pool.intern(s) for s in refs]
    q = [(rng.randrange(len(ids)), rng.randrange(500)) for _ in range(3000)]
    q += [(k, m) for k, s in enumerate(refs) for m in (min(s, default=0), max(s, default=0))]
    got = pool.contains(torch.tensor([ids[k] for k, _ in q]), torch.tensor([m for _, m in q]))
    assert got.tolist() == [m in refs[k] for k, m in q]
    for k in range(len(ids)):  # one set asked for every label (one search of its run)
        assert pool.contains(torch.full((500,), ids[k]), torch.arange(500)).tolist() == [m in refs[k] for m in range(500)]
    grid = pool.contains(torch.tensor(ids[:4]).reshape(4, 1), torch.arange(3).reshape(1, 3))  # broadcasts
    assert grid.tolist() == [[m in refs[k] for m in range(3)] for k in range(4)]


def test_unions_of_sets_in_order_are_hashed_from_theirs():
    """Pairs whose labels lie one set before the other (a stream gaining a layer's units) are
    united end to end with summed hashes: same ids as interning the union, stored hashes equal
    to the members' hash for every set however it was made."""
    from fxsurgery._table import set_hash
    rng = random.Random(8)
    pool = SetPool()
    pool.label_range("unit", "h", 4000)
    lows = [frozenset(rng.sample(range(2000), rng.randint(1, 9))) for _ in range(300)]
    highs = [frozenset(rng.sample(range(2000, 4000), rng.randint(1, 9))) for _ in range(300)]
    a = torch.tensor([pool.intern(x) for x in lows])
    b = torch.tensor([pool.intern(x) for x in highs])
    got = pool.union_pairs(torch.cat([a, b[:150]]), torch.cat([b, a[:150]]))   # both orders
    want = [lo | hi for lo, hi in zip(lows, highs)] + [lo | hi for lo, hi in zip(lows[:150], highs[:150])]
    assert [pool.sets[i] for i in got.tolist()] == want
    assert [pool.intern(x) for x in want] == got.tolist()     # one id per set, whatever the path
    n = pool.n_sets
    m, seg = pool.members(torch.arange(n))
    h1, h2 = set_hash(m, seg, n)
    assert torch.equal(pool._hash1.view(), h1) and torch.equal(pool._hash2.view(), h2)


@pytest.mark.parametrize("mask_run", [4096, 10 ** 9])   # a large run read as a mask / searched
def test_membership_in_one_large_set(monkeypatch, mask_run):
    import fxsurgery.setpool as setpool
    monkeypatch.setattr(setpool, "_MASK_RUN", mask_run)
    rng = random.Random(7)
    pool = SetPool()
    pool.label_range("unit", "h", 20000)
    big = frozenset(rng.sample(range(20000), 6000))
    sid = pool.intern(big)
    q = torch.tensor([rng.randrange(20000) for _ in range(5000)] + sorted(big)[:50] + [max(big), 19999, 0])
    got = pool.contains(torch.full_like(q, sid), q)
    assert got.tolist() == [int(m) in big for m in q]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_distinct_values_equal_torch_unique(dtype):
    # numpy's sort, or one pass when the values arrive sorted: the same values and inverse
    from fxsurgery._sort import sort, unique, unique_values
    g = torch.Generator().manual_seed(0)
    cases = [torch.zeros(0, dtype=dtype), torch.tensor([3], dtype=dtype)]
    for n in (2, 50, 3000):
        cases += [torch.randint(-9, 9, (n,), generator=g).to(dtype), torch.randint(-9, 9, (3, n), generator=g).to(dtype),
                  torch.sort(torch.randint(0, 20, (n,), generator=g)).values.to(dtype),
                  torch.randint(-2 ** 30, 2 ** 30, (n,), generator=g).to(dtype)]
    for x in cases:
        u, inv = unique(x)
        want_u, want_inv = torch.unique(x, return_inverse=True)
        assert torch.equal(u, want_u) and torch.equal(inv, want_inv) and u.dtype == dtype
        assert torch.equal(unique_values(x), want_u)
    distinct = torch.randperm(500, generator=g).to(dtype)
    values, order = sort(distinct)
    assert torch.equal(values, torch.arange(500, dtype=dtype)) and torch.equal(distinct[order], values)
    assert torch.equal(sort(values)[1], torch.arange(500))


def test_the_subset_shortcut_finds_every_subset_and_only_those():
    # A union where one set holds the other is that set, found without interning: pairs that
    # share first or last members, equal sizes, disjoint ranges and interleaved sets.
    pool = SetPool()
    pool.label_range("feature", "x", 40, [f"f{i}" for i in range(40)])
    big = pool.intern(range(5, 30))
    cases = {pool.intern([5, 29]): big, pool.intern([5, 6, 7]): big, pool.intern([28, 29]): big,
             pool.intern([17]): big, pool.intern([4, 10]): -1, pool.intern([10, 30]): -1,
             pool.intern([31, 32]): -1, pool.intern(range(6, 31)): -1, pool.intern([1, 3, 5]): -1}
    a = torch.tensor(sorted(cases))
    got = pool._subset_union(a, torch.full_like(a, big))
    assert got.tolist() == [cases[i] for i in a.tolist()]
    assert pool._subset_union(torch.full_like(a, big), a).tolist() == got.tolist()  # either side


def test_sets_and_unions_with_new_labels_are_found_again_whichever_path_stored_them():
    # A lookup is skipped for sets holding a label newer than any stored set's, and for pairs
    # with a set newer than any memoised pair's: what each path stores must move those bounds.
    from fxsurgery.setpool import SMALL
    rng = random.Random(7)
    pool = SetPool()
    pool.label_range("feature", "x", 500, [f"f{i}" for i in range(500)])

    def batch(lo, hi, n):
        refs = [sorted(rng.sample(range(lo, hi), rng.randint(2, 5))) for _ in range(n)]
        return refs, torch.tensor([m for r in refs for m in r]), torch.tensor([k for k, r in enumerate(refs) for _ in r])

    for lo, hi in [(0, 100), (100, 200)]:                   # tensor path, twice, newer labels
        refs, m, seg = batch(lo, hi, 3 * SMALL)
        ids = pool.intern_segments(m, seg, len(refs)).tolist()
        n = pool.n_sets
        assert pool.intern_segments(m.flip(0), seg.flip(0), len(refs)).tolist() == ids and pool.n_sets == n
    refs, m, seg = batch(300, 400, 3 * SMALL)
    small = [pool.intern(r) for r in refs]                 # Python path, newer labels still
    n = pool.n_sets
    assert pool.intern_segments(m, seg, len(refs)).tolist() == small and pool.n_sets == n
    fresh, _, _ = batch(400, 500, len(refs))               # stored sets each next to a newer one
    mixed = [r for pair in zip(refs, fresh) for r in pair]
    got = pool.intern_segments(torch.tensor([x for r in mixed for x in r]),
                               torch.tensor([k for k, r in enumerate(mixed) for _ in r]), len(mixed)).tolist()
    assert got[::2] == small and pool.n_sets == n + len({tuple(r) for r in fresh})
    a, b = torch.tensor(small[:2 * SMALL]), torch.tensor(small[SMALL:])
    first = pool.union_pairs(a, b)
    interned = []
    intern = pool.intern_segments
    pool.intern_segments = lambda *args: interned.append(args) or intern(*args)
    assert pool.union_pairs(b, a).tolist() == first.tolist() and not interned  # from the memo
