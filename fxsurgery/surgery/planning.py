"""The surgery plan: which element of each new parameter comes from which old element.

`plan(old, new)` maps both traced models, matches every new parameter and buffer with the old
one of the same name (after `rename`), element by element through their keys, and lists where
function preservation is impossible. `SurgeryPlan.apply()` builds the whole new state first
and hands it over last, all or nothing (see `commit`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..capture import Traced, trace
from .._gc import gc_paused
from .._sort import one_thread
from ..interaction_map import current_map, interaction_map
from ..progress import check as check_progress, counted, steps
from ..tied import tied_names
from .apply import build, writes_nothing
from .commit import Commit, OldMemory, state_tensors
from .errors import SurgeryError, SurgeryWarning, _listing
from .issues import (Issue, check_fallbacks, check_points, fallback_points, graph_points, match_outputs, output_keys,
                     kept_nonfinite, removed_nonzero, unmatched)
from .match import Match, match
from .renames import check_rename, rename_prefix
from .splits import unit_splits
from .tokens import LabelSpace
from . import report

__all__ = ["SurgeryPlan", "ParamPlan", "plan", "transplant", "NEW_CATEGORIES"]

NEW_CATEGORIES = ("zero", "mean", "keep")


@dataclass
class ParamPlan:
    name: str                     # the new state_dict name (the first of tied names)
    old_name: str | None          # the old state_dict name it is matched with
    aliases: tuple                # every new state_dict name sharing this tensor
    kind: str                     # "parameter" or "buffer"
    match: Match
    in_graph: bool = True         # False: not read by the graph, matched by name and shape only
    inserted: tuple = ()          # the aliased hidden axes (units={"mid": "fc1"}) it is aligned with
    persistent: bool = True       # False: a non-persistent buffer, never written (see plan)

    @property
    def status(self) -> str:
        m = self.match
        if not self.persistent:
            return "kept"
        if m.unexplained:
            return "re-initialised"
        if self.old_name is None:
            return "new"
        if m.identity:
            return "copied"
        return "changed"


class SurgeryPlan:
    """What `plan` decided. `table()` shows it per parameter, `issues` lists where the new model
    cannot compute what the old one did, `apply()` carries the weights over."""

    def __init__(self, old: Traced, new: Traced, space: LabelSpace, params: dict, dropped: list,
                 issues: list, outputs: list, new_categories: str, rename, units, timings: dict,
                 notes: list):
        self.old, self.new = old, new
        self.space = space
        self.params: dict[str, ParamPlan] = params
        self.dropped: list[str] = dropped            # old names with no new counterpart
        self.issues: list[Issue] = issues
        self.outputs = outputs
        self.new_categories = new_categories
        self.rename, self.units = dict(rename or {}), dict(units or {})
        self.timings = timings
        self.notes = notes
        self.applied = False
        self.old_map = self.new_map = None   # the interaction maps (keys) the plan was made from

    # reports --------------------------------------------------------------------------
    @property
    def new_labels(self) -> list:
        return sorted({self.space.label(t) for t in self.space.new_only})

    @property
    def removed_labels(self) -> list:
        return sorted({self.space.label(t) for t in self.space.removed})

    @property
    def preserves_function(self) -> bool:
        """True when no place was found where the new model must compute something else than
        the old one did. New outputs, and new positions of an output, do not count: the old
        ones are computed exactly (they are listed among the issues all the same)."""
        return all(not i.blocking for i in self.issues) and not any(p.match.unexplained for p in self.params.values())

    def table(self, tablefmt: str = "simple") -> str:
        return report.table(self, tablefmt)

    def summary(self) -> str:
        """The totals, labels gained and lost, and the issues (the text under the table)."""
        return report.summary(self)

    def __str__(self) -> str:
        return report.text(self)

    def __repr__(self) -> str:
        counts = report.counts(self)
        return (f"SurgeryPlan({len(self.params)} parameters: {counts['copied']:,} elements copied, "
                f"{counts['zeroed']:,} zeroed, {counts['kept']:,} kept, {counts['dropped']:,} dropped; "
                f"{len(self.issues)} issues)")

    # applying -------------------------------------------------------------------------
    def apply(self, progress: Callable[[str, int, int], None] | None = None) -> torch.nn.Module:
        """Carries the weights into the new model (and returns it). All or nothing: if anything
        fails or is interrupted (an exception, KeyboardInterrupt), the new model is left as it
        was, and the error propagates. The old model is only read, never written, even where
        the new model shares modules or tensors with it. `progress(name, done, total)` is called
        after each parameter is prepared (element counts). A plan applies once: plan again to
        carry the weights again.

        Two phases. First every new value is prepared in fresh memory: checked, copied where
        matched, initialised elsewhere; the models are only read. Then the new model's
        parameters and buffers are re-pointed at them (`.data = value`: the objects stay, so
        tied parameters stay tied), every step recorded, and taken back if a later one fails.
        A tensor the new model shares with the old one (a module reused from it,
        `new.fc1 = old.fc1`) is given its own copy in the new model only, with a new object
        where the object itself is shared (the shared modules on the way are replaced, in the
        new model, by copies of their own): afterwards the two models share no memory.
        Preparing everything apart costs what cloning the new state costs (fresh memory), about
        three times a copy into memory already paged in; that is the price of leaving the new
        model as it was when a write fails midway.
        """
        old_model, new_model = self.old.model, self.new.model
        if self.applied:
            raise SurgeryError("this plan was applied already: the new model holds the carried weights (and "
                               "whatever happened to it since); plan again to carry them again (nothing was written)")
        old_sd = old_model.state_dict()
        new_sd = new_model.state_dict(keep_vars=True)
        self._check_states(old_sd, new_sd)
        old_mem = OldMemory(old_model)
        fresh: dict[int, torch.Tensor] = {}       # id of a live new tensor -> its new value
        live: dict[int, torch.Tensor] = {}
        total = sum(int(new_sd[p.name].numel()) for p in self.params.values() if p.persistent)
        done = 0
        with torch.no_grad():
            for p in self.params.values():
                if not p.persistent:
                    continue
                old = old_sd[p.old_name] if p.old_name is not None else None
                target = new_sd[p.name]
                if not writes_nothing(p.match, old, self.new_categories):
                    value = build(p.match, old, target.detach(), self.new_categories)
                    if tuple(value.shape) != tuple(target.shape):  # a bug guard: never load a wrong shape
                        raise SurgeryError(f"internal error: built {p.name} with shape {tuple(value.shape)}, "
                                           f"expected {tuple(target.shape)}; nothing was written")
                    fresh[id(target)], live[id(target)] = value, target
                done += int(target.numel())
                if progress is not None:
                    progress(p.name, done, total)
            # Whatever else of the new model aliases the old model (a non-persistent buffer, a value
            # kept as it is) gets a copy of its own too.
            for _, t in state_tensors(new_model):
                if id(t) not in fresh and old_mem.overlaps(t):
                    fresh[id(t)], live[id(t)] = t.detach().clone(), t
            for key, value in fresh.items():     # a value that is the old tensor itself is cloned
                if old_mem.overlaps(value):
                    fresh[key] = value.clone()
        commit = Commit()
        try:
            with torch.no_grad():
                replace = {}
                for key, value in fresh.items():
                    t = live[key]
                    if key in old_mem.tensors:   # registered in the old model too: a new object
                        replace[key] = torch.nn.Parameter(value, requires_grad=t.requires_grad) \
                            if isinstance(t, torch.nn.Parameter) else value
                    else:
                        commit.set_data(t, value)
                if replace:
                    commit.own(new_model, old_mem, replace)
                self.applied = True
        except BaseException:
            self.applied = False
            commit.undo()
            raise
        return new_model

    def _check_states(self, old_sd, new_sd) -> None:
        """The models are still what the plan was made for: every name present, of its shape,
        tied as it was; nothing new in the new model's state. Raises naming the parameter."""
        known = {a for p in self.params.values() for a in p.aliases}
        names_of: dict[int, list[str]] = {}
        for name, t in new_sd.items():
            if name not in known:
                raise SurgeryError(f"the new model has {name!r}, which it did not have when the plan was made; "
                                   "plan again (nothing was written)")
            names_of.setdefault(id(t), []).append(name)
        for p in self.params.values():
            if not p.persistent:
                continue
            if p.name not in new_sd:
                raise SurgeryError(f"the new model has no {p.name!r} any more; plan again (nothing was written)")
            t = new_sd[p.name]
            for a in p.aliases:
                if a in new_sd and new_sd[a] is not t:
                    raise SurgeryError(f"the new model's {a} and {p.name} were one tensor (tied) when the plan was "
                                       "made and are not any more; plan again (nothing was written)")
            tied = [n for n in names_of[id(t)] if n not in p.aliases]
            if tied:
                raise SurgeryError(f"the new model's {tied[0]} is now the same tensor as {p.name} (tied since the "
                                   "plan was made); plan again (nothing was written)")
            if tuple(t.shape) != p.match.new_shape:
                raise SurgeryError(f"the new model's {p.name} has shape {tuple(t.shape)}, but the plan was made "
                                   f"for {p.match.new_shape}; plan again (nothing was written)")
            if t.device.type == "meta":
                raise SurgeryError(f"the new model's {p.name} is on the meta device: it has no storage to write "
                                   "into; build the new model on a real device (nothing was written)")
            if p.old_name is None or not p.match.copy:
                continue
            o = old_sd.get(p.old_name)
            if o is None:
                raise SurgeryError(f"the old model has no {p.old_name!r} any more; plan again (nothing was written)")
            if tuple(o.shape) != p.match.old_shape:
                raise SurgeryError(f"the old model's {p.old_name} has shape {tuple(o.shape)}, but the plan was "
                                   f"made for {p.match.old_shape}; plan again (nothing was written)")
            if o.device.type == "meta":
                raise SurgeryError(f"the old model's {p.old_name} is on the meta device: it has no weights to "
                                   "copy; load its checkpoint first (nothing was written)")

    # training state ---------------------------------------------------------------------
    def masks(self) -> dict:
        """{new parameter name: ElementMasks(copied, new, zeroed)}: boolean tensors of its shape,
        for freezing copied elements or giving new ones their own learning rate."""
        from .training_state import element_masks
        return element_masks(self)

    def carry_optimizer(self, old_optimizer, new_optimizer, new_scale: str = "zero"):
        """Loads the old optimizer's state (Adam's moments and step, SGD's momentum) into
        `new_optimizer`, built over the new model's parameters: copied elements keep their
        state, new ones start at zero (new_scale="mean": Adam's second moment of new elements
        is the mean of the copied ones', see training_state.carry_state). Returns
        `new_optimizer`."""
        from .training_state import carry_optimizer
        return carry_optimizer(self, old_optimizer, new_optimizer, new_scale)

    def apply_to_checkpoint(self, src, dst, **kwargs):
        """Carries the weights from the checkpoint `src` (a safetensors file or a directory of
        shards) into a new sharded checkpoint `dst`, tensor by tensor: both models may be on the
        meta device. See `fxsurgery.surgery.checkpoint.apply_to_checkpoint`."""
        from .checkpoint import apply_to_checkpoint
        return apply_to_checkpoint(self, src, dst, **kwargs)


