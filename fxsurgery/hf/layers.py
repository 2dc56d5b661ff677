"""More layers: where they go, what the planner is told about them, and how each new layer
starts as the identity.

A config with more layers builds a model whose layer lists (`transformer.h`, `model.layers`,
`encoder.layer`: every `ModuleList` whose length the change moved) are longer. The old layers
keep their order; the new ones go at the positions asked for (the end by default), and the old
layers after them are renamed for the planner (`model.layers.1` -> `model.layers.2`).

A new layer adds its outputs into the residual stream through its last projections (the
attention's output projection, the MLP's down projection). The interaction map says which
ones, with no knowledge of the architecture: they are the new layer's hidden axes whose labels
reach parameters outside the new layer (the final norm, the later layers). Each is declared
to the planner as standing for the same axis of the layer it copies (`units={new: old}`), which
is what it is: the stream's position j. Zeroing those projections makes the layer write
nothing, so the model computes what it did (exactly, for pre-norm layers; a post-norm layer
renormalises the stream, which `fs.verify` then reports); the rest of the layer is a copy of
its neighbour ("copy") or keeps the new model's initialisation ("fresh"), and gradients reach
the zeroed projections from the first step. "stack" copies the neighbour whole, the
projections too: the function changes, and the plan says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..surgery.errors import SurgeryError
from ..surgery.issues import Issue
from ..surgery.renames import rename_prefix
from ..surgery.units import unit_sizes

__all__ = ["NEW_LAYERS", "LayerList", "layer_lists", "per_layer_fields", "place", "renames", "writer_aliases",
           "initialise", "groups_in_keys", "owned_parameters"]

NEW_LAYERS = ("copy", "fresh", "stack")


@dataclass
class LayerList:
    name: str                 # "model.layers"
    old_n: int
    new_n: int
    new_of_old: list          # old layer i is new layer new_of_old[i]
    source: dict              # new layer j (inserted) -> the old layer it copies

    @property
    def inserted(self) -> list[int]:
        return sorted(self.source)

    def prefix(self, j: int) -> str:
        return f"{self.name}.{j}"


def per_layer_fields(config, old_n: int, ll: "LayerList") -> dict:
    """Config fields that hold one entry per layer (Qwen2's `layer_types`, Gemma's sliding
    window pattern), in the new order: an added layer takes its source's entry."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == old_n and ll.new_n != old_n:
            out[key] = [value[i] for i in _order(ll)]
    return out


def _order(ll: "LayerList") -> list[int]:
    """For each new layer, the old layer whose entry it takes."""
    old_of_new = {j: i for i, j in enumerate(ll.new_of_old)}
    return [old_of_new.get(j, ll.source.get(j)) for j in range(ll.new_n)]


def layer_lists(old_model, new_model) -> list[tuple[str, int, int]]:
    """(name, old length, new length) of each ModuleList the new config lengthened or shortened."""
    old = {n: len(m) for n, m in old_model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    out = []
    for n, m in new_model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and n in old and len(m) != old[n]:
            out.append((n, old[n], len(m)))
    return out


def place(name: str, old_n: int, new_n: int, at) -> LayerList:
    """Where the new layers go: `at` is None (after the last), or the new model's index of each
    inserted layer (an int, or a list of them)."""
    added = new_n - old_n
    if added <= 0:
        if at is not None:
            raise SurgeryError(f"resize: layers_at={at!r} places new layers, but {name} goes from {old_n} to "
                               f"{new_n} layers")
        return LayerList(name, old_n, new_n, list(range(min(old_n, new_n))), {})
    if at is None:
        at = list(range(old_n, new_n))
    at = [at] if isinstance(at, int) and not isinstance(at, bool) else list(at)
    if any(isinstance(j, bool) or not isinstance(j, int) for j in at):
        raise SurgeryError(f"resize: layers_at must be an int or a list of ints, got {at!r}")
    at = [j + new_n if j < 0 else j for j in at]
    if len(at) != added or len(set(at)) != len(at) or not all(0 <= j < new_n for j in at):
        raise SurgeryError(f"resize: layers_at={at!r} must name {added} distinct position(s) among the new model's "
                           f"{new_n} layers of {name} (0..{new_n - 1}), one per layer added")
    kept = [j for j in range(new_n) if j not in set(at)]
    source = {}
    for j in sorted(at):
        before = [i for i, k in enumerate(kept) if k < j]
        source[j] = before[-1] if before else 0      # the old layer just before, else the first
    return LayerList(name, old_n, new_n, kept, source)


def renames(lists: list[LayerList]) -> dict[str, str]:
    """Old layer prefix -> new prefix for every old layer that moved."""
    out = {}
    for ll in lists:
        for i, j in enumerate(ll.new_of_old):
            if i != j:
                out[ll.prefix(i)] = ll.prefix(j)
    return out


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + ":")


