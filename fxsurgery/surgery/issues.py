"""Where function preservation is impossible, found on the graphs: normalisations and softmaxes
whose mixed positions gain new labels, outputs that gain positions, removed inputs whose weights
were not zero."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten
from torch.export.graph_signature import OutputKind, TensorArgument

from ..propagate import META_KEY, fallbacks
from ..terms import Terms
from ..nodes import node_tag
from .._sort import unique
from .match import match
from .tokens import LabelSpace, describe

__all__ = ["Issue", "graph_points", "output_keys", "check_points", "match_outputs", "removed_nonzero",
           "unmatched", "fallback_points", "check_fallbacks", "kept_nonfinite"]


@dataclass
class Issue:
    kind: str       # "normalisation", "softmax", "reduction", "output", "removed input", "pruned units",
    #                 "unmatched", "no rule" (an operator run through the sound fallback), "non-finite",
    #                 "moved output" (old values computed at other indices of an output),
    #                 or "new output": an output (or positions of one) the old model has no value for.
    where: str      # node or parameter
    message: str
    # False: said so that nobody is surprised, but the old outputs are still computed exactly
    # (a new output; an operator without a rule that no change reaches), so it does not count
    # against `SurgeryPlan.preserves_function`.
    blocking: bool = True

    def __str__(self) -> str:
        return f"[{self.kind}] {self.where}: {self.message}"


def _bound(node) -> dict:
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


_LAYER = {"aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm", "aten::_fused_rms_norm"}
_BATCH = {"aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
          "aten::_native_batch_norm_legit_functional", "aten::cudnn_batch_norm"}
_GROUP = {"aten::group_norm", "aten::native_group_norm"}
_ATTENTION = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math"}
# Parameter-free reductions: new positions (a new unit's output, whose incoming weights keep
# their values) enter them directly, with no outgoing weight to zero.
_REDUCE = {"aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::max", "aten::min", "aten::logsumexp",
           "aten::prod", "aten::var", "aten::std", "aten::var_mean", "aten::std_mean", "aten::norm",
           "aten::linalg_vector_norm", "aten::nansum", "aten::nanmean"}
_SOFTMAX = {"aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax", "aten::_safe_softmax",
            "aten::special_softmax"}


def _keys(node):
    if not isinstance(node, torch.fx.Node):
        return None
    lt = (node.meta.get(META_KEY) or {}).get("keys")
    return lt if hasattr(lt, "ids") else None


def graph_points(traced) -> list[tuple]:
    """(kind, where, label ids of the mixed input, shape, axes mixed together) of every
    normalisation in training and every softmax of the graph, read right after mapping."""
    points = []
    for node in traced.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        name = node.target._schema.name
        if name in _ATTENTION and len(node.args) >= 2:
            q = _keys(node.args[0])
            if q is not None:  # scores q . k sum over the head dimension
                points.append(("attention", f"{name[6:]} at {node_tag(node)}", q.ids, [len(q.shape) - 1]))
            continue
        if name in _REDUCE:
            lt = _keys(node.args[0]) if node.args else None
            if lt is None or not len(lt.shape):
                continue
            dims = _bound(node).get("dim")
            nd = len(lt.shape)
            dims = list(range(nd)) if dims is None or dims == [] else \
                sorted({d % nd for d in ([dims] if isinstance(dims, int) else dims)})
            points.append(("reduction", f"{name[6:]} at {node_tag(node)}", lt.ids, dims))
            continue
        if name not in _LAYER | _BATCH | _GROUP | _SOFTMAX and name != "aten::instance_norm":
            continue
        lt = _keys(node.args[0]) if node.args else None
        if lt is None:
            continue
        ids, shape, nd = lt.ids, tuple(lt.shape), len(lt.shape)
        b = _bound(node)
        if name in _LAYER:
            k = len(b.get("normalized_shape", ()))
            points.append(("normalisation", f"{name[6:]} at {node_tag(node)}", ids, list(range(nd - k, nd))))
        elif name in _BATCH:
            if name == "aten::_native_batch_norm_legit_no_training" or not b.get("training", False):
                continue
            points.append(("normalisation", f"batch_norm (training) at {node_tag(node)}", ids,
                           [0] + list(range(2, nd))))
        elif name == "aten::instance_norm":
            points.append(("normalisation", f"instance_norm at {node_tag(node)}", ids, list(range(2, nd))))
        elif name in _GROUP:
            groups = int(b.get("num_groups", b.get("group", 1)))
            c = shape[1]
            if ids.shape[1] > 1:
                ids = ids.expand([ids.shape[0], c] + list(ids.shape[2:])).reshape(
                    [ids.shape[0], groups, c // groups] + list(ids.shape[2:]))
            else:
                ids = ids.reshape([ids.shape[0], 1, 1] + list(ids.shape[2:]))
            points.append(("normalisation", f"group_norm at {node_tag(node)}", ids, list(range(2, ids.dim()))))
        else:
            dim = b.get("dim", -1)
            points.append(("softmax", f"{name[6:]} at {node_tag(node)}", ids, [dim % nd] if nd else []))
    return points


def fallback_points(traced) -> list[tuple]:
    """(node name, ((operator, why), ...), where, operands) of every node where mapping used
    the sound fallback, read right after mapping. `operands`: per argument, (shape, keys ids) of
    a tensor, or the value itself (sizes, flags), in the order of the node's arguments."""
    by_node: dict[str, list] = {}
    for name, op, why in fallbacks(traced.graph):
        by_node.setdefault(name, []).append((op, why))
    if not by_node:
        return []
    points = []
    for node in traced.graph.nodes:
        if node.name not in by_node:
            continue
        operands = []
        for a in tree_flatten((node.args, node.kwargs))[0]:
            lt = _keys(a)
            if lt is not None:
                operands.append((tuple(lt.shape), lt.ids))
            elif isinstance(a, torch.fx.Node):
                operands.append(("value", repr(a.meta.get("val"))))
            else:
                operands.append(("value", repr(a)))
        points.append((node.name, tuple(by_node[node.name]), node_tag(node), operands))
    return points


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


