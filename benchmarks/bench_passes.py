"""Scale benchmark: a rewriting pass on the OpenAI-Five-sized policy against the same change made
by hand (the new model built from an edited config, traced, planned, applied).

    python benchmarks/bench_passes.py [--repeat 2]

The old model is `fxsurgery.zoo.five_large()` (~160M parameters, 16,000 features, an LSTM of
4096 units) on the CPU with real weights. Two changes, each made both ways in one process:

  core      the LSTM core widened by 8 units (fs.passes.widen(t, "core", by=8));
  features  two features added in the middle of allied_heroes (fs.passes.add_features).

  pass      the pass on the traced old model: mapping, reach, the new GraphModule (every
            parameter fresh), the shape check on fake tensors, tracing it, planning, applying;
  by hand   building the new model from the edited config (on the CPU, its own initialisation),
            fs.trace of it, fs.plan against the traced old model, plan.apply().

Both produce a new model holding the old weights; the pass needs no new model code. Printed:
median seconds, the ratio pass / by hand, and the process's peak resident memory.
"""
import argparse
import statistics
import warnings

import torch
from bench_transplant import core_config, peak_rss_mb, timed   # the same change, timed the same way

import fxsurgery as fs
from fxsurgery import zoo


def by_hand(traced_old, config):
    new = zoo.FivePolicy(config).eval()
    inputs = dict(zip(new.input_names(), new.example_inputs()))
    p = fs.plan(traced_old, fs.trace(new, inputs, new.features()))
    p.apply()
    return p


def features_config():
    cfg = zoo.five_config_large()
    n, names = cfg.groups["allied_heroes"]
    cfg.groups["allied_heroes"] = (n, names[:700] + ("allied_heroes.armor", "allied_heroes.speed") + names[700:])
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    old, inputs, features = zoo.five_large("cpu")
    old.eval()
    t = fs.trace(old, inputs, features)
    # The same model captured with free sizes (fs.trace(dynamic=True)), on a batch of two: an
    # example batch of one stays fixed under export. The pass then captures nothing more.
    t_free = fs.trace(old, {k: torch.cat([v, v]) for k, v in inputs.items()}, features, dynamic=True)
    names = features["allied_heroes"].names
    cases = {
        "core": ("LSTM core widened 4096 -> 4104", lambda t: fs.passes.widen(t, "core", by=8), core_config),
        "features": ("2 features added to allied_heroes", lambda t: fs.passes.add_features(
            t, "allied_heroes", ["allied_heroes.armor", "allied_heroes.speed"], at=names[699]), features_config),
    }
    print(f"model: five_large, {zoo.count_parameters(old) / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}")
    print("pass: on a static fs.trace (the batch freed by a second capture); pass*: on fs.trace(dynamic=True)")
    print(f"{'change':36} {'pass':>8} {'pass*':>8} {'by hand':>8} {'pass / by hand':>15} {'pass* / by hand':>16}"
          "  preserved  max deviation  sizes*")
    for title, run_pass, config in cases.values():
        pass_t, free_t, hand_t = [], [], []
        gm = p = None
        for _ in range(args.repeat):
            gm = p = None
            gm, s = timed(lambda: run_pass(t))
            pass_t.append(s)
            gm_plan = gm.meta["fxsurgery"]["plan"]
            del gm
            gm, s = timed(lambda: run_pass(t_free))
            free_t.append(s)
            sizes = gm.meta["fxsurgery"].sizes
            del gm
            p, s = timed(lambda: by_hand(t, config()))
            hand_t.append(s)
        a, f, b = statistics.median(pass_t), statistics.median(free_t), statistics.median(hand_t)
        v = fs.verify(gm_plan, n=2)
        print(f"{title:36} {a:7.2f}s {f:7.2f}s {b:7.2f}s {a / b:15.2f} {f / b:16.2f}  "
              f"{str(gm_plan.preserves_function):9}  {v.max:.2g}  {sizes[:40]}")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
