"""Handing prepared tensors to the new model, all or nothing, without touching the old one.

`SurgeryPlan.apply` prepares every new value in fresh memory first; a `Commit` then hands
them over and can take every step back. A step only re-points: a Parameter or buffer is given
its new tensor as storage (`.data = value`, so the object, and with it every tie, stays), or a
module attribute is given a new object. No storage the new model already owns is written, so
undoing never needs a copy of the old contents, and no storage of the old model is written at
all.

Sharing: when the user built the new model from the old one's modules (`new.fc1 = old.fc1`),
one Parameter object is registered in both, and re-pointing it would change the old model
too. Such a tensor gets a new object in the new model: its registration is replaced, in every
place the new model registers it (so ties within the new model stay ties), and every module
on the way that the old model holds as well is replaced in the new model by a shallow copy of
its own (the old model keeps its objects). A tensor of the new model that is a separate object
but views memory of the old model is simply re-pointed.
"""
from __future__ import annotations

import copy

import torch

from .errors import SurgeryError

__all__ = ["Commit", "OldMemory", "state_tensors"]


def state_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) the model registers, parameters then buffers, tied names each listed."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


class OldMemory:
    """What the old model owns: its modules and tensors (objects), and the byte ranges of their
    storages, to tell whether a tensor of the new model would alias it."""

    def __init__(self, model: torch.nn.Module):
        self.modules = {id(m) for m in model.modules()}
        tensors = [t for _, t in state_tensors(model)]
        self.tensors = {id(t) for t in tensors}
        spans = sorted({_span(t) for t in tensors if t.device.type != "meta"} - {None})
        self.spans = spans

    def overlaps(self, t: torch.Tensor) -> bool:
        """True when `t` is one of the old model's tensors or its storage overlaps one of theirs
        (the same storage, or two storages over one buffer, as `torch.from_numpy` makes)."""
        if id(t) in self.tensors:
            return True
        span = _span(t)
        if span is None:
            return False
        lo, hi, dev = span
        return any(d == dev and a < hi and lo < b for a, b, d in self.spans)


def _span(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    s = t.untyped_storage()
    if s.nbytes() == 0:
        return None
    return s.data_ptr(), s.data_ptr() + s.nbytes(), str(t.device)


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A module object of its own with the same attributes; its containers (registrations,
    hooks, an RNN's list of flat weights) are copies, so that changing it leaves `module` alone."""
    out = module.__class__.__new__(module.__class__)
    out.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                         for k, v in module.__dict__.items()})
    return out


class Commit:
    """An undo log over the new model. Every change is recorded before it is made; `undo()`
    reverts them newest first."""

    def __init__(self):
        self.log: list = []

    def set_data(self, target: torch.Tensor, value: torch.Tensor) -> None:
        self.log.append(("data", target, target.data))
        target.data = value

    def set_attr(self, module: torch.nn.Module, name: str, value) -> None:
        # Through Module.__setattr__, which keeps what modules derive from their
        # registrations in step (an LSTM's flat weight list).
        before = module._parameters.get(name, module._buffers.get(name, module._modules.get(name)))
        self.log.append(("attr", module, name, before))
        setattr(module, name, value)

    def own(self, root: torch.nn.Module, old: OldMemory, replace: dict) -> None:
        """Registers replace[id(t)] instead of each tensor t of the new model that is keyed
        there, copying the modules shared with the old model on the way (see the module
        docstring)."""
        if id(root) in old.modules:
            raise SurgeryError("the new model is the old model, or one of its modules: build the new model apart "
                               "(e.g. new = copy.deepcopy(old), then change the copy); nothing was written")
        done: dict[int, torch.nn.Module] = {}

        def visit(module):
            if id(module) in done:
                return done[id(module)]
            done[id(module)] = module       # (a cycle of modules ends here)
            changes = {}
            for name, child in module._modules.items():
                if child is not None:
                    got = visit(child)
                    if got is not child:
                        changes[name] = got
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and id(t) in replace:
                        changes[name] = replace[id(t)]
            if not changes:
                return module
            target = _shallow_copy(module) if id(module) in old.modules else module
            done[id(module)] = target
            for name, value in changes.items():
                self.set_attr(target, name, value)
            return target

        visit(root)

    def undo(self) -> None:
        """Reverts every recorded change. A step interrupted (a second Ctrl-C) is tried again,
        so that the model is not left half restored; the first such error is raised after."""
        pending = None
        for entry in reversed(self.log):
            for attempt in range(3):
                try:
                    if entry[0] == "data":
                        entry[1].data = entry[2]
                    else:
                        _, module, name, before = entry
                        if before is None:
                            delattr(module, name)
                        else:
                            setattr(module, name, before)
                    break
                except BaseException as err:   # noqa: BLE001 (re-raised below)
                    pending = pending or err
        self.log.clear()
        if pending is not None:
            raise pending
