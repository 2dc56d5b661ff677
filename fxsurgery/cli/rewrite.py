"""`fxsurgery rewrite`: change a model with the rewriting passes and save its weights.

    fxsurgery rewrite pkg.mod:factory --weights old.pt --add-features obs:armor,speed --widen core=4096 -o new.pt

Applies the requested changes in the order given (each flag is repeatable), printing each
change's plan and the largest deviation of the new model from the old on random inputs, then
saves the rewritten model's state_dict (`torch.save`, or a `.safetensors` file) and, with
`--features-out`, the new input descriptions as JSON (readable by `--features`). The saved
weights are for the GraphModule the passes build: run the same passes in Python (or this command
without `--weights`) to get the module, then `load_state_dict(strict=True)`. Nothing is written
unless every change succeeded, and the outputs are written together, atomically.

With `-o DIR` (a directory: no file suffix, or an existing checkpoint directory) the model is
built on the meta device, the passes plan each change without weights, and `--weights` (a
directory of safetensors shards, a `.safetensors` or a state_dict file) is streamed through
the changes' plans into DIR tensor by tensor (through temporary checkpoints next to DIR when
there are several changes). DIR appears complete or not at all. No --verify there: the
models have no weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
import warnings

import torch

from .checkpoints import (check_output_directory, init_of, is_directory_output, load_checkpoint, load_into, on_meta,
                          stream)
from .common import add_format_arguments, log
from .errors import CliError, one_line
from .factories import build, capture, quiet_torch
from .files import Outputs, check_distinct, check_output
from .rewrite_changes import CHANGES, ChangeAction, ChangeSpec, parse_change

__all__ = ["add_parser", "check_outputs", "load_model", "apply_changes", "save", "run"]

HELP = "change a model with the rewriting passes and save its carried-over weights"


def check_outputs(args) -> None:
    """Everything about the outputs that can fail, before the job."""
    if args.streaming:
        if not args.weights:
            raise CliError(f"-o {args.output!r} is a directory: the weights are streamed into it from --weights, "
                           "which is missing (or give -o a file, new.pt, to rewrite the factory's weights)")
        if not os.path.exists(args.weights):
            raise CliError(f"checkpoint --weights {args.weights!r} does not exist")
        if args.verify:
            raise CliError("--verify needs the models in memory, and with -o a directory they stay on the meta "
                           "device (the weights are streamed); pass --verify 0, or write a file (-o new.pt)")
        check_output_directory(args.output, "-o", [(args.weights, "--weights", "the checkpoint"),
                                                   (args.features, "--features", "the features file")])
        if args.features_out:
            check_output(args.features_out, "the features file", "--features-out")
            check_distinct([(args.features_out, "--features-out", "the new features file")],
                           [(args.weights, "--weights", "the checkpoint"),
                            (args.features, "--features", "the features file")])
        return
    if args.weights and os.path.isdir(args.weights):
        raise CliError(f"--weights {args.weights!r} is a checkpoint directory: give -o a directory too (the "
                       "weights are streamed into it shard by shard), or a single checkpoint file")
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

    if args.streaming:
        log(args, f"building {args.model} on the meta device")
        model, inputs, features = build(args.model, args.input, args.features, args.device, meta=True)
        n = sum(int(t.numel()) for t in model.state_dict().values())
        return capture(model, inputs, features), n, model
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
    return capture(model, inputs, features), sum(int(t.numel()) for t in model.state_dict().values()), model


def _call(spec: ChangeSpec, source, a, kw, args):
    import fxsurgery.passes as passes
    from ..progress import no_bars
    fn = getattr(passes, spec.function, None)
    if fn is None:
        raise CliError(f"{spec.flag}: fs.passes.{spec.function} is not available in this version of fxsurgery")
    # The passes map and plan inside; with --quiet their bars are off (progress=None means none).
    with quiet_torch(), warnings.catch_warnings(), no_bars() if args.quiet else contextlib.nullcontext():
        warnings.simplefilter("ignore", UserWarning)  # re-initialisation notes: the plan's table says them
        return fn(source, *a, **kw)


def apply_changes(args, source, parsed):
    """Runs each change on the previous one's result, printing its plan (and verification).
    Returns the last GraphModule and every change's plan."""
    import fxsurgery as fs

    plans = []
    for i, (flag, text, spec, a, kw) in enumerate(parsed, 1):
        log(args, f"[{i}/{len(parsed)}] {flag} {text}")
        try:
            gm = _call(spec, source, a, kw, args)
        except CliError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a change is one line naming it
            raise CliError(f"{flag} {text}: {one_line(err)}") from err
        p = gm.meta["fxsurgery"]["plan"]
        plans.append(p)
        print(f"== {i}. {flag} {text}  ({gm.meta['fxsurgery'].get('what', spec.function)})")
        print(p.table(tablefmt=args.format))
        print()
        print(p.summary())
        if args.verify:
            print(fs.verify(p, n=args.verify))
        print()
        source = gm
    return source, plans


