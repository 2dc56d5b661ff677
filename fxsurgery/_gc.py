"""Python's cyclic garbage collector paused around bulk work.

Mapping and planning a large model make hundreds of thousands of small objects (frozensets of
tokens, Labels, dict entries) that are all kept; each allocation burst triggers a collection
that walks every live object, and on a Llama-shaped decoder those walks were a quarter of a
plan's time. Nothing made there is a reference cycle that needs collecting before the end.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def paused(fn):
    """`fn` run with the collector paused (a decorator)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gc_paused():
            return fn(*args, **kwargs)
    return wrapper
