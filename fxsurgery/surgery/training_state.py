"""Training state through a plan: which elements are new, and the optimizer's state carried.

A model grown mid-training keeps training, so its optimizer must too: Adam's moments (and
SGD's momentum) are per element like the weights, and an element copied from the old model
is the same element, with the same history. The plan already says, per parameter, where each
new element comes from; carrying a state tensor is the same gather as carrying the weight
(`apply.build`), with zero where the element is new. Scalars (Adam's `step`) are copied.

The masks are what a user needs to treat new elements apart: freeze the copied ones, give
the new ones their own learning rate, warm them up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .apply import build
from .errors import SurgeryError

__all__ = ["ElementMasks", "element_masks", "copied_mask", "entries_by_name", "carry_state", "carry_optimizer", "carry_optimizer_state_dict"]


@dataclass
class ElementMasks:
    """Boolean tensors of a new parameter's shape."""
    copied: torch.Tensor    # copied from an old element
    new: torch.Tensor       # not copied: zeroed, mean-initialised or kept as the new model built it
    zeroed: torch.Tensor    # new and set to zero by the plan


def copied_mask(m, device=None) -> torch.Tensor:
    """Bool, the new parameter's shape: the elements `m` copies from the old parameter."""
    if m.old_shape is None or not m.copy:
        return torch.zeros(tuple(m.new_shape), dtype=torch.bool, device=device)
    return build(m, torch.ones(m.old_shape, device=device), torch.zeros(tuple(m.new_shape), device=device)) > 0


def entries_by_name(plan) -> dict[str, str]:
    """Every new state name (tied aliases included) -> the plan entry it belongs to."""
    return {a: name for name, p in plan.params.items() for a in (p.aliases or (name,))}


def element_masks(plan) -> dict[str, ElementMasks]:
    """{new parameter or buffer name: its masks}, for every entry of the plan (tied names share
    one entry, under the first name)."""
    out = {}
    for name, p in plan.params.items():
        if not p.persistent:
            continue
        m = p.match
        shape = tuple(m.new_shape)
        copied = copied_mask(m) if p.old_name is not None else torch.zeros(shape, dtype=torch.bool)
        zeroed = ~copied & (build(m, torch.zeros(m.old_shape) if m.old_shape is not None else None,
                                  torch.ones(shape), plan.new_categories) == 0)
        out[name] = ElementMasks(copied=copied, new=~copied, zeroed=zeroed)
    return out


SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")   # Adam's, AdamW's and AMSGrad's per-element scales


def carry_state(plan, old_state: dict, new_scale: str = "zero") -> dict:
    """{new parameter name: state} from {old parameter name: state}, a state being a dict of
    per-element tensors (the old parameter's shape) and scalars. Copied elements keep their
    values, new ones are zero; a parameter with no old counterpart gets no state (an
    optimizer then starts it afresh).

    new_scale="mean" gives new elements the mean second moment of the parameter's copied ones
    instead of zero: the step count is the parameter's, carried, so with zero moments Adam's
    bias correction no longer damps a new element's first updates, which come out about
    sqrt(1 / (1 - beta2)) times larger than a fresh start's; a typical second moment keeps them
    at the old elements' size."""
    out = {}
    for name, p in plan.params.items():
        state = old_state.get(p.old_name) if p.old_name is not None else None
        if state is None or not p.persistent:
            continue
        new_state = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.match.old_shape or ()) \
                    and value.dim() > 0:
                zeros = torch.zeros(p.match.new_shape, dtype=value.dtype, device=value.device)
                carried = build(p.match, value, zeros, "zero")
                if new_scale == "mean" and key in SECOND_MOMENTS and carried is not value:
                    copied = copied_mask(p.match, value.device)
                    if copied.any() and not copied.all():
                        carried[~copied] = carried[copied].mean()
                new_state[key] = carried.clone() if carried is value else carried
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                raise SurgeryError(f"optimizer state {key!r} of {p.old_name} has shape {tuple(value.shape)}, not the "
                                   f"parameter's {tuple(p.match.old_shape)}: it cannot be carried element by element")
            else:
                new_state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        out[name] = new_state
    return out


def _names(model, params) -> list[str]:
    """The name of each parameter object of `params` in `model` (first name of tied ones)."""
    by_id = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(t), n)
    names = []
    for t in params:
        if id(t) not in by_id:
            raise SurgeryError(f"the optimizer holds a parameter of shape {tuple(t.shape)} that is not one of "
                               f"{type(model).__name__}'s")
        names.append(by_id[id(t)])
    return names


def carry_optimizer_state_dict(plan, state_dict: dict, new_param_names: list[str], old_param_names=None,
                               new_scale: str = "zero") -> dict:
    """An optimizer state_dict for the new model from the old one's. `state_dict` indexes its
    parameters by position in its param groups: `old_param_names` names them (default: the old
    model's `parameters()` order, which is how an optimizer is usually built);
    `new_param_names` names the new optimizer's parameters in the same way. The param groups'
    hyperparameters are the old ones, every new parameter in the first group."""
    old_model = plan.old.model
    if old_param_names is None:
        old_param_names = _names(old_model, list(old_model.parameters()))
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or "state" not in state_dict:
        raise SurgeryError("an optimizer state_dict has 'state' and 'param_groups'; got keys "
                           f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
    indices = [i for g in groups for i in g["params"]]
    if len(indices) != len(old_param_names):
        raise SurgeryError(f"the optimizer state holds {len(indices)} parameters but the old model has "
                           f"{len(old_param_names)}; pass old_param_names in the optimizer's order")
    name_of = dict(zip(indices, old_param_names))
    old_state = {name_of[i]: s for i, s in state_dict["state"].items()}
    carried = carry_state(plan, old_state, new_scale)
    group_of_old = {name_of[i]: k for k, g in enumerate(groups) for i in g["params"]}
    new_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in groups]
    state = {}
    entry_of = entries_by_name(plan)
    for index, name in enumerate(new_param_names):
        entry = entry_of.get(name)
        p = plan.params.get(entry) if entry is not None else None
        group = group_of_old.get(p.old_name, 0) if p is not None and p.old_name is not None else 0
        new_groups[group]["params"].append(index)
        if entry in carried:
            state[index] = carried[entry]
    return {"state": state, "param_groups": new_groups}


def carry_optimizer(plan, old_optimizer: torch.optim.Optimizer, new_optimizer: torch.optim.Optimizer,
                    new_scale: str = "zero"):
    """Loads into `new_optimizer` (built over the new model's parameters, with its own
    hyperparameters) the state of `old_optimizer` (over the old model's), carried element by
    element. Returns `new_optimizer`."""
    old_params = [t for g in old_optimizer.param_groups for t in g["params"]]
    new_params = [t for g in new_optimizer.param_groups for t in g["params"]]
    old_names = _names(plan.old.model, old_params)
    new_names = _names(plan.new.model, new_params)
    sd = carry_optimizer_state_dict(plan, old_optimizer.state_dict(), new_names, old_names, new_scale)
    own = new_optimizer.state_dict()
    sd["param_groups"] = own["param_groups"]      # the new optimizer's groups and hyperparameters
    new_optimizer.load_state_dict(sd)
    return new_optimizer
