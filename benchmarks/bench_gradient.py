"""The paper's comparison: boolean mapping against gradient mapping on the same models.

    python benchmarks/bench_gradient.py [--trials 4] [--sizes 16,64,256,512]

For OpenAI-Five-like policies of growing feature count (and width, up to a few million
parameters), times `fs.interaction_map(keys=False)` (the rules) and
`fs.gradient_interaction_map` (autodiff, `--trials` random points) side by side in one
process, checks that they agree, and prints the ratio and how each grows with the features.
"""
import argparse
import time
import warnings

import fxsurgery as fs
from fxsurgery import zoo
from fxsurgery.gradient_map import gradient_interaction_map
from tabulate import tabulate


def config(n_features: int) -> zoo.FiveConfig:
    """Four groups sharing `n_features` features; widths grow with them (to ~3M parameters)."""
    per = n_features // 4
    width = max(32, n_features * 2)
    groups = {g: (n, tuple(f"{g}.f{i}" for i in range(per)))
              for g, n in (("self", 1), ("allies", 4), ("enemies", 5), ("items", 6))}
    groups["inventory"] = groups.pop("items")
    return zoo.FiveConfig(groups=groups, encoder_width=width, core=min(width, 512),
                          heads={"move": 8, "attack": 6})


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--sizes", default="16,64,256,512")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        model = zoo.FivePolicy(config(n)).eval()
        inputs = dict(zip(model.input_names(), model.example_inputs(batch=2)))
        traced = fs.trace(model, inputs, model.features())
        boolean, tb = timed(lambda: fs.interaction_map(traced, keys=False))
        gradient, tg = timed(lambda: gradient_interaction_map(traced, trials=args.trials, seed=0))
        rows.append([n, f"{zoo.count_parameters(model) / 1e6:.2f}M", f"{tb:.3f}", f"{tg:.2f}",
                     f"{tg / tb:.0f}x", "yes" if gradient.issubset(boolean) else "NO",
                     "yes" if gradient == boolean else "no"])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print()
    print(tabulate(rows, headers=["features", "parameters", "boolean s", "gradient s", "gradient/boolean",
                                  "gradient within boolean", "equal"]))


if __name__ == "__main__":
    main()
