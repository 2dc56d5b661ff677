"""`fxsurgery transplant --old ... --new ... --old-weights old.pt -o new.pt`: carry an old
checkpoint's weights into a new model and save its state dict (`torch.save`, or a
`.safetensors` file). The output is checked before any work and written atomically.

With `-o DIR` (a directory: no file suffix, or an existing checkpoint directory) both models
are built on the meta device and the old checkpoint (a directory of safetensors shards, a
`.safetensors` or a state_dict file) is streamed into DIR tensor by tensor, in transformers'
layout, with the new model's `config.json` when it has one: a checkpoint larger than memory
needs memory for a few tensors only. DIR appears complete or not at all; an existing one is
replaced whole."""
from __future__ import annotations

import importlib.util
import os
import time

import torch

from .checkpoints import check_output_directory, config_files, init_of, is_directory_output, stream
from .common import log, progress
from .errors import CliError
from .factories import build, capture
from .files import Outputs, check_distinct, check_output
from .plan import _rename, _units, add_model_arguments, input_files, make_plan, print_plan

__all__ = ["add_parser", "check_outputs", "apply_plan", "save", "run"]

HELP = "carry an old checkpoint's weights into a new model and save it"


def check_outputs(args) -> None:
    """Everything about the output that can fail, before the (long) job."""
    if args.output.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise CliError(f"writing {args.output!r} needs the safetensors package (pip install safetensors); "
                       "or write a .pt file")
    check_output(args.output, "the new checkpoint", "-o")
    outputs = [(args.output, "-o", "the new checkpoint")]
    if args.optimizer_state is not None or args.optimizer_output is not None:
        if args.optimizer_state is None or args.optimizer_output is None:
            raise CliError("--optimizer-state (the old optimizer's state_dict) and --optimizer-output (where to "
                           "write the new one) go together")
        if not os.path.isfile(args.optimizer_state):
            raise CliError(f"--optimizer-state {args.optimizer_state!r} does not exist")
        check_output(args.optimizer_output, "the new optimizer state", "--optimizer-output")
        outputs.append((args.optimizer_output, "--optimizer-output", "the new optimizer state"))
    check_distinct(outputs, input_files(args) + [(args.optimizer_state, "--optimizer-state",
                                                  "the old optimizer state")])


def apply_plan(p, args) -> torch.nn.Module:
    total = sum(int(p.new.model.state_dict()[q.name].numel()) for q in p.params.values() if q.persistent)
    step = {"next": 0.1}
    t0 = time.perf_counter()

    def progress(name, done, all_):
        if all_ >= 10_000_000 and done / all_ >= step["next"]:
            log(args, f"  applying: {100 * done / all_:.0f}% ({done:,} of {all_:,} elements)")
            while step["next"] <= done / all_:
                step["next"] += 0.1

    log(args, f"applying the plan ({total:,} elements)")
    model = p.apply(progress=progress)
    log(args, f"  applied in {time.perf_counter() - t0:.1f}s")
    return model


def _load_optimizer_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CliError(f"--optimizer-state {path!r} cannot be read as an optimizer state_dict: {e}") from e
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CliError(f"--optimizer-state {path!r} is not an optimizer state_dict (torch.save(optimizer.state_dict())"
                       ", with 'state' and 'param_groups')")
    return state


def save(model: torch.nn.Module, path: str, optimizer=None) -> None:
    """Writes the checkpoint (and the optimizer state, `(path, state_dict)`): all or nothing."""
    with Outputs() as out:
        if optimizer is not None:
            out.write(optimizer[0], lambda f: torch.save(optimizer[1], f), "the new optimizer state")
        if path.endswith(".safetensors"):
            from safetensors.torch import save_model
            out.write_path(path, lambda tmp: save_model(model, tmp), "the new checkpoint")
        else:
            state = model.state_dict()
            out.write(path, lambda f: torch.save(state, f), "the new checkpoint")
        out.commit()


