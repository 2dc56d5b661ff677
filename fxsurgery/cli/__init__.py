"""Command line: `fxsurgery map pkg.module:factory ...`, for pipelines that do not write Python.

One module per command (`fxsurgery.cli.map`, `.plan`, `.transplant`, `.rewrite`, `.coverage`),
each with `add_parser(subparsers)`; COMMANDS lists them, and one that fails to import is an
error, never a command silently missing. Every failure is one line on stderr and exit status 2
(130 for an interrupt); FXSURGERY_DEBUG=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .errors import CliError, one_line
from .factories import build, load_factory, read_json_object

__all__ = ["main", "parser", "COMMANDS", "CliError", "load_factory", "build", "read_json_object"]

# The commands, in the order --help lists them.
COMMANDS = ("map", "plan", "transplant", "rewrite", "coverage")
DEBUG_VARIABLE = "FXSURGERY_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line too (its usage block is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_modules():
    modules = []
    for name in COMMANDS:
        module_name = f"{__name__}.{name}"
        try:
            modules.append(importlib.import_module(module_name))
        except Exception as err:  # noqa: BLE001 - reported, and fatal: a missing command is a bug
            raise CliError(f"cannot load the command {name!r} (module {module_name}): "
                           f"{type(err).__name__}: {one_line(err)}") from err
    return modules


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fxsurgery", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        module.add_parser(sub)
    return p


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _expected_errors() -> tuple:
    """Errors that describe bad input and say what to do: their message alone is the report."""
    from ..capture import CaptureError, InputError
    return CliError, CaptureError, InputError, KeyError, ValueError


def main(argv=None) -> int:
    try:
        p = parser()
    except CliError as err:
        print(f"fxsurgery: error: {err}", file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    prefix = f"fxsurgery {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if _debugging():
            traceback.print_exc()
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure is one line and status 2
        if _debugging():
            traceback.print_exc()
        if isinstance(err, _expected_errors()):
            print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        else:
            print(f"{prefix}: error: {type(err).__name__}: {one_line(err)} "
                  f"(run with {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        return 2