_PAIR = 1 << 31


def _reach(space: LabelSpace, old_ops, new_ops) -> list[str]:
    """How the operands of a fallback node differ between the old and new model: shapes, or
    the labels (as tokens of both) held at the same positions. Empty: every operand holds the
    same labels at the same positions, and the same sizes and flags."""
    if len(old_ops) != len(new_ops):
        return [f"it takes {len(old_ops)} arguments in the old model and {len(new_ops)} in the new"]
    found = []
    for k, (o, n) in enumerate(zip(old_ops, new_ops)):
        if o[0] == "value" or n[0] == "value":
            if o != n:
                found.append(f"argument {k} differs")
            continue
        (os_, oids), (ns, nids) = o, n
        if os_ != ns:
            found.append(f"argument {k} changes shape {_shape_text(os_)} -> {_shape_text(ns)}")
            continue
        to, _ = space.translate("old", oids.reshape([1] * (len(os_) - oids.dim()) + list(oids.shape)))
        tn, _ = space.translate("new", nids.reshape([1] * (len(ns) - nids.dim()) + list(nids.shape)))
        to, tn = torch.broadcast_tensors(to, tn)
        differ = to != tn
        if not bool(differ.any()):
            continue
        pairs, _ = unique(to[differ] * _PAIR + tn[differ])
        before, after = set(), set()
        for a, b in (divmod(p, _PAIR) for p in pairs.tolist()):
            before |= space.tset_tokens[a]
            after |= space.tset_tokens[b]
        n = f"{int(differ.sum()):,} of its {int(differ.numel()):,} distinct positions"
        if before == after:
            found.append(f"argument {k} holds the same labels at other positions ({describe(before, space)} "
                         f"moved, at {n})")
            continue
        what = [f"gaining {describe(after - before, space)}"] if after - before else []
        what += [f"losing {describe(before - after, space)}"] if before - after else []
        found.append(f"argument {k} holds other labels at {n} ({', '.join(what)})")
    return found