def groups_in_keys(imap, skip) -> set[str]:
    """The hidden axes (unit groups) whose labels the keys of `imap`'s parameters hold, except
    the parameters for which `skip(name)` is true."""
    pool = imap.pool
    group_of_set: dict[int, set] = {}
    found: set[str] = set()
    for name, e in imap.entries.items():
        if skip(name, e):
            continue
        for key in (e.key_meets, e.key_aligned):
            for t in (key.terms if key is not None else ()):
                for sid in torch.unique(t).tolist():
                    if sid not in group_of_set:
                        group_of_set[sid] = {pool.labels[i].group for i in pool.sets[sid]
                                             if pool.labels[i].kind == "unit"}
                    found |= group_of_set[sid]
    return found


def writer_aliases(new_map, old_map, lists: list[LayerList], rename: dict, derived=frozenset()) -> list[dict]:
    """{new layer's hidden axis that writes the residual stream: an old hidden axis already in
    the stream where the layer goes, named as in the new model}, read off the maps (see the
    module's docstring). The axis stood for is the same projection of the old layer just
    before; a layer put before every old one stands for a writer of the stream the first old
    layer reads (the embedding). `derived`: non-persistent buffers, which are not state (a
    rotary table meets every layer's queries and keys) and say nothing about the stream.

    Returns the choices to try, best first. Only a layer put first has several: the stream it
    joins is written by several embeddings (tokens and positions; a class token at one position
    and patches at the others), and the axis it stands for must be one present at every
    position, which the planner tells (a wrong one leaves elements unmatched)."""
    inserted = [(ll, j) for ll in lists for j in ll.inserted]
    if not inserted:
        return [{}]
    old_groups = unit_sizes(old_map.pool)
    prefixes = [ll.prefix(j) for ll, j in inserted]
    reaching = groups_in_keys(new_map, lambda name, e: name in derived or
                       any(_inside(a, p) for a in (e.aliases or (name,)) for p in prefixes))
    choices = [{}]
    for ll, j in inserted:
        first = not any(k < j for k in ll.new_of_old)
        if first:   # what the first old layer reads: the stream's groups from outside every layer
            read = groups_in_keys(old_map, lambda name, e: name in derived or not _inside(name, ll.prefix(0)))
            entry = sorted(g for g in read if not _inside(g, ll.name))
        writers = sorted(g for g in reaching if _inside(g, ll.prefix(j)))
        if first and writers and not entry:
            raise SurgeryError(f"resize: the new layer {ll.prefix(j)} writes the stream through {writers[0]}, but no "
                               f"hidden axis of the stream reaches the old model's first layer {ll.prefix(0)}")
        options = []
        for target_of in ([lambda g, e=e: e for e in entry] if first else
                          [lambda g: ll.prefix(ll.source[j]) + g[len(ll.prefix(j)):]]):
            option = {}
            for group in writers:
                target = target_of(group)
                if target not in old_groups:
                    raise SurgeryError(f"resize: the new layer {ll.prefix(j)} writes the stream through {group}, but "
                                       f"the layer it copies ({ll.prefix(ll.source[j])} of the old model) has no "
                                       f"hidden axis {target}")
                option[group] = rename_prefix(target, rename)
            options.append(option)
        choices = [{**c, **o} for o in options for c in choices]
    return choices


def owned_parameters(state: dict, group: str) -> list[str]:
    """The parameters of the module a hidden axis is named after (`a.c_proj:1` -> a.c_proj.weight
    and a.c_proj.bias)."""
    base = group.rsplit(":", 1)[0] if ":" in group else group
    names = (base, base + ".weight", base + ".bias", base + "_weight", base + "_bias")
    return [n for n in names if n in state]


def initialise(new_model, lists: list[LayerList], aliases: dict, how: str) -> list[Issue]:
    """After the plan is applied: each inserted layer copied from its source ("copy", "stack")
    or left as built ("fresh"), and its stream writers zeroed (all but "stack"). Returns the
    issue "stack" raises."""
    state = new_model.state_dict()
    writers = {n for g in aliases for n in owned_parameters(state, g)}
    issues = []
    with torch.no_grad():
        for ll in lists:
            for j, i in ll.source.items():
                new_prefix, old_prefix = ll.prefix(j), ll.prefix(i)
                if how in ("copy", "stack"):
                    for name, value in state.items():
                        if not _inside(name, new_prefix):
                            continue
                        # The source as the plan carried it into the new model (widened with it).
                        source = state.get(ll.prefix(ll.new_of_old[i]) + name[len(new_prefix):])
                        if source is not None and tuple(source.shape) == tuple(value.shape):
                            value.copy_(source)
                if how == "stack":
                    issues.append(Issue("stacked layer", new_prefix, f"a copy of layer {old_prefix} of the old model, "
                                        "its writes into the residual stream included: the function changes"))
        if how != "stack":
            for name in writers:
                state[name].zero_()
    return issues
