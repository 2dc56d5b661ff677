"""Fault injection for the tests: make the k-th tensor write raise, and fingerprint a
model's state to show that nothing was written.

    with fail_at("copy_", 2, KeyboardInterrupt):
        plan.apply()                      # the 2nd Tensor.copy_ raises KeyboardInterrupt

    with count_calls("copy_") as calls:   # how many writes a run makes (to fail at the last)
        plan.apply()
    calls.count

`method_name` is a `torch.Tensor` method (`copy_`, `index_fill_`, `index_copy_`, `zero_`,
`fill_`, `__setitem__`, ...), `"data"` for assignments to `.data`, or `"write"` for any of
`WRITE_METHODS`, counted together. Only calls made from Python are seen (torch's C++ does not
come back through these attributes), which is where a library's writes are. This module
depends on nothing but torch, so any test module can import it.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

__all__ = ["WRITE_METHODS", "Calls", "count_calls", "fail_at", "state_hash"]

WRITE_METHODS = ("copy_", "index_fill_", "index_copy_", "index_put_", "masked_fill_", "zero_", "fill_",
                 "__setitem__", "set_", "data")

_BASE = torch._C.TensorBase


class Calls:
    """The number of patched calls made so far, and the k-th one that raises (0: none)."""

    def __init__(self, k: int = 0, exc=RuntimeError):
        self.count, self.k, self.exc, self.raised = 0, k, exc, False

    def hit(self, name: str) -> None:
        self.count += 1
        if self.count == self.k:
            self.raised = True
            exc = self.exc
            raise exc(f"injected fault: call {self.count} to Tensor.{name}") if isinstance(exc, type) else exc


def _names(method_name: str) -> tuple[str, ...]:
    if method_name == "write":
        return WRITE_METHODS
    if method_name != "data" and not hasattr(_BASE, method_name) and not hasattr(torch.Tensor, method_name):
        raise ValueError(f"fail_at: torch.Tensor has no method {method_name!r}")
    return (method_name,)


def _wrap(name: str, calls: Calls):
    if name == "data":
        getter = _BASE.data.__get__

        def set_data(self, value):
            calls.hit("data")
            _BASE.data.__set__(self, value)

        return property(lambda self: getter(self), set_data)
    original = getattr(torch.Tensor, name)

    def patched(self, *args, **kwargs):
        calls.hit(name)
        return original(self, *args, **kwargs)

    patched.__name__ = name
    return patched


@contextlib.contextmanager
def _patched(method_name: str, calls: Calls):
    names = _names(method_name)
    saved = {n: torch.Tensor.__dict__.get(n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, _wrap(n, calls))
        yield calls
    finally:
        for n, old in saved.items():
            if old is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, old)


@contextlib.contextmanager
def fail_at(method_name: str, k: int, exc=RuntimeError):
    """Within the block the k-th call (from 1) to `torch.Tensor.<method_name>` raises `exc`
    (an exception class, called with a message, or an instance). Yields the `Calls` counter:
    `calls.raised` says whether the fault was reached."""
    if k < 1:
        raise ValueError(f"fail_at: k counts calls from 1, got {k}")
    with _patched(method_name, Calls(k, exc)) as calls:
        yield calls


@contextlib.contextmanager
def count_calls(method_name: str):
    """Counts the calls to `torch.Tensor.<method_name>` within the block (nothing raises)."""
    with _patched(method_name, Calls()) as calls:
        yield calls


def state_hash(module: torch.nn.Module, objects: bool = False) -> dict[str, str]:
    """A digest of every parameter and buffer (tied names each listed), from dtype, shape,
    device and bytes: two calls agree exactly when no value changed. With `objects`, also
    which tensor object each name holds, so that a replaced registration (`m.w = Parameter(...)`)
    shows as a change too (then only hashes of one model, compared over time, can agree)."""
    out = {}
    items = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in items:
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}{t.device.type}{id(t) if objects else ''}".encode())
        if t.device.type != "meta":
            flat = t.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        out[name] = h.hexdigest()
    return out


def nth_call_raises(real, k: int, exc: BaseException):
    """A stand-in for the function `real` whose k-th call (from 1) raises `exc`; the others call
    through. For monkeypatching a module's function (a rule, `build`, `match`)."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise exc
        return real(*args, **kwargs)
    return stand_in
