"""A residual stream widened through its norms, exactly (the construction of LEMON, Wang et al.
2024, for any width at least the old one; see proofs/widen_norms.py).

The stream's old width is d, its new one D. Every writer of the stream (embeddings, output
projections, their biases) writes into each new coordinate the mean of what it writes into
the old ones, so that the stream's new coordinates hold the mean mu of its old ones (the stream
is a sum of writes, and a mean of sums is the sum of means). A LayerNorm over D then sees the
same mean and a variance of d/D times the old one (the new coordinates sit at the mean); with
its epsilon scaled by d/D too,

    (x_i - mu) / sqrt(d/D var + d/D eps) = sqrt(D/d) (x_i - mu) / sqrt(var + eps),

so the old weights scaled by sqrt(d/D) give the old outputs, and the new coordinates, being
exactly mu, normalise to zero: with a zero bias there they are zero, and whatever reads the
norm's output sees nothing new. An RMSNorm is the same with zeros for the new coordinates
(its statistic is the mean square, which zeros scale by d/D). A post-norm model (BERT) reads
the norm's output as the stream itself, whose new coordinates then are zero, not the mean:
there the construction is not exact, and the verification says so.

Which parameters write the stream, and which norms normalise it, is read off the map: the
stream's hidden axes are those whose labels the norms' weights hold.
"""
from __future__ import annotations

import math

import torch

from ..surgery.training_state import entries_by_name
from .layers import groups_in_keys, owned_parameters

__all__ = ["EPSILON_FIELDS", "scaled_epsilons", "widen_through_norms"]


def scaled_epsilons(config, ratio: float) -> dict:
    """{config field: epsilon * ratio} for every norm epsilon of the config
    (layer_norm_epsilon, layer_norm_eps, rms_norm_eps, ...)."""
    out = {}
    for key, value in config.to_dict().items():
        if "eps" in key and isinstance(value, float) and not isinstance(value, bool):
            out[key] = value * ratio
    return out


EPSILON_FIELDS = "every float config field whose name holds 'eps' (layer_norm_epsilon, rms_norm_eps, ...)"


def _kind(module) -> str | None:
    if isinstance(module, torch.nn.LayerNorm):
        return "mean"
    if isinstance(module, getattr(torch.nn, "RMSNorm", ())) or type(module).__name__.endswith("RMSNorm"):
        return "zero"
    return None


def _norms(old_model, new_model, rename_back, old_width: int, new_width: int) -> dict:
    """{new norm module name: "mean" | "zero"} for the norms over the widened stream."""
    old_modules = dict(old_model.named_modules())
    out = {}
    for name, m in new_model.named_modules():
        kind = _kind(m)
        w = getattr(m, "weight", None)
        old = old_modules.get(rename_back(name))
        ow = getattr(old, "weight", None)
        # A norm the old model lacks (in an added layer, whose writes are zeroed) computes
        # nothing the outputs see; it is counted so that its issue goes too.
        if kind and w is not None and tuple(w.shape) == (new_width,) and \
                (old is None or ow is not None and tuple(ow.shape) == (old_width,)):
            out[name] = kind
    return out