def _state_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _non_persistent(model: torch.nn.Module) -> set[str]:
    """Full names of the model's non-persistent buffers (not in its state_dict)."""
    return {f"{prefix}.{b}" if prefix else b for prefix, mod in model.named_modules(remove_duplicate=False)
            for b in getattr(mod, "_non_persistent_buffers_set", ())}


@gc_paused()
@one_thread()   # a context manager made by contextmanager decorates too, afresh per call
def plan(old: Traced, new: Traced, rename: Mapping[str, str] | None = None,
         units: Mapping[str, list] | None = None, strict: bool = False,
         new_categories: str = "zero", *, progress=None, old_map=None, new_map=None) -> SurgeryPlan:
    """Plans carrying the old model's weights into the new one.

    rename: old name prefix -> new name prefix, for modules or parameters that were renamed
        (hidden-axis groups named after them follow).
    units: hidden-axis group -> the old unit positions that survive, in new order (pruning):
        new unit k is old unit units[group][k]; without it units match by position.
        A string value declares an inserted layer instead: units={"mid": "fc1"} says that the
        new model's hidden axis `mid` (a layer the old model lacks, e.g. fc1 -> relu -> mid ->
        fc2 with mid = nn.Linear(H, H)) has unit j standing for unit j of `fc1` (a hidden axis
        of the old model; the sizes must be equal). Weights that meet mid[j] are then copied
        from the old weights that met fc1[j] (fc2's columns), and mid's own parameters, which
        are aligned with `mid`, keep the values the new model was built with. The function is
        preserved when the inserted layer starts as the identity on its inputs (weight = I,
        bias = 0; a relu after it is fine on relu outputs); the plan cannot check that, it
        notes it. Without the alias `mid`'s units are new labels: the weights that meet them
        are zeroed and the plan reports them as unmatched (no preservation claimed).
    strict: raise instead of re-initialising a parameter whose shape change its labels do not
        explain.
    new_categories: new embedding rows are "zero" (default), the "mean" of the old rows, or
        "keep" the new model's values.
    progress: tqdm bars on stderr for mapping each model and for matching the parameters (None,
        the default: only on a terminal, with tqdm installed, for graphs of
        fxsurgery.progress.LARGE_GRAPH nodes or more; True: always; False: never), or a
        callable(what, done, total) called as each advances, `what` being "mapping <old model
        class>", "mapping <new model class>", then "planning <new model class>" (parameters
        matched).
    old_map: the old model's interaction map, when the caller has just made it (a pass does):
        used if it is still the last map made of `old`'s graph, else the old model is mapped
        again.
    new_map: likewise for the new model (fs.hf.resize maps it first, to find a new layer's writes).
    """
    for what, t in (("old", old), ("new", new)):
        if not isinstance(t, Traced):
            raise SurgeryError(f"plan expects traced models (fs.trace(model, inputs, features)); the {what} "
                               f"model is a {type(t).__name__}")
    if new_categories not in NEW_CATEGORIES:
        raise SurgeryError(f"new_categories must be one of {NEW_CATEGORIES}, got {new_categories!r}")
    check_progress(progress, SurgeryError)   # progress=True without tqdm fails before any work
    timings = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        if old_map is None or not current_map(old, old_map):
            old_map = interaction_map(old, progress=progress)
        old_outputs = output_keys(old)  # read now: mapping `new` may overwrite node metadata
        old_points = graph_points(old)
        old_fallbacks = fallback_points(old)
        old_splits = unit_splits(old, old_map.pool)
        if new_map is None or not current_map(new, new_map):
            new_map = interaction_map(new, progress=progress)
    new_outputs = output_keys(new)
    new_splits = unit_splits(new, new_map.pool)
    points = graph_points(new)
    new_fallbacks = fallback_points(new)
    timings["map"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    old_shapes, new_shapes = _state_shapes(old.model), _state_shapes(new.model)
    old_names = sorted(set(old_shapes) | {a for e in old_map.entries.values() for a in e.aliases})
    new_names = sorted(set(new_shapes) | {a for e in new_map.entries.values() for a in e.aliases})
    check_rename(rename, old_names, new_names)
    space = LabelSpace(old_map, new_map, rename, units, (old_splits, new_splits))

    old_by_new: dict[str, str] = {}
    for oname, e in old_map.entries.items():
        for a in (e.aliases or (oname,)):
            old_by_new.setdefault(rename_prefix(a, rename), oname)
    params: dict[str, ParamPlan] = {}
    used_old: set[str] = set()
    notes: list[str] = []
    problems = []
    # Non-persistent buffers (register_buffer(..., persistent=False): position ids, rotary
    # frequencies, masks) are not state: checkpoints do not hold them, the module computes them
    # from its configuration, so the new model's own values are the right ones for it. They are
    # kept, never matched (matching would zero a rotary table, which every attention head
    # meets, old and new alike), and the old ones are not reported dropped.
    old_derived, new_derived = _non_persistent(old.model), _non_persistent(new.model)
    # With progress=None the bar shows for a new graph as large as the mapping's would.
    with steps(progress, f"planning {type(new.model).__name__}", len(new_map.entries), nodes=len(new.graph.nodes),
               unit="param", error=SurgeryError) as step:
        for nname, e in counted(new_map.entries.items(), step):
            aliases = tuple(e.aliases or (nname,))
            if all(a in new_derived for a in aliases):
                kept = Match(new_shape=tuple(e.shape), old_shape=None, copy=False)
                params[nname] = ParamPlan(nname, None, aliases, e.kind, kept, persistent=False)
                continue
            oname = next((old_by_new[a] for a in aliases if a in old_by_new), None)
            if oname is not None:
                oe = old_map.entries[oname]
                used_old.add(oname)
                m = match(space, e.shape, e.key_meets, e.key_aligned, oe.shape, oe.key_meets, oe.key_aligned)
            else:
                m = match(space, e.shape, e.key_meets, e.key_aligned)
            params[nname] = ParamPlan(nname, oname, aliases, e.kind, m,
                                      inserted=_inserted(space, new_map.pool, e.key_aligned))
            if m.unexplained:
                problems.append(nname)
    # State the graph does not read (unused parameters, untouched buffers): by name and shape.
    covered = {a for p in params.values() for a in p.aliases}
    new_alias = tied_names(new.model)
    old_state_by_new = {rename_prefix(k, rename): k for k in old_shapes}
    for key, shape in new_shapes.items():
        if key in covered:
            continue
        names = new_alias.get(key, (key,))
        covered.update(names)
        okey = old_state_by_new.get(key)
        if okey is not None and old_shapes[okey] == shape and okey not in used_old:
            m = Match(new_shape=shape, old_shape=shape)
            m.blocks = []
            _identity_blocks(m, shape)
            used_old.add(okey)
        else:
            m = Match(new_shape=shape, old_shape=None, copy=False)
            okey = None
        params[key] = ParamPlan(key, okey, names, "state", m, in_graph=False)
    if not used_old and (old_names or new_names):   # (two models without weights: nothing to carry)
        raise SurgeryError(f"the old and new models have no parameter or buffer in common (old: "
                           f"{_listing(old_names)}; new: {_listing(new_names)}); pass rename={{old prefix: new "
                           "prefix}} if modules were renamed")
    old_all = (set(old_map.entries) | set(old_shapes)) - old_derived
    old_alias = tied_names(old.model)
    dropped = sorted(n for n in old_all if n not in used_old and
                     not any(a in used_old for a in old_alias.get(n, (n,))))
    if problems:
        msgs = [f"{n}: {params[n].match.unexplained}" for n in problems]
        if strict:
            raise SurgeryError("the labels do not explain the shape change of " + "; ".join(msgs) +
                               " (strict mode); relabel the inputs, pass units=..., or plan without strict "
                               "to re-initialise them")
        for msg in msgs:
            warnings.warn(f"re-initialising {msg}", SurgeryWarning, stacklevel=2)

    issues = check_points(space, points) + check_points(space, old_points, side="old")
    issues += check_fallbacks(space, old_fallbacks, new_fallbacks)
    outputs, out_issues = match_outputs(space, old_outputs, new_outputs)
    issues += out_issues
    old_sd, new_sd = old.model.state_dict(), new.model.state_dict()
    for p in params.values():
        if p.in_graph and p.persistent:
            issue = kept_nonfinite(p.name, p.match, new_sd.get(p.name))
            if issue is not None:
                issues.append(issue)
        if p.old_name is not None and p.in_graph:
            issue = removed_nonzero(space, p.old_name, p.match, old_sd.get(p.old_name))
            if issue is not None:
                issues.append(issue)
            issue = unmatched(space, p.name, p.old_name, p.match, inserted=bool(p.inserted))
            if issue is not None:
                issues.append(issue)
    if any(i.kind == "unmatched" for i in issues):  # then the old positions are not known to be preserved
        for i in issues:
            if i.kind == "new output" and i.message.endswith("; the old positions are preserved"):
                i.message = i.message[:-len("are preserved")] + ("are preserved only where no unmatched "
                                                                 "element (below) is involved")
    for group, target in space.unit_aliases.items():
        names = [p.name for p in params.values() if group in p.inserted]
        notes.append(f"{group} is an inserted layer standing for {target} (units={{{group!r}: {target!r}}}): "
                     f"{', '.join(names) or 'its parameters'} keep the values they were built with; the new model "
                     f"computes what the old one did only if {group} starts as the identity")
    if any(t.device.type == "meta" for t in old_sd.values()):
        notes.append("the old model is on the meta device: removed inputs were not checked for non-zero weights")
    timings["plan"] = time.perf_counter() - t0
    result = SurgeryPlan(old, new, space, params, dropped, issues, outputs, new_categories, rename, units,
                         timings, notes + list(dict.fromkeys(old_map.notes + new_map.notes)))
    result.old_map, result.new_map = old_map, new_map
    return result


def _inserted(space: LabelSpace, pool, aligned) -> tuple:
    """The aliased (inserted) hidden axes whose units a parameter is aligned with."""
    if not space.unit_aliases or aligned is None:
        return ()
    found = set()
    for t in aligned.terms:
        for sid in torch.unique(t).tolist():
            for i in pool.sets[sid]:
                lab = pool.labels[i]
                if lab.kind == "unit" and lab.group in space.unit_aliases:
                    found.add(lab.group)
    return tuple(sorted(found))


def _identity_blocks(m: Match, shape) -> None:
    from .match import Block
    for a, n in enumerate(shape):
        none = torch.zeros(n, dtype=torch.bool)
        m.blocks.append(Block(axes=(a,), old_shape=(n,), new_shape=(n,), index=torch.arange(n), zero=none,
                              category=none, removed_data=none, removed=none))


def transplant(old: torch.nn.Module, new: torch.nn.Module, old_inputs, new_inputs, old_features=None,
               new_features=None, **plan_kwargs):
    """The one-call form: traces both models, plans, applies. Returns (new model, plan)."""
    p = plan(trace(old, old_inputs, old_features), trace(new, new_inputs, new_features), **plan_kwargs)
    return p.apply(), p