def check_fallbacks(space: LabelSpace, old_points, new_points) -> list[Issue]:
    """Nodes run through the sound fallback: every element after one depends on everything its
    inputs depend on, so the labels no longer tell those elements apart and they are matched
    by position. That is right when the node's inputs hold the same labels at the same
    positions in both models (the change does not reach it: its inputs are, position by
    position, what they were); otherwise the positions after it are not known to correspond
    (a reordered feature axis rolled by it), and preservation is not claimed through it. A
    fallback in one model only, or at nodes that cannot be paired (by name and operator), is
    never assumed to be reached by no change."""
    old_by = {name: (ops, operands) for name, ops, _, operands in old_points}
    issues = []
    for name, ops, where, operands in new_points:
        why = "; ".join(w for _, w in ops)
        head = f"{why}: positions after it are not matched element by element"
        old = old_by.pop(name, None)
        if old is None or tuple(o for o, _ in old[0]) != tuple(o for o, _ in ops):
            issues.append(Issue("no rule", where, head + "; the old model has no such node run through the sound "
                                "fallback to compare it with, function preservation is not claimed through it"))
            continue
        reach = _reach(space, old[1], operands)
        if reach:
            issues.append(Issue("no rule", where, head + f", and the change reaches it ({'; '.join(reach)}): "
                                "function preservation is not claimed through it"))
        else:
            issues.append(Issue("no rule", where, head + "; no change reaches it (its inputs hold the same labels "
                                "at the same positions in both models), so they are carried by position",
                                blocking=False))
    for name, (ops, _) in old_by.items():
        why = "; ".join(w for _, w in ops)
        issues.append(Issue("no rule", f"%{name} (old model)", f"{why}: positions after it are not matched element by "
                            "element, and the new model has no such node to compare it with: function preservation "
                            "is not claimed through it"))
    return issues


def output_keys(traced) -> list:
    """(shape, keys ids, deps ids) of each user output, in order (None for a non-tensor
    output)."""
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    args = out_node.args[0]
    args = list(args) if isinstance(args, (tuple, list)) else [args]
    result = []
    for spec, arg in zip(traced.program.graph_signature.output_specs, args):
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            continue
        lt = _keys(arg)
        deps = (arg.meta.get(META_KEY) or {}).get("deps") if isinstance(arg, torch.fx.Node) else None
        deps = deps.ids if hasattr(deps, "ids") and deps.ids.dim() == lt.ids.dim() else None \
            if lt is not None else None
        result.append(None if lt is None else (tuple(lt.shape), lt.ids, deps))
    return result


def _common(space: LabelSpace, side: str, ids: torch.Tensor | None) -> torch.Tensor | None:
    """The label sets restricted to the labels both models have (features, categories, inputs
    by name): what an output position depends on, minus what was added or removed."""
    if ids is None:
        return None
    pool = space.pools[side]
    uniq, inverse = unique(ids)
    members, seg = pool.members(uniq)   # a logit's set holds a vocabulary: filtered in tensor code
    keep = ~space.token_mask("gone")[space.token_ids(side)[members]]
    return pool.intern_segments(members[keep], seg[keep], uniq.numel())[inverse.reshape(ids.shape)]


def _flags(space: LabelSpace, ids: torch.Tensor, side: str) -> tuple[torch.Tensor, set]:
    """Per element: does its set hold a label only the new model has (side "new"), or one the
    new model lacks (side "old")? And which such labels there are."""
    uniq, inverse = unique(ids)
    members, seg = space.pools[side].members(uniq)
    toks = space.token_ids(side)[members]
    hit = space.token_mask("new_only" if side == "new" else "removed")[toks]
    flags = torch.bincount(seg[hit], minlength=uniq.numel()) > 0
    return flags[inverse.reshape(ids.shape)], set(unique(toks[hit])[0].tolist())