def widen_through_norms(plan, new_model, old_model, old_width: int, new_width: int, rename_back,
                        seed: int | None = 0) -> list[str]:
    """Rewrites, in `new_model` (after `plan.apply()`), the writers of the widened stream and
    the norms over it as the module docstring says, and drops the plan's normalisation issues
    at those norms. Returns notes, or [] when the construction does not apply (norms of two
    kinds over one stream, or none recognised).

    With a `seed`, the weights that read the norms' outputs at the new coordinates (the
    planner zeroed them: they meet new labels) are drawn at random instead. The norms' outputs
    there are exactly zero, so the function does not change; but zero readers would leave the
    new coordinates without a gradient (an RMSNorm's output there is w * 0, a LayerNorm's its
    zero bias), and all of them equal, so that they would never learn: random readers give each
    new coordinate its own gradient from the first step."""
    norms = _norms(old_model, new_model, rename_back, old_width, new_width)
    if not norms or len(set(norms.values())) != 1:
        return []
    fill = next(iter(norms.values()))
    norm_params = {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    stream = groups_in_keys(plan.new_map, lambda name, e: not any(a in norm_params for a in (e.aliases or (name,))))
    state = new_model.state_dict()
    modules = dict(new_model.named_modules())
    masks = plan.masks()
    masks = {a: masks[e] for a, e in entries_by_name(plan).items() if e in masks}   # tied names too
    shrink = math.sqrt(old_width / new_width)
    writers = []
    with torch.no_grad():
        for group in sorted(stream):
            axis = int(group.rsplit(":", 1)[1]) if ":" in group else 0
            for name in owned_parameters(state, group):
                value = state[name]
                a = axis if value.dim() > axis else 0
                if value.shape[a] != new_width:
                    continue
                old = _old_positions(masks, name, a, value)
                if old is None or int(old.sum()) != old_width:
                    continue
                _fill(value, a, old, fill)
                writers.append(name)
        for n in norms:
            w, b = state.get(f"{n}.weight"), state.get(f"{n}.bias")
            old = _old_positions(masks, f"{n}.weight", 0, w)
            if old is None:
                continue
            # The scale the norm applies is offset + weight: Gemma's RMSNorm multiplies by
            # (1 + weight); the offset is measured, not assumed (_offset).
            offset = _offset(modules[n])
            scale = (w[old].float() + offset) * shrink
            w[old] = (scale - offset).to(w.dtype)
            w[~old] = ((scale.mean() if fill == "mean" else 1.0) - offset)
            if b is not None:
                b[~old] = 0
    readers = _wake_readers(state, masks, plan, norms, writers, new_width, seed) if seed is not None else []
    handled = {f"({n})" for n in norms}
    plan.issues = [i for i in plan.issues
                   if not (i.kind == "normalisation" and any(h in i.where for h in handled))]
    woken = (f"; the {len(readers)} parameter(s) reading the new coordinates drawn at random (seed {seed}), "
             "which the zero norm outputs there keep exact") if readers else ""
    return [f"the residual stream is widened from {old_width} to {new_width} through {len(norms)} norm(s) "
            f"({', '.join(sorted(norms)[:4])}{', ...' if len(norms) > 4 else ''}): its new coordinates are "
            f"written {'the mean of the old ones' if fill == 'mean' else 'as zeros'} by {len(writers)} writer "
            f"parameter(s), the norms' weights scaled by sqrt({old_width}/{new_width}) and their epsilon by "
            f"{old_width}/{new_width} (LEMON's construction){woken}"]


def _old_positions(masks, name, axis, value):
    """Bool (n,) along `axis` of `name`: the positions that hold old stream coordinates."""
    if name not in masks or value is None:
        return None
    copied = masks[name].copied
    if copied.dim() == 0 or not copied.any():
        return None
    other = tuple(d for d in range(copied.dim()) if d != axis)
    return copied.any(dim=other) if other else copied


def _fill(value: torch.Tensor, axis: int, old: torch.Tensor, fill: str) -> None:
    moved = value.movedim(axis, 0)           # a view: writes go to `value`
    if fill == "mean":
        moved[~old] = moved[old].mean(0, keepdim=True).to(moved.dtype)
    else:
        moved[~old] = 0


def _wake_readers(state, masks, plan, norms, writers, width: int, seed: int) -> list[str]:
    """Draws the zeroed slabs of the parameters that read the stream at its new coordinates
    (see widen_through_norms). A reader is found by its mask alone: an axis of the stream's
    width along which every new coordinate's slab was zeroed by the plan."""
    norm_weight = next(f"{n}.weight" for n in norms)
    old = _old_positions(masks, norm_weight, 0, state[norm_weight])
    if old is None:
        return []
    new_pos = torch.nonzero(~old).reshape(-1)
    skip = {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    taken = {state[w].data_ptr() for w in writers}   # a tied reader is a writer too: left alone
    g = torch.Generator().manual_seed(seed)
    drawn = []
    with torch.no_grad():
        for name, entry in plan.params.items():
            value = state.get(name)
            if name in skip or name in writers or value is None or entry.old_name is None or \
                    value.data_ptr() in taken or name not in masks or not value.is_floating_point():
                continue
            zeroed = masks[name].zeroed
            for axis in range(value.dim()):
                if value.shape[axis] != width or value.dim() < 2:
                    continue
                slab = zeroed.index_select(axis, new_pos)
                if not bool(slab.all()):
                    continue
                copied = value[masks[name].copied]
                scale = float(copied.std()) if copied.numel() > 1 else 0.02
                shape = list(value.shape)
                shape[axis] = new_pos.numel()
                noise = torch.randn(shape, generator=g, dtype=torch.float32).to(value.dtype) * scale
                value.index_copy_(axis, new_pos, noise)
                drawn.append(name)
                break
    return drawn


def _offset(module) -> float:
    """The a in the norm's scale a + weight (0 for LayerNorm and Llama's RMSNorm, 1 for Gemma's),
    measured: a copy with its weight and bias zeroed, on a row of +1 and -1 (mean 0, variance
    and mean square 1), puts out a * x / sqrt(1 + eps)."""
    import copy
    probe = copy.deepcopy(module).float()
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
        n = probe.weight.shape[0]
        x = torch.ones(1, n)
        x[0, 1::2] = -1
        if n % 2:
            x[0, -1] = 0          # an odd row: keep the mean at zero (the statistic then differs: measured)
        out = probe(x).float()
        normalised = x / torch.sqrt((x * x).mean() + _eps(probe))
        at = normalised.abs().argmax()
        value = float(out.reshape(-1)[at] / normalised.reshape(-1)[at])
    return float(round(value)) if abs(value - round(value)) < 1e-3 else value


def _eps(module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(module, name, None)
        if isinstance(v, float):
            return v
    return 0.0
