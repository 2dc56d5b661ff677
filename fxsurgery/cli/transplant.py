"""`fxsurgery transplant --old ... --new ... --old-weights old.pt -o new.pt`: carry an old
checkpoint's weights into a new model and save its state dict (`torch.save`, or a
`.safetensors` file). The output is checked before any work and written atomically."""
from __future__ import annotations

import importlib.util
import time

import torch

from .common import log
from .errors import CliError
from .files import Outputs, check_distinct, check_output
from .plan import add_model_arguments, input_files, make_plan, print_plan

__all__ = ["add_parser", "check_outputs", "apply_plan", "save", "run"]

HELP = "carry an old checkpoint's weights into a new model and save it"


def check_outputs(args) -> None:
    """Everything about the output that can fail, before the (long) job."""
    if args.output.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise CliError(f"writing {args.output!r} needs the safetensors package (pip install safetensors); "
                       "or write a .pt file")
    check_output(args.output, "the new checkpoint", "-o")
    check_distinct([(args.output, "-o", "the new checkpoint")], input_files(args))


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


def save(model: torch.nn.Module, path: str) -> None:
    with Outputs() as out:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_model
            out.write_path(path, lambda tmp: save_model(model, tmp), "the new checkpoint")
        else:
            state = model.state_dict()
            out.write(path, lambda f: torch.save(state, f), "the new checkpoint")
        out.commit()


def run(args) -> int:
    check_outputs(args)
    p = make_plan(args, need_weights=True)
    model = apply_plan(p, args)
    save(model, args.output)
    print_plan(p, args)
    if args.verify:
        from ..surgery import verify
        print(verify(p, n=args.verify))
    print(f"wrote {args.output}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("transplant", help=HELP, description=HELP)
    add_model_arguments(p)
    p.add_argument("--old-weights", required=True, help="the old model's checkpoint (.pt or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="where to write the new checkpoint")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="compare old and new on N random inputs after the transplant")
    p.set_defaults(run=run)