def _features_json(gm) -> dict:
    return {name: d.to_json() for name, d in gm.meta["fxsurgery"]["features"].items() if d is not None}


def save_streaming(args, gm, plans, model) -> None:
    """The weights streamed through every change's plan into the directory -o; the features
    file staged first and committed only once the directory is in place."""
    with Outputs() as out:
        if args.features_out:
            descriptions = _features_json(gm)
            out.write(args.features_out, lambda f: json.dump(descriptions, f, indent=1), "the features file",
                      text=True)
        # The GraphModules' submodules are plain Modules: new elements are initialised as the
        # factory's module at the same path would be (Linear, Embedding, ...: their own init).
        written = stream(plans, args.weights, args.output, args, init=init_of(model), init_like=model)
        out.commit()
    return written


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
            descriptions = _features_json(gm)
            out.write(args.features_out, lambda f: json.dump(descriptions, f, indent=1), "the features file",
                      text=True)
        out.commit()


def run(args) -> int:
    changes = getattr(args, "changes", None) or []
    if not changes:
        raise CliError("no change requested; give at least one of " + ", ".join(c.flag for c in CHANGES))
    parsed = [(flag, text, *parse_change(flag, text, args)) for flag, text in changes]
    args.streaming = is_directory_output(args.output)
    if args.verify is None:
        args.verify = 0 if args.streaming else 8
    check_outputs(args)

    t0 = time.perf_counter()
    source, n_old, model = load_model(args)
    gm, plans = apply_changes(args, source, parsed)
    if args.streaming:
        save_streaming(args, gm, plans, model)
    else:
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
    p.add_argument("--weights", help="its checkpoint (.pt or .safetensors, or a directory of safetensors shards); "
                   "without it, the factory's weights")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the new state_dict: a .pt or .safetensors file, or a directory (streamed "
                        "shard by shard from --weights, the model on the meta device)")
    p.add_argument("--features-out", help="write the new input descriptions (JSON, as --features reads) here")
    p.add_argument("--features", help="JSON file: input name -> description")
    p.add_argument("--input", action="append", help="example input name=2x3x5[:dtype], repeatable")
    for spec in CHANGES:
        p.add_argument(spec.flag, action=ChangeAction, metavar=spec.metavar, help=spec.help + " (repeatable)")
    p.add_argument("--new-categories", choices=NEW_CATEGORIES, default="zero",
                   help="initial value of new embedding rows (default: zero)")
    p.add_argument("--verify", type=int, default=None, metavar="N",
                   help="compare old and new model on N random inputs after each change (0: do not; default 8, "
                        "0 when -o is a directory)")
    p.add_argument("--device", default="cpu", help="device for --input tensors")
    add_format_arguments(p)
    p.set_defaults(run=run, changes=[])
