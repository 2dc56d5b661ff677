"""Scale benchmark: mapping an OpenAI-Five-sized policy against capturing it.

    python benchmarks/bench_map.py [--repeat 3]

Builds the ~160M-parameter policy of `fxsurgery.zoo.five_large` on the meta device (no
weights are allocated), then times, side by side in one process, `torch.export` capture
and `fs.interaction_map` (both the paper's map and the surgery keys), and prints the ratio
and the process's peak resident memory.
"""
import argparse
import gc
import resource
import statistics
import time
import warnings

import torch

import fxsurgery as fs
from fxsurgery import zoo


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    model, inputs, features = zoo.five_large("meta")
    n_params = zoo.count_parameters(model)
    n_labels = sum(len(d) for d in features.values())
    export_t, map_t = [], []
    traced = None
    for _ in range(args.repeat):
        gc.collect()
        t0 = time.perf_counter()
        torch.export.export(model, tuple(inputs.values()))
        export_t.append(time.perf_counter() - t0)
        traced = fs.trace(model, inputs, features)
        gc.collect()
        t0 = time.perf_counter()
        imap = fs.interaction_map(traced)
        map_t.append(time.perf_counter() - t0)
    e, m = statistics.median(export_t), statistics.median(map_t)
    print(f"model: five_large, {n_params / 1e6:.1f}M parameters, {n_labels} labels, "
          f"{sum(1 for n in traced.graph.nodes if n.op == 'call_function')} operators")
    print(f"torch.export capture     {e:7.2f} s   (median of {args.repeat})")
    print(f"fs.interaction_map       {m:7.2f} s   (deps + keys)")
    print(f"ratio map / export       {m / e:7.2f}   (target <= 1.5)")
    print(f"peak resident memory     {peak_rss_mb():7.0f} MB (whole process, target < 1024)")
    print(f"notes: {imap.notes or 'none'}")


if __name__ == "__main__":
    main()