def check_points(space: LabelSpace, points, side: str = "new") -> list[Issue]:
    """The normalisations, softmaxes and attention scores that mix positions holding new labels
    with old ones (points of the new graph, side "new"), or positions holding removed labels
    (pruned units, removed features) with kept ones (points of the old graph, side "old")."""
    issues = []
    for kind, where, ids, dims in points:
        flags, labels = _flags(space, ids, side)
        if not labels or not dims:
            continue
        f = flags.to(torch.int8)
        mixed = f.amax(dim=dims) != f.amin(dim=dims)
        if not bool(mixed.any()):
            continue
        what = describe(labels, space)
        if kind == "reduction":
            mixed_with = "kept positions together with removed ones" if side == "old" else \
                "old positions together with new ones"
            msg = (f"reduces {mixed_with} ({what}) with no weight in between: the result changes, "
                   "function preservation is impossible here")
            issues.append(Issue(kind, where, msg))
            continue
        if side == "old":
            verb = {"attention": "scores sum over", "softmax": "normalises over",
                    "normalisation": "normalises"}[kind]
            msg = (f"{verb} kept positions together with removed ones ({what}): without them the result "
                   "changes, function preservation is impossible here")
        elif kind == "attention":
            msg = (f"scores sum over old and new head dimensions ({what}): the new query "
                   "and key rows change the attention weights, function preservation is impossible here")
        elif kind == "softmax":
            msg = (f"mixes old positions with new ones ({what}): the old outputs' "
                   "normalisation changes, function preservation is impossible here")
        else:
            msg = (f"normalises old positions together with new ones ({what}): "
                   "their statistics change, function preservation is impossible here")
        issues.append(Issue(kind, where, msg))
    return issues


def _terms(shape, ids) -> Terms:
    t = Terms(shape)
    if ids is not None and bool((ids != 0).any()):
        t.terms.append(ids.reshape([1] * (len(shape) - ids.dim()) + list(ids.shape)).contiguous())
    return t


def match_outputs(space: LabelSpace, old_outputs, new_outputs) -> tuple[list, list[Issue]]:
    """Per new output: (index of the old output, Match of its positions) or None."""
    matches, issues = [], []
    for i, new in enumerate(new_outputs):
        old = old_outputs[i] if i < len(old_outputs) else None
        if new is None or old is None:
            matches.append(None)
            if new is not None:
                issues.append(Issue("new output", f"output {i}", "is new: the old model has no such output",
                                    blocking=False))
            continue
        (ns, nids, ndeps), (os_, oids, odeps) = new, old
        # An output position is known by its keys and, beside them, by the labels of both models
        # it depends on: a raw input's features that run through a layer across tokens keep
        # no keys of their own, but each channel still depends on its feature.
        nd, od = _common(space, "new", ndeps), _common(space, "old", odeps)
        m = match(space, ns, _terms(ns, nids), None if nd is None else _terms(ns, nd),
                  os_, _terms(os_, oids), None if od is None else _terms(os_, od))
        matches.append((i, m))
        if m.unexplained or not m.copy:
            if ns != os_:
                issues.append(Issue("output", f"output {i}", f"changes shape {os_} -> {ns} in a way its labels "
                                    "do not explain; it is not compared"))
            continue
        lost = _numel(os_) - m.n_copied()
        if lost:
            labels = describe(m.removed_labels, space) or "unlabelled positions"
            issues.append(Issue("output", f"output {i}", f"loses {lost} elements ({labels}) that the new model no "
                                "longer computes; the remaining positions are compared"))
        moved = _moved(m)
        if moved:
            issues.append(Issue("moved output", f"output {i}", f"positions moved: {moved}; the old values are computed "
                                "at other indices, so whatever reads this output by position sees other values "
                                "(verify compares it by label)"))
        gained = _numel(ns) - m.n_copied()
        if gained:
            labels = describe(m.new_met, space) or "unlabelled positions"
            issues.append(Issue("new output", f"output {i}", f"gains {gained} elements ({labels}) that the old model "
                                "has no value for; the old positions are preserved", blocking=False))
    return matches, issues


