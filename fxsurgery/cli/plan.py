"""`fxsurgery plan --old pkg.mod:v1 --new pkg.mod:v2`: which weights of an old model carry into a
new one. Also the arguments and the planning step `transplant` shares.

A factory that builds its model on the meta device is materialised when weights are needed:
the old model by its checkpoint, the new one on the CPU with each module's `reset_parameters()`.
"""
from __future__ import annotations

import time

from .checkpoints import load_checkpoint, load_into, on_meta
from .common import add_format_arguments, log, progress
from .errors import CliError
from .factories import build, capture, read_json_object

__all__ = ["add_parser", "add_model_arguments", "make_plan", "input_files", "run"]

HELP = "show which weights of an old model carry into a new one"


def _rename(items) -> dict:
    out = {}
    for text in items or []:
        old, sep, new = text.partition("=")
        if not sep or not old or not new:
            raise CliError(f"--rename {text!r} must be OLD=NEW (module or parameter name prefixes)")
        out[old] = new
    return out


def _units(path):
    if not path:
        return None
    return read_json_object(path, "units")  # hidden-axis group -> old positions, or an axis name


def input_files(args) -> list:
    """The files the command reads, which no output may overwrite: (path, flag, what)."""
    return [(args.old_weights, "--old-weights", "the old checkpoint"),
            (args.features_old, "--features-old", "the old features file"),
            (args.features_new, "--features-new", "the new features file"),
            (args.units, "--units", "the units file")]


def make_plan(args, need_weights: bool):
    """Builds both models (loading the old checkpoint, materialising a new model built on meta
    when weights are needed), traces them and plans."""
    from ..surgery import plan
    from ..surgery.apply import materialise

    t0 = time.perf_counter()
    log(args, f"building {args.old} and {args.new}")
    old, old_inputs, old_features = build(args.old, args.input_old, args.features_old, args.device)
    new, new_inputs, new_features = build(args.new, args.input_new, args.features_new, args.device)
    if args.old_weights:
        log(args, f"loading {args.old_weights}")
        load_into(old, load_checkpoint(args.old_weights), args.old_weights)
    elif need_weights:
        raise CliError("transplant needs --old-weights (the old model's checkpoint)")
    if need_weights and on_meta(new):
        log(args, "  the new model is on the meta device: initialising it on the cpu (reset_parameters)")
        materialise(new)
    n_old = sum(t.numel() for t in old.state_dict().values())
    log(args, f"tracing ({n_old:,} old parameter elements)")
    t_old = capture(old, old_inputs, old_features)
    t_new = capture(new, new_inputs, new_features)
    log(args, "mapping and planning")
    p = plan(t_old, t_new, rename=_rename(args.rename), units=_units(args.units), strict=args.strict,
             new_categories=args.new_categories, progress=progress(args))
    log(args, f"  planned in {time.perf_counter() - t0:.1f}s")
    return p


def print_plan(p, args) -> None:
    print(p.table(tablefmt=args.format))
    print()
    print(p.summary())


def run(args) -> int:
    print_plan(make_plan(args, need_weights=False), args)
    return 0


def add_model_arguments(p) -> None:
    """The old and new models and how to plan between them (plan, transplant)."""
    from ..surgery.planning import NEW_CATEGORIES

    p.add_argument("--old", required=True, help="the old model: package.module:factory")
    p.add_argument("--new", required=True, help="the new model: package.module:factory")
    p.add_argument("--features-old", help="JSON file: old input name -> description")
    p.add_argument("--features-new", help="JSON file: new input name -> description")
    p.add_argument("--input-old", action="append", help="old example input name=2x3x5[:dtype], repeatable")
    p.add_argument("--input-new", action="append", help="new example input name=2x3x5[:dtype], repeatable")
    p.add_argument("--rename", action="append", metavar="OLD=NEW",
                   help="old module/parameter name prefix -> new one, repeatable")
    p.add_argument("--units", help="JSON file: hidden-axis group -> surviving old unit positions (pruning), "
                   "or the name of the axis an inserted identity layer stands for")
    p.add_argument("--strict", action="store_true",
                   help="fail on a shape change the labels do not explain instead of re-initialising")
    p.add_argument("--new-categories", choices=NEW_CATEGORIES, default="zero",
                   help="initial value of new embedding rows (default: zero)")
    p.add_argument("--device", default="cpu", help="device for --input tensors")
    add_format_arguments(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help=HELP, description=HELP)
    add_model_arguments(p)
    p.add_argument("--old-weights", help="the old model's checkpoint, to check removed inputs' weights")
    p.set_defaults(run=run)