def make_meta_plan(args):
    """Both models on the meta device, traced and planned: the plan a checkpoint streams through."""
    from ..surgery import plan

    t0 = time.perf_counter()
    log(args, f"building {args.old} and {args.new} on the meta device")
    old, old_inputs, old_features = build(args.old, args.input_old, args.features_old, args.device, meta=True)
    new, new_inputs, new_features = build(args.new, args.input_new, args.features_new, args.device, meta=True)
    log(args, "tracing and planning")
    p = plan(capture(old, old_inputs, old_features), capture(new, new_inputs, new_features),
             rename=_rename(args.rename), units=_units(args.units), strict=args.strict,
             new_categories=args.new_categories, progress=progress(args))
    log(args, f"  planned in {time.perf_counter() - t0:.1f}s")
    return p


def run_streaming(args) -> int:
    if args.optimizer_state is not None:
        raise CliError("--optimizer-state is carried in memory: write a checkpoint file (-o new.pt), not a "
                       "directory (streamed on the meta device)")
    if args.verify:
        raise CliError("--verify needs both models in memory, and with -o a directory they stay on the meta "
                       "device (the weights are streamed); load the written checkpoint to check it, or write "
                       "a file (-o new.pt)")
    check_output_directory(args.output, "-o", input_files(args))
    if not os.path.exists(args.old_weights):
        raise CliError(f"checkpoint --old-weights {args.old_weights!r} does not exist")
    p = make_meta_plan(args)
    t0 = time.perf_counter()
    written = stream([p], args.old_weights, args.output, args, init=init_of(p.new.model),
                     config=config_files(p.new.model))
    log(args, f"  streamed in {time.perf_counter() - t0:.1f}s")
    print_plan(p, args)
    extra = ", config.json" if config_files(p.new.model) else ""
    print(f"wrote {args.output} ({len(written.files)} safetensors file{'s' if len(written.files) != 1 else ''}"
          f"{extra}, {written.total_size:,} bytes of weights)")
    return 0


def run(args) -> int:
    if is_directory_output(args.output):
        return run_streaming(args)
    if os.path.isdir(args.old_weights):
        raise CliError(f"--old-weights {args.old_weights!r} is a checkpoint directory: give -o a directory too "
                       "(the weights are streamed into it shard by shard), or a single checkpoint file")
    check_outputs(args)
    old_optimizer = _load_optimizer_state(args.optimizer_state) if args.optimizer_state else None
    p = make_plan(args, need_weights=True)
    model = apply_plan(p, args)
    if old_optimizer is None:
        save(model, args.output)
    else:
        from ..surgery.training_state import carry_optimizer_state_dict
        try:
            state = carry_optimizer_state_dict(p, old_optimizer, [n for n, _ in model.named_parameters()])
        except Exception as e:
            raise CliError(f"--optimizer-state {args.optimizer_state!r}: {e}") from e
        save(model, args.output, optimizer=(args.optimizer_output, state))
    print_plan(p, args)
    if args.verify:
        from ..surgery import verify
        print(verify(p, n=args.verify))
    print(f"wrote {args.output}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("transplant", help=HELP, description=HELP)
    add_model_arguments(p)
    p.add_argument("--old-weights", required=True,
                   help="the old model's checkpoint (.pt or .safetensors, or a directory of safetensors shards)")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the new checkpoint: a .pt or .safetensors file, or a directory "
                        "(streamed shard by shard, the models on the meta device)")
    p.add_argument("--optimizer-state", metavar="FILE",
                   help="the old optimizer's state_dict (torch.save(optimizer.state_dict()), the optimizer built "
                        "over model.parameters()): carried element by element (copied elements keep their state, "
                        "new ones start at zero) into --optimizer-output, for an optimizer built over the new "
                        "model's parameters()")
    p.add_argument("--optimizer-output", metavar="FILE", help="where to write the new optimizer state_dict")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="compare old and new on N random inputs after the transplant")
    p.set_defaults(run=run)
