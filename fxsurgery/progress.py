"""Progress bars for long work (mapping, planning, streaming checkpoints).

The `progress` argument of `interaction_map`, `plan` and `apply_to_checkpoint` means the same
in each:

- None (the default): a tqdm bar on stderr when stderr is a terminal, tqdm is installed and
  the work is large enough to be worth one; otherwise nothing. Inside `no_bars()`, nothing.
- True: a tqdm bar whatever the size (an error naming tqdm when it is not installed).
- False: nothing.
- a callable(what, done, total): called as the work advances, nothing printed.

Bars go to stderr, never stdout, which carries the tables pipelines read. tqdm is optional.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys

__all__ = ["Bar", "open_bar", "steps", "counted", "check", "no_bars", "LARGE_GRAPH"]

# With progress=None, mapping and planning show a bar from this many graph nodes on: below it
# a bar would mostly flash and vanish (zoo.five_large's 367 nodes map in under a second), above
# it the work is long enough to tell "slow" from "stuck". Measured on a Llama-shaped decoder
# (hidden 4096, 73 nodes a layer, 138 for one layer with its 128k-row embedding and head):
# about 1.2 s a layer, so 1,000 nodes (13 layers) map in about 15 s, and the 32 layers of an
# 8B model (about 2,400 nodes) in about 40 s by the same count.
LARGE_GRAPH = 1_000

_quiet = contextvars.ContextVar("fxsurgery_no_bars", default=False)


@contextlib.contextmanager
def no_bars():
    """Within it, progress=None shows no bar (for callers that cannot pass progress=False
    down to the mapping and planning they start, such as the rewriting passes)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)   # sys.stderr may be None (pythonw) or a plain object
    try:
        return bool(isatty and isatty())
    except ValueError:   # a closed stream
        return False


def check(progress, error: type[Exception] = ImportError) -> None:
    """Raises `error` for a progress argument that is not True, False, None or a callable, or
    that is True while tqdm is not installed (before any work starts)."""
    if progress is None or progress is False or callable(progress):
        return
    if progress is not True:
        raise TypeError(f"progress must be True, False, None or a callable(what, done, total), got {progress!r}")
    if _tqdm() is None:
        raise error("progress=True needs tqdm (pip install tqdm); pass progress=False")


class Bar:
    """Reports `done` out of `total` to a callable or a tqdm bar; `close()` ends the bar (and is
    what a `with` block calls, so that a failure midway leaves no bar behind)."""

    def __init__(self, what: str, total: int, callback=None, bar=None):
        self.what, self.total = what, total
        self.done = 0
        self._callback, self._bar = callback, bar

    def update(self, done: int, name: str | None = None) -> None:
        """`done` units of the total are finished (`name` is passed to a callable instead of `what`)."""
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self._callback is not None:
            self._callback(self.what if name is None else name, done, self.total)

    def step(self) -> None:
        """One more unit finished."""
        self.update(self.done + 1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bar(progress, what: str, total: int, *, nodes: int | None = None, error: type[Exception] = ImportError,
             **tqdm_kwargs) -> Bar | None:
    """A Bar for the progress argument, or None when nothing is to be shown (so that the work
    checks `is not None` and does nothing else). `nodes`: the size of the graph the work is
    about; with progress=None, below LARGE_GRAPH nodes no bar is shown (None: any size). `error`
    is raised, naming tqdm, for progress=True without it; tqdm_kwargs go to tqdm (unit...)."""
    check(progress, error)
    if callable(progress):
        return Bar(what, total, callback=progress)
    if progress is False:
        return None
    if progress is None and ((nodes is not None and nodes < LARGE_GRAPH) or _quiet.get() or not _terminal()):
        return None
    tqdm = _tqdm()
    if tqdm is None:   # progress=None: no bar without tqdm (check raised for True)
        return None
    return Bar(what, total, bar=tqdm(total=total, desc=what, file=sys.stderr, **tqdm_kwargs))


@contextlib.contextmanager
def steps(progress, what: str, total: int, **kwargs):
    """`with steps(progress, what, total) as step:` gives the function to call after each unit
    of work, or None when nothing is shown (the per-unit cost is then one `is not None`); the
    bar is closed however the block ends. Arguments as for `open_bar`."""
    bar = open_bar(progress, what, total, **kwargs)
    if bar is None:
        yield None
        return
    with bar:
        yield bar.step


def counted(items, step):
    """`items`, with step() called after the loop's body has run for each item (also one it
    leaves by `continue`); `items` itself when step is None."""
    if step is None:
        return items
    return _counting(items, step)


def _counting(items, step):
    for item in items:
        yield item
        step()
