"""`fxsurgery rewrite`: change a model with the rewriting passes and save its weights.

    fxsurgery rewrite pkg.mod:factory --weights old.pt --add-features obs:armor,speed --widen core=4096 -o new.pt

Applies the requested changes in the order given (each flag is repeatable), printing each
change's plan and the largest deviation of the new model from the old on random inputs, then
saves the rewritten model's state_dict (`torch.save`, or a `.safetensors` file) and, with
`--features-out`, the new input descriptions as JSON (readable by `--features`). The saved
weights are for the GraphModule the passes build: run the same passes in Python (or this command
without `--weights`) to get the module, then `load_state_dict(strict=True)`. Nothing is written
unless every change succeeded, and the outputs are written together, atomically.
"""
from __future__ import annotations

import importlib.util
import json
import time
import warnings

import torch

from .checkpoints import load_checkpoint, load_into, on_meta
from .common import add_format_arguments, log
from .errors import CliError, one_line
from .factories import build, capture, quiet_torch
from .files import Outputs, check_distinct, check_output
from .rewrite_changes import CHANGES, ChangeAction, ChangeSpec, parse_change

__all__ = ["add_parser", "check_outputs", "load_model", "apply_changes", "save", "run"]

HELP = "change a model with the rewriting passes and save its carried-over weights"


def check_outputs(args) -> None:
    """Everything about the outputs that can fail, before the job."""
    if args.output.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise CliError(f"writing {args.output!r} needs the safetensors package (pip install safetensors); "
                       "or write a .pt file")
    check_output(args.output, "the new checkpoint", "-o")
    if args.features_out:
        check_output(args.features_out, "the features file", "--features-out")
    check_distinct([(args.output, "-o", "the new checkpoint"),
                    (args.features_out, "--features-out", "the new features file")],
                   [(args.weights, "--weights", "the checkpoint"),
                    (args.features, "--features", "the features file")])


def load_model(args):
    """The factory's model with its checkpoint loaded, captured: the source of the first change."""
    from ..surgery.apply import materialise

    log(args, f"building {args.model}")
    model, inputs, features = build(args.model, args.input, args.features, args.device)
    if args.weights:
        log(args, f"loading {args.weights}")
        load_into(model, load_checkpoint(args.weights), args.weights)
    elif on_meta(model):
        log(args, "  the model is on the meta device and no --weights were given: initialising it on the cpu")
        materialise(model)
    else:
        log(args, "  no --weights: rewriting the weights the factory built")
    return capture(model, inputs, features), sum(int(t.numel()) for t in model.state_dict().values())


def _call(spec: ChangeSpec, source, a, kw):
    import fxsurgery.passes as passes
    fn = getattr(passes, spec.function, None)
    if fn is None:
        raise CliError(f"{spec.flag}: fs.passes.{spec.function} is not available in this version of fxsurgery")
    with quiet_torch(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # re-initialisation notes: the plan's table says them
        return fn(source, *a, **kw)


def apply_changes(args, source, parsed):
    """Runs each change on the previous one's result, printing its plan (and verification)."""
    import fxsurgery as fs

    for i, (flag, text, spec, a, kw) in enumerate(parsed, 1):
        log(args, f"[{i}/{len(parsed)}] {flag} {text}")
        try:
            gm = _call(spec, source, a, kw)
        except CliError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a change is one line naming it
            raise CliError(f"{flag} {text}: {one_line(err)}") from err
        p = gm.meta["fxsurgery"]["plan"]
        print(f"== {i}. {flag} {text}  ({gm.meta['fxsurgery'].get('what', spec.function)})")
        print(p.table(tablefmt=args.format))
        print()
        print(p.summary())
        if args.verify:
            print(fs.verify(p, n=args.verify))
        print()
        source = gm
    return source


def save(args, gm) -> None:
    """The new checkpoint and, if asked, the features file: both, or neither."""
    with Outputs() as out:
        if args.output.endswith(".safetensors"):
            from safetensors.torch import save_model
            out.write_path(args.output, lambda tmp: save_model(gm, tmp), "the new checkpoint")
        else:
            state = gm.state_dict()
            out.write(args.output, lambda f: torch.save(state, f), "the new checkpoint")
        if args.features_out:
            descriptions = {name: d.to_json() for name, d in gm.meta["fxsurgery"]["features"].items()
                            if d is not None}
            out.write(args.features_out, lambda f: json.dump(descriptions, f, indent=1), "the features file",
                      text=True)
        out.commit()


def run(args) -> int:
    changes = getattr(args, "changes", None) or []
    if not changes:
        raise CliError("no change requested; give at least one of " + ", ".join(c.flag for c in CHANGES))
    parsed = [(flag, text, *parse_change(flag, text, args)) for flag, text in changes]
    check_outputs(args)

    t0 = time.perf_counter()
    source, n_old = load_model(args)
    gm = apply_changes(args, source, parsed)
    save(args, gm)
    n_new = sum(int(t.numel()) for t in gm.state_dict().values())
    print(f"wrote {args.output} ({n_old:,} -> {n_new:,} parameter and buffer elements, "
          f"{len(parsed)} change{'s' if len(parsed) != 1 else ''})")
    if args.features_out:
        print(f"wrote {args.features_out}")
    log(args, f"  done in {time.perf_counter() - t0:.1f}s")
    return 0


def add_parser(subparsers) -> None:
    from ..surgery.planning import NEW_CATEGORIES

    p = subparsers.add_parser("rewrite", help=HELP, description=HELP,
                              epilog="Changes apply in the order given; every change flag is repeatable.")
    p.add_argument("model", help="the model: package.module:factory")
    p.add_argument("--weights", help="its checkpoint (.pt or .safetensors); without it, the factory's weights")
    p.add_argument("-o", "--output", required=True, help="where to write the new state_dict (.pt or .safetensors)")
    p.add_argument("--features-out", help="write the new input descriptions (JSON, as --features reads) here")
    p.add_argument("--features", help="JSON file: input name -> description")
    p.add_argument("--input", action="append", help="example input name=2x3x5[:dtype], repeatable")
    for spec in CHANGES:
        p.add_argument(spec.flag, action=ChangeAction, metavar=spec.metavar, help=spec.help + " (repeatable)")
    p.add_argument("--new-categories", choices=NEW_CATEGORIES, default="zero",
                   help="initial value of new embedding rows (default: zero)")
    p.add_argument("--verify", type=int, default=8, metavar="N",
                   help="compare old and new model on N random inputs after each change (0: do not; default 8)")
    p.add_argument("--device", default="cpu", help="device for --input tensors")
    add_format_arguments(p)
    p.set_defaults(run=run, changes=[])
