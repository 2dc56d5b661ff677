"""What the commands share: progress messages and the arguments every model-taking command has."""
from __future__ import annotations

import sys

__all__ = ["log", "progress", "add_format_arguments"]


def log(args, message: str) -> None:
    """A progress message on stderr (stdout holds the tables a pipeline reads)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def progress(args):
    """The progress argument of mapping, planning and streaming: no bar with --quiet, else a bar
    on stderr when it is a terminal (fxsurgery.progress)."""
    return False if getattr(args, "quiet", False) else None


def add_format_arguments(p, quiet: bool = True) -> None:
    p.add_argument("--format", default="simple", help="table format (tabulate's tablefmt)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress messages or bars on stderr")