def _moved(m, limit: int = 6) -> str:
    """Which copied positions of an output sit at another index than in the old one, per
    block of axes: "along axis 1, 0 -> 1, 1 -> 0" (old -> new). Empty if none moved."""
    parts = []
    for b in m.blocks:
        gone = torch.nonzero(b.copied & ~b.stays()).reshape(-1)
        if not gone.numel():
            continue
        old_at = b.index.index_select(0, gone)
        if len(b.axes) == 1:
            pairs = [f"{o} -> {n}" for o, n in zip(old_at.tolist(), gone.tolist())]
            where = f"axis {b.axes[0]}"
        else:
            o_idx = torch.stack(torch.unravel_index(old_at, b.old_shape), 1).tolist()
            n_idx = torch.stack(torch.unravel_index(gone, b.new_shape), 1).tolist()
            pairs = [f"{tuple(o)} -> {tuple(n)}" for o, n in zip(o_idx, n_idx)]
            where = f"axes {b.axes}"
        more = f", ... ({len(pairs) - limit} more)" if len(pairs) > limit else ""
        parts.append(f"along {where}, {', '.join(pairs[:limit])}{more}")
    return "; ".join(parts)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def removed_nonzero(space: LabelSpace, name: str, m, old: torch.Tensor) -> Issue | None:
    """An old parameter meets a removed feature, input or pruned unit with non-zero weights."""
    if old is None or old.device.type == "meta" or m.old_shape is None or m.unexplained:
        return None
    if not (m.removed_data_all or any(bool(b.removed_data.any()) for b in m.blocks)):
        return None
    from .apply import _block_view
    with torch.no_grad():
        if m.removed_data_all:
            peak = _peak(old)
        else:
            view, _ = _block_view(old, m.blocks, "old_shape")
            peak = 0.0
            for d, b in enumerate(m.blocks):
                idx = torch.nonzero(b.removed_data).reshape(-1)
                if idx.numel():
                    peak = _worse(peak, _peak(view.index_select(d, idx.to(view.device))))
    if peak == 0.0:
        return None
    labels = m.removed_met & space.removed_data
    units = any(space.label(t).kind == "unit" for t in labels)
    what = "pruned units" if units and all(space.label(t).kind == "unit" for t in labels) else "removed input"
    return Issue(what, name, f"meets {describe(labels, space)}, which the new model lacks, with non-zero weights "
                 f"({_magnitude(peak)}): " + (
                     "NaN or an infinity times zero is NaN, so the old model's results that meet them are NaN "
                     "whatever these positions hold" if not math.isfinite(peak) else
                     f"the new model computes what the old one did only where "
                     f"{'these units are' if what == 'pruned units' else 'these inputs are'} zero"))


