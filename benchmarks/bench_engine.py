"""The label engine's cost against torch.export, per model, each model in its own process.

    python benchmarks/bench_engine.py [--models five_large,five_wide,llama2,llama8b] [--repeat 2]

For each model (built on the meta device: no weight is allocated), a child process times side
by side torch.export capture, `fs.trace`, `fs.interaction_map` (both modes) and, for the models
that have a modified copy, tracing the copy plus `fs.plan`; it prints the ratios and the child's
peak resident memory (getrusage of the child alone, so models do not inherit each other's peak).

Models:
  five_large   fxsurgery.zoo.five_large: 36 groups, 16,000 features, a 4096-unit LSTM
  five_many    100 groups of 160 features (16,000), LSTM 1024
  five_wide    3 groups of 8,000 features, LSTM 2048
  llama2       a Llama-3-8B-shaped decoder with 2 layers (hidden 4096, MLP 14336, 32/8 heads,
               vocabulary 128,256 as fs.Categories); modified copy: 8 tokens more, MLP 256 wider
  llama8b      the same with its 32 layers
Targets: five_* trace+map <= 1.25x export, < 1 GB; llama* trace+map <= 1.5x export, < 2 GB,
trace(new) + plan <= 2x (export old + export new).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _five(kind):
    from fxsurgery import zoo
    if kind == "five_large":
        return zoo.five_large("meta"), None
    names = zoo._names
    if kind == "five_many":
        groups = {f"g{i}": (4, names(f"g{i}", 160)) for i in range(100)}
        cfg = zoo.FiveConfig(groups=groups, encoder_width=32, core=1024, heads={"a": 64, "b": 8})
    else:
        groups = {f"g{i}": (8, names(f"g{i}", 8000)) for i in range(3)}
        cfg = zoo.FiveConfig(groups=groups, encoder_width=128, core=2048, heads={"a": 256})
    return zoo._five(cfg, "meta"), None


def _llama(layers, vocab=128256, intermediate=14336, seq=16):
    import torch
    import fxsurgery as fs
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=256, use_cache=False, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.zeros(1, seq, dtype=torch.int64, device="meta")}
    names = [f"t{i}" for i in range(vocab)]
    return model, inputs, {"input_ids": fs.Categories(names)}


def build(kind):
    if kind.startswith("five"):
        (model, inputs, features), _ = _five(kind)
        return (model, inputs, features), None
    layers = 2 if kind == "llama2" else 32
    return _llama(layers), _llama(layers, vocab=128256 + 8, intermediate=14336 + 256)


def child(kind: str, repeat: int) -> dict:
    import torch
    import fxsurgery as fs
    warnings.simplefilter("ignore")
    (model, inputs, features), new = build(kind)

    def export(m, i):
        return torch.export.export(m, args=(), kwargs=i) if not kind.startswith("five") \
            else torch.export.export(m, tuple(i.values()))

    out = {"export": [], "trace": [], "map": [], "export_new": [], "trace_new_plan": []}
    traced = None
    map_peak = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        export(model, inputs)
        out["export"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        traced = fs.trace(model, inputs, features)
        out["trace"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fs.interaction_map(traced)
        out["map"].append(time.perf_counter() - t0)
        if not map_peak:   # the first run's peak so far is export, trace and map's (no plan yet)
            map_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if new is not None:
            t0 = time.perf_counter()
            export(new[0], new[1])
            out["export_new"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            new_t = fs.trace(*new)
            fs.plan(traced, new_t)
            out["trace_new_plan"].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in out.items() if v}
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["map_rss_mb"] = map_peak
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="five_large,five_many,five_wide,llama2")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", default=None)
    p.add_argument("--root", default=ROOT, help="the fxsurgery checkout to measure (default: this one)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    print(f"{'model':10s} {'export':>7s} {'trace':>7s} {'map':>7s} {'(t+m)/e':>8s} "
          f"{'plan*':>7s} {'plan*/e2':>8s} {'map MB':>7s} {'peak MB':>8s}")
    for kind in args.models.split(","):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--repeat", str(args.repeat)],
                           capture_output=True, text=True, cwd=args.root,
                           env={**os.environ, "PYTHONPATH": args.root})
        if r.returncode:
            print(f"{kind:10s} failed:\n{r.stderr[-2000:]}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        ratio = (d["trace"] + d["map"]) / d["export"]
        plan = f"{d['trace_new_plan']:7.2f} {d['trace_new_plan'] / (d['export'] + d['export_new']):8.2f}" \
            if "trace_new_plan" in d else f"{'-':>7s} {'-':>8s}"
        print(f"{kind:10s} {d['export']:7.2f} {d['trace']:7.2f} {d['map']:7.2f} {ratio:8.2f} {plan} {d['map_rss_mb']:7.0f} {d['rss_mb']:8.0f}",
              flush=True)
    print("plan* = trace of the modified copy + fs.plan; plan*/e2 = that over export(old) + export(new)")
    print("map MB = peak RSS through export, trace and map (the map's target); peak MB = the whole child's, plan included")


if __name__ == "__main__":
    main()
