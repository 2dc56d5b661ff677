"""The command line's own error: a failure the user can fix, reported in one line."""
from __future__ import annotations

__all__ = ["CliError", "one_line"]


class CliError(Exception):
    """Bad input to the command line (a file, a flag, a factory): its message names it and says
    what to do; `main` prints it as one line and exits with status 2."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (exporters and planners write several)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) is the repr of its argument
    else:
        text = str(err)
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text or type(err).__name__
