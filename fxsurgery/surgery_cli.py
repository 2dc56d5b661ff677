"""Command line for surgery: `fxsurgery plan` and `fxsurgery transplant`.

    fxsurgery plan --old pkg.mod:old_factory --new pkg.mod:new_factory [--features-old f.json ...]
    fxsurgery transplant --old ... --new ... --old-weights old.pt -o new.pt [--verify 8]

Models come from factories (see `fxsurgery.cli`); checkpoints are state dicts saved with
`torch.save` (read with `weights_only=True`) or `.safetensors` files (with the safetensors
package). A factory that builds its model on the meta device is materialised: the old model by
its checkpoint, the new one on the CPU with each module's `reset_parameters()`.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from .cli import CliError, build, read_json_object
from .surgery.apply import materialise

__all__ = ["add_subcommand", "load_checkpoint", "load_into"]


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.pt`/`.pth`/`.bin` file (torch.load, weights only) or a
    `.safetensors` file."""
    if not os.path.exists(path):
        raise CliError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CliError(f"reading {path!r} needs the safetensors package (pip install safetensors), "
                           "or save the checkpoint with torch.save") from None
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - reported with the file named
            raise CliError(f"cannot read safetensors checkpoint {path!r}: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported with the file named
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): {first}") from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CliError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict (name -> tensor)")


def _listing(names, limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_into(model: torch.nn.Module, state: dict, path: str) -> None:
    """Loads a checkpoint into a model after checking that it matches: every key present (a tied
    parameter may be stored under one of its names), none unknown, every shape equal."""
    expected = model.state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        tied.setdefault(id(t), []).append(name)
    group_of = {n: names for names in tied.values() for n in names}
    missing = [k for k in expected if k not in state and not any(a in state for a in group_of.get(k, ()))]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})" for k in state
             if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(wrong)}")
        raise CliError(f"checkpoint {path!r} does not match the old model ({type(model).__name__}): "
                       + "; ".join(parts))
    complete = dict(state)
    for k in expected:
        if k not in complete:
            complete[k] = next(state[a] for a in group_of[k] if a in state)
    on_meta = any(t.device.type == "meta" for t in expected.values())
    model.load_state_dict(complete, strict=True, assign=on_meta)


def _materialise(model: torch.nn.Module, what: str, args) -> None:
    """A model built on the meta device gets real, freshly initialised storage."""
    if any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
        _log(args, f"  the {what} model is on the meta device: initialising it on the cpu (reset_parameters)")
        materialise(model)


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


def _plan(args, need_weights: bool):
    import fxsurgery as fs
    from .surgery import plan

    t0 = time.perf_counter()
    _log(args, f"building {args.old} and {args.new}")
    old, old_inputs, old_features = build(args.old, args.input_old, args.features_old, args.device)
    new, new_inputs, new_features = build(args.new, args.input_new, args.features_new, args.device)
    if args.old_weights:
        _log(args, f"loading {args.old_weights}")
        load_into(old, load_checkpoint(args.old_weights), args.old_weights)
    elif need_weights:
        raise CliError("transplant needs --old-weights (the old model's checkpoint)")
    if need_weights:
        _materialise(new, "new", args)
    n_old = sum(t.numel() for t in old.state_dict().values())
    _log(args, f"tracing ({n_old:,} old parameter elements)")
    t_old = fs.trace(old, old_inputs, old_features)
    t_new = fs.trace(new, new_inputs, new_features)
    _log(args, "mapping and planning")
    p = plan(t_old, t_new, rename=_rename(args.rename), units=_units(args.units), strict=args.strict,
             new_categories=args.new_categories)
    _log(args, f"  planned in {time.perf_counter() - t0:.1f}s")
    return p


def cmd_plan(args) -> int:
    p = _plan(args, need_weights=False)
    print(p.table(tablefmt=args.format))
    print()
    print(p.summary())
    return 0


def cmd_transplant(args) -> int:
    if args.output.endswith(".safetensors"):
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise CliError(f"writing {args.output!r} needs the safetensors package (pip install safetensors); "
                           "or write a .pt file") from None
    p = _plan(args, need_weights=True)
    total = sum(int(p.new.model.state_dict()[q.name].numel()) for q in p.params.values() if q.persistent)
    step = {"next": 0.1}
    t0 = time.perf_counter()

    def progress(name, done, all_):
        if all_ >= 10_000_000 and done / all_ >= step["next"]:
            _log(args, f"  applying: {100 * done / all_:.0f}% ({done:,} of {all_:,} elements)")
            while step["next"] <= done / all_:
                step["next"] += 0.1

    _log(args, f"applying the plan ({total:,} elements)")
    model = p.apply(progress=progress)
    _log(args, f"  applied in {time.perf_counter() - t0:.1f}s")
    if args.output.endswith(".safetensors"):
        from safetensors.torch import save_model
        save_model(model, args.output)
    else:
        torch.save(model.state_dict(), args.output)
    print(p.table(tablefmt=args.format))
    print()
    print(p.summary())
    if args.verify:
        from .surgery import verify
        print(verify(p, n=args.verify))
    print(f"wrote {args.output}")
    return 0


def add_subcommand(subparsers) -> None:
    """Adds `plan` and `transplant` to the `fxsurgery` command line."""
    from .surgery.planning import NEW_CATEGORIES

    for name, run, help_text in (
            ("plan", cmd_plan, "show which weights of an old model carry into a new one"),
            ("transplant", cmd_transplant, "carry an old checkpoint's weights into a new model and save it")):
        p = subparsers.add_parser(name, help=help_text, description=help_text)
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
        p.add_argument("--format", default="simple", help="table format (tabulate's tablefmt)")
        p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
        if name == "transplant":
            p.add_argument("--old-weights", required=True, help="the old model's checkpoint (.pt or .safetensors)")
            p.add_argument("-o", "--output", required=True, help="where to write the new checkpoint")
            p.add_argument("--verify", type=int, default=0, metavar="N",
                           help="compare old and new on N random inputs after the transplant")
        else:
            p.add_argument("--old-weights", help="the old model's checkpoint, to check removed inputs' weights")
        p.set_defaults(run=run)
