"""`fxsurgery map pkg.module:factory`: which parameters meet which input labels."""
from __future__ import annotations

import json

from .common import add_format_arguments, progress
from .factories import build, capture
from .files import check_distinct, check_output, write_atomically

__all__ = ["add_parser", "run"]


def run(args) -> int:
    import fxsurgery as fs
    if args.json:
        check_output(args.json, "the map", "--json")
        check_distinct([(args.json, "--json", "the map")], [(args.features, "--features", "the features file")])
    model, inputs, features = build(args.model, args.input, args.features, args.device)
    imap = fs.interaction_map(capture(model, inputs, features), progress=progress(args))
    print(imap.table(tablefmt=args.format))
    if args.json:
        write_atomically(args.json, lambda f: json.dump(imap.to_json(), f, indent=1), "the map", text=True)
        print(f"\nwrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("map", help="print which parameters meet which input labels")
    m.add_argument("model", help="package.module:factory")
    m.add_argument("--input", action="append", help="name=2x3x5[:dtype], repeatable")
    m.add_argument("--features", help="JSON file: input name -> description")
    m.add_argument("--json", help="write the map as JSON to this file")
    m.add_argument("--device", default="cpu", help="device for --input tensors (meta: no memory)")
    add_format_arguments(m)
    m.set_defaults(run=run)
