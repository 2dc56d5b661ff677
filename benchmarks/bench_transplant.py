"""Scale benchmark: a transplant of an OpenAI-Five-sized policy against copying its state_dict.

    python benchmarks/bench_transplant.py [--repeat 3] [--scenario features|core|all]

The old model is `fxsurgery.zoo.five_config_large()` (~160M parameters, 16,000 features, an
LSTM of 4096 units), materialised on the CPU with real weights. Two modified configs:

  features  the common surgery: features added to two groups (two in the middle of
            allied_heroes, one at the end of enemy_creeps);
  core      the LSTM core (and the projection feeding it) widened by 8 units, 4096 -> 4104.

Measured side by side in one process, median of --repeat runs each:

  copy      the baseline: `load_state_dict(old.state_dict())` into a fresh model of the old
            config, materialised the same way as the transplant's new model (so that both write
            into memory that is already paged in); this is "copying the same state_dict".
  plan      `fs.trace(old)` (the real model) + `fs.trace(new)` (built on the meta device: no
            weights are allocated for the analysis) + `fs.plan(...)`: capture, mapping, planning.
  apply     `plan.apply()` into the new model, materialised after planning
            (`to_empty` + `reset_parameters`, the new model's own initialisation, which the
            copy's destination pays too and which is reported apart, not in either side).
            For reference, a clone of every old tensor into fresh memory is timed too: apply
            prepares every value it writes in fresh tensors, then re-points the new model's
            parameters at them (so that a failure midway can be taken back), so its cost is
            about that of the clone, not of the copy.

and the ratios transplant / copy; the whole transplant (planning + apply) is also compared with
`torch.export` of both models plus the copy (target <= 1.5). The target is that the transfer costs
about what the copy costs (apply / copy <= 2); planning is compared with `torch.export`
capture of the new model instead (`bench_map.py`), since it never touches a weight. A small
warm-up transplant (`five_small`) runs first so that one-time import and tracer set-up costs
are not charged to the first repeat. Each scenario's transplant is checked with `fs.verify`
(outside the timings).
"""
import argparse
import dataclasses
import gc
import resource
import statistics
import time
import warnings

import torch

import fxsurgery as fs
from fxsurgery.surgery.apply import materialise
from fxsurgery import zoo


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024




def on_meta(config: zoo.FiveConfig):
    with torch.device("meta"):
        model = zoo.FivePolicy(config)
    inputs = dict(zip(model.input_names(), model.example_inputs(device="meta")))
    return model, inputs, model.features()


def features_config() -> zoo.FiveConfig:
    """Two features in the middle of allied_heroes, one at the end of enemy_creeps."""
    cfg = zoo.five_config_large()
    n, names = cfg.groups["allied_heroes"]
    cfg.groups["allied_heroes"] = (n, names[:700] + ("allied_heroes.armor", "allied_heroes.speed") + names[700:])
    n, names = cfg.groups["enemy_creeps"]
    cfg.groups["enemy_creeps"] = (n, names + ("enemy_creeps.armor",))
    return cfg


def core_config() -> zoo.FiveConfig:
    cfg = zoo.five_config_large()
    cfg.core += 8
    return cfg


SCENARIOS = {"features": ("3 features added to 2 groups", features_config),
             "core": ("LSTM core widened 4096 -> 4104 units", core_config)}


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def warm_up() -> None:
    old, oi, of = zoo.five_small("cpu")
    cfg = zoo.five_config_small()
    cfg.core += 2
    new = zoo.FivePolicy(cfg)
    fs.transplant(old, new, oi, dict(zip(new.input_names(), new.example_inputs())), of, new.features())