def kept_nonfinite(name: str, m, new: torch.Tensor | None) -> Issue | None:
    """A new parameter's elements kept with the new model's values (a new unit's incoming
    weights, an unexplained re-initialisation) that are NaN or infinite. Preservation rests on
    the zeros written next to them cancelling them (a new unit's outgoing weights), and NaN or
    an infinity times zero is NaN. Rows of new categories are left out: only new categories
    read them."""
    if new is None or new.device.type == "meta" or not (new.dtype.is_floating_point or new.dtype.is_complex):
        return None
    with torch.no_grad():
        if _all_finite(new):   # the common case: one read of the tensor, no mask
            return None
        if m.zero_all and not m.unexplained:
            return None   # zeroed whole, or (a new category met throughout) read for new categories only
        if m.unexplained:
            view, kept = new, None   # re-initialised whole: every element keeps the new model's value
        else:
            from .apply import _block_view
            view, _ = _block_view(new, m.blocks, "new_shape")
            copied = torch.ones((), dtype=torch.bool) if m.copy else torch.zeros((), dtype=torch.bool)
            other = torch.zeros((), dtype=torch.bool)
            for d, b in enumerate(m.blocks):
                shape = [1] * len(m.blocks)
                shape[d] = b.n_new
                copied = copied & b.copied.reshape(shape)
                other = other | (b.zero | b.category).reshape(shape)
            kept = ~copied & ~other
        bad = ~torch.isfinite(view)
        if kept is not None:
            bad = bad & kept.to(bad.device)
        n = int(bad.sum())
        if not n:
            return None
        nan = bool((torch.isnan(view) & bad).any()) if kept is not None else bool(torch.isnan(view).any())
    return Issue("non-finite", name, f"{n:,} of its elements kept with the new model's values "
                 f"{'are' if n > 1 else 'is'} {'NaN' if nan else 'infinite'}: the zeros written next to them do not "
                 "cancel them (NaN or an infinity times zero is NaN), function preservation is impossible here; "
                 "initialise the new model with finite values")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN and no infinity in `t`. A finite sum proves it (a NaN or an infinity makes the
    sum NaN or infinite) at a seventh of the cost of torch.isfinite, which writes a mask as
    large as the tensor; only a sum that overflows needs the exact check."""
    if not t.numel():
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    if bool(torch.isfinite(total).all()):
        return True
    return bool(torch.isfinite(t).all())


def _peak(t: torch.Tensor) -> float:
    """The largest |w| of a tensor: NaN if it holds a NaN (torch's max propagates it; the
    caller must not fold it with Python's max, for which max(0.0, nan) is 0.0)."""
    if not t.numel():
        return 0.0
    return float(t.abs().max())


def _worse(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _magnitude(peak: float) -> str:
    if math.isnan(peak):
        return "some are NaN"
    if math.isinf(peak):
        return "some are infinite"
    return f"max |w| = {peak:.3g}"


def unmatched(space: LabelSpace, name: str, old_name: str, m, inserted: bool = False) -> Issue | None:
    """Elements the labels do not account for: new elements that are not copied yet neither
    meet nor are aligned with a new label (they keep the new model's values), and old elements
    that are not copied yet hold no removed label (their values are lost). Both mean that one
    weight plays several roles whose labels moved apart (a stream channel that is a feature of
    one input and a hidden unit of another, a weight shared between old and new positions of a
    widened axis, a grouped layer regrouped): function preservation cannot be claimed.
    `inserted`: the parameter is aligned with an inserted layer's hidden axis (an alias of
    `units`); its uncopied new elements are explained (inserted layer: they keep the values it
    was built with) and not counted."""
    new_bad, old_bad = m.n_unmatched()
    if inserted:
        new_bad = 0
    if not new_bad and not old_bad:
        return None
    parts = []
    if new_bad:
        parts.append(f"{new_bad:,} of its elements {'is' if new_bad == 1 else 'are'} not copied although they meet and are aligned with no new "
                     "label (they keep the new model's values)")
    if old_bad:
        lost = (f"{old_bad:,} element{'' if old_bad == 1 else 's'} of the old {old_name} "
                f"{'is' if old_bad == 1 else 'are'} not copied although {'it holds' if old_bad == 1 else 'they hold'} "
                "no removed label")
        if m.zero_all and m.new_met:
            lost += (f" (every element meets new {describe(m.new_met, space)}: the weight is shared between old "
                     "and new positions, and zeroed whole)")
        parts.append(lost)
    return Issue("unmatched", name, "; ".join(parts) + ": the labels do not tell which old element each new one "
                 "plays the role of, function preservation is not guaranteed here")
