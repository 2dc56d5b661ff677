"""`fxsurgery coverage`: the command lives with the coverage table it prints."""
from __future__ import annotations

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    from ..coverage import add_subcommand
    add_subcommand(subparsers)
