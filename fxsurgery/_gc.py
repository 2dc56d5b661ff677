"""Python's cyclic garbage collector paused around bulk work (a context manager, also usable
as a decorator: `@gc_paused()`).

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