def run(name: str, old, old_inputs, old_features, repeat: int) -> None:
    title, make_config = SCENARIOS[name]
    old_sd = old.state_dict()
    n_params = zoo.count_parameters(old)
    same = materialise(on_meta(zoo.five_config_large())[0])   # the copy's destination
    copy_t, clone_t, trace_old_t, trace_new_t, plan_t, map_t, apply_t, mat_t = [], [], [], [], [], [], [], []
    export_t = []
    p = new = None
    for _ in range(repeat):
        _, t = timed(lambda: same.load_state_dict(old_sd))
        copy_t.append(t)
        cloned, t = timed(lambda: {k: v.clone() for k, v in old_sd.items()})
        clone_t.append(t)
        del cloned
        p = new = None
        gc.collect()
        new, new_inputs, new_features = on_meta(make_config())
        # The whole-transplant target's baseline: torch.export of both models, as fs.trace runs it.
        _, t = timed(lambda: torch.export.export(old, tuple(old_inputs.values())))
        export_t.append(t)
        _, t = timed(lambda: torch.export.export(new, tuple(new_inputs.values())))
        export_t[-1] += t
        t_old, t = timed(lambda: fs.trace(old, old_inputs, old_features))
        trace_old_t.append(t)
        t_new, t = timed(lambda: fs.trace(new, new_inputs, new_features))
        trace_new_t.append(t)
        p, t = timed(lambda: fs.plan(t_old, t_new))
        plan_t.append(t)
        map_t.append(p.timings["map"])
        _, t = timed(lambda: materialise(new))
        mat_t.append(t)
        _, t = timed(p.apply)
        apply_t.append(t)
    med = statistics.median
    copy, tr_o, tr_n, pl, ap = med(copy_t), med(trace_old_t), med(trace_new_t), med(plan_t), med(apply_t)
    planning = tr_o + tr_n + pl
    n_new = zoo.count_parameters(new)
    # fs.verify draws inputs on the device of the traced example inputs, which are on the meta
    # device here (the new model was traced before it was materialised): hand it CPU ones.
    p.new = dataclasses.replace(p.new, inputs=tuple(torch.zeros(x.shape, dtype=x.dtype) for x in p.new.inputs))
    check = fs.verify(p, n=2)
    del same
    print(f"\n== {name}: {title}")
    print(f"old {n_params / 1e6:.2f}M -> new {n_new / 1e6:.2f}M parameters; {p!r}")
    print(f"issues: {[str(i) for i in p.issues] or 'none'}; preserves function: {p.preserves_function}; "
          f"verify (2 random inputs): max relative deviation {check.max:.3g}")
    print(f"copy     load_state_dict, same shapes    {copy:7.3f} s   (median of {repeat})")
    print(f"         (for reference: clone of every tensor into fresh memory {med(clone_t):.3f} s)")
    print(f"plan     trace old (real weights)        {tr_o:7.3f} s")
    print(f"         trace new (meta)                {tr_n:7.3f} s")
    print(f"         fs.plan                         {pl:7.3f} s   (of which mapping both models "
          f"{med(map_t):.3f} s)")
    print(f"         planning total                  {planning:7.3f} s")
    print(f"apply    plan.apply()                    {ap:7.3f} s")
    print(f"total    planning + apply                {planning + ap:7.3f} s")
    print(f"(new model materialised, not counted     {med(mat_t):7.3f} s: to_empty + reset_parameters, "
          "as for the copy's destination)")
    print(f"ratio    apply / copy                    {ap / copy:7.2f}   (target <= 2)")
    print(f"ratio    planning / copy                 {planning / copy:7.2f}")
    print(f"ratio    fs.plan / trace new (capture)   {pl / tr_n:7.2f}   (DESIGN: plan in about the capture time)")
    print(f"ratio    (planning + apply) / copy       {(planning + ap) / copy:7.2f}")
    ex = med(export_t)
    print(f"whole    torch.export of both models     {ex:7.3f} s")
    print(f"ratio    (planning + apply) / (export both + copy) {(planning + ap) / (ex + copy):7.2f}   (target <= 1.5)")
    print(f"peak resident memory so far             {peak_rss_mb():7.0f} MB (whole process)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    _, t_warm = timed(warm_up)
    (old, old_inputs, old_features), t_build = timed(lambda: zoo.five_large("cpu"))
    n_labels = sum(len(d) for d in old_features.values())
    print(f"model: five_large, {zoo.count_parameters(old) / 1e6:.1f}M parameters, {n_labels} labels, "
          f"{len(old.state_dict())} state_dict entries; built on the cpu in {t_build:.2f} s "
          f"(warm-up transplant of five_small {t_warm:.2f} s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in (SCENARIOS if args.scenario == "all" else [args.scenario]):
        run(name, old, old_inputs, old_features, args.repeat)


if __name__ == "__main__":
    main()
