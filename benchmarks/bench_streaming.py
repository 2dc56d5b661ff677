"""Streaming surgery of a checkpoint larger than one would like to hold twice, against copying it.

    python benchmarks/bench_streaming.py [--layers 22] [--shard-size 1GB] [--repeat 2] [--dir /tmp] [--keep DIR]

A Llama-shaped bf16 checkpoint (TinyLlama-1.1B's shape by default: hidden 2048, MLP 5632,
22 layers, 32 query / 4 key-value heads, vocabulary 32000, untied output; random weights) is
generated into a temporary directory, shard by shard (one shard in memory at a time), as
transformers lays it out (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`).
The surgery: 8 tokens added, the MLP widened 5632 -> 6144 units, planned on meta-device models.

Measured side by side, each run in a child process of its own (its peak resident memory is the
child's own ru_maxrss), alternating, median of --repeat runs:

  copy     the baseline: every shard loaded with `safetensors.torch.load_file` and written with
           `save_file`, one shard at a time: what carrying the bytes over costs.
  stream   `plan.apply_to_checkpoint(src, dst)` (timed; it writes on a thread of its own while
           building the next tensor, where the copy is one thread), tqdm off, with the plan made once
           beforehand in a child of its own (the two models built on the meta device, traced and
           planned: timed and measured apart), of which what streaming reads (the models, each
           parameter's match) is saved with torch.save: the planner's memory (gigabytes on a
           1B model) neither counts in the streaming step's nor squeezes the page cache the
           streaming step writes through.

Each twice: as above (the output in the page cache, not yet on the disk: what save_file does),
and fsynced (the copy fsyncs every file and both directories; the stream runs with sync=True,
as the command line does, so that the checkpoint survives a power loss once it returns). Then
the ratios stream / copy, page cache against page cache and fsynced against fsynced (target
<= 2; wall time, and CPU time, which other work on the machine sways less), and the
streaming step's own memory against the largest shard + 1 GB (the target): the stream child
resets its peak resident memory after loading the plan (Linux's /proc/self/clear_refs) and
reports how far it rose during apply_to_checkpoint. A last child checks the result: the new
checkpoint loads strictly into the new model (tensors assigned memory-mapped, so the check
holds no extra copy), and on old tokens its logits over the old vocabulary match the old
model's. Files are synced to disk before each timed child, and everything written is deleted
at the end, except with --keep DIR: the generated checkpoint and the saved plan are kept there
and reused by the next run with the same --keep, --layers and --shard-size (generating and
planning take minutes; the timed children do not change).
"""
import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

GB = 1e9


def config(layers: int, vocab: int = 32000, intermediate: int = 5632):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                       tie_word_embeddings=False, use_cache=False, attn_implementation="eager")


OLD_VOCAB, NEW_VOCAB = 32000, 32008
OLD_UNITS, NEW_UNITS = 5632, 6144


def cpu_time() -> float:
    """User + system CPU seconds of this process, every thread: less swayed than wall time by
    other work on the machine, and it shows what overlapping buys (CPU above wall)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _status(field: str) -> float | None:
    """A memory figure of /proc/self/status in GB (Linux), or None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Resets the process's peak resident memory (VmHWM; Linux >= 4.0), so that the streaming
    step's peak is measured apart from the planner's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# children ------------------------------------------------------------------------------
def child_generate(args) -> dict:
    """Random bf16 weights, written shard by shard: at most one shard's tensors in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(config(args.layers))
    limit = _size(args.shard_size)
    shards, size = [[]], 0
    for name, t in model.state_dict().items():
        n = t.numel() * 2
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(t.shape)))
        size += n
    out = Path(args.path)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    total = sum(2 * torch.Size(s).numel() for sh in shards for _, s in sh)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"params": total // 2}


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child_copy(args) -> dict:
    """With --sync, every file and both directories fsynced, as the streaming step's sync=True
    (what the command line does) makes it survive a power loss."""
    from safetensors.torch import load_file, save_file
    src, dst = Path(args.path), Path(args.out)
    t0, c0 = time.perf_counter(), cpu_time()
    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(f), dst / f.name, metadata={"format": "pt"})
        if args.sync:
            _fsync(dst / f.name)
    shutil.copy(src / "model.safetensors.index.json", dst)
    if args.sync:
        _fsync(dst / "model.safetensors.index.json")
        _fsync(dst)
        _fsync(dst.parent)
    return {"time": time.perf_counter() - t0, "cpu": cpu_time() - c0, "rss": peak_rss()}


def _meta_models(layers: int):
    import torch
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        old = LlamaForCausalLM(config(layers, OLD_VOCAB, OLD_UNITS)).eval()
        new = LlamaForCausalLM(config(layers, NEW_VOCAB, NEW_UNITS)).eval()
    return old, new


def child_plan(args) -> dict:
    """Both models on the meta device, traced and planned; the plan saved for the stream children."""
    import torch
    import fxsurgery as fs
    t0 = time.perf_counter()
    old, new = _meta_models(args.layers)
    vocab = [f"tok{i}" for i in range(OLD_VOCAB)]
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    plan = fs.plan(fs.trace(old, {"input_ids": ids}, {"input_ids": fs.Categories(vocab)}),
                   fs.trace(new, {"input_ids": ids}, {"input_ids": fs.Categories(vocab + [f"new{i}" for i in range(8)])}))
    t_plan = time.perf_counter() - t0
    # What streaming reads of a plan: the two models, each parameter's match, new_categories.
    # The whole plan (its traced programs and label maps) would load into gigabytes.
    slim = SimpleNamespace(old=SimpleNamespace(model=plan.old.model), new=SimpleNamespace(model=plan.new.model),
                           params=plan.params, new_categories=plan.new_categories)
    torch.save(slim, args.plan)
    return {"plan": t_plan, "rss": peak_rss(), "bytes": os.path.getsize(args.plan)}


def child_stream(args) -> dict:
    """The saved plan loaded (not timed), then apply_to_checkpoint timed; its peak resident
    memory measured from a reset after loading, apart from the plan's own."""
    import torch
    from fxsurgery.surgery.checkpoint import apply_to_checkpoint
    plan = torch.load(args.plan, weights_only=False)
    gc.collect()
    rss_start = _status("VmRSS")
    reset = reset_peak()
    t0, c0 = time.perf_counter(), cpu_time()
    written = apply_to_checkpoint(plan, args.path, args.out, init=plan.new.model._init_weights, progress=False,
                                  sync=bool(args.sync))
    t, cpu = time.perf_counter() - t0, cpu_time() - c0
    hwm = _status("VmHWM") if reset else None
    return {"time": t, "cpu": cpu, "rss": peak_rss(), "stream_start": rss_start, "stream_peak": hwm,
            "files": len(written.files), "total": written.total_size}


def child_check(args) -> dict:
    """Strict load of the new checkpoint into the new model; logits on old tokens against the old."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    old, new = _meta_models(args.layers)
    out = {}
    logits = []
    for model, path in ((old, Path(args.path)), (new, Path(args.out))):
        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(f))                      # memory-mapped
        model.load_state_dict(sd, strict=True, assign=True)
        model.model.rotary_emb = LlamaRotaryEmbedding(model.config)   # a non-persistent buffer, not saved
        ids = torch.randint(0, OLD_VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits[..., :OLD_VOCAB].float())
        del sd
    diff = (logits[0] - logits[1]).abs().max().item()
    out.update({"max_diff": diff, "scale": logits[0].abs().max().item(), "rss": peak_rss()})
    return out


CHILDREN = {"generate": child_generate, "plan": child_plan, "copy": child_copy, "stream": child_stream,
            "check": child_check}


def _size(s: str) -> int:
    from fxsurgery.surgery.checkpoint_files import parse_size
    return parse_size(s)


# parent --------------------------------------------------------------------------------
def run_child(kind: str, args, **extra) -> dict:
    if kind in ("copy", "stream"):
        os.sync()              # earlier runs' dirty pages are not written back during this one
    cmd = [sys.executable, __file__, "--child", kind, "--layers", str(args.layers), "--shard-size", args.shard_size]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"the {kind} child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", help="keep the generated checkpoint and the plan in this directory, and reuse "
                    "them when it holds them (same --layers and --shard-size)")
    ap.add_argument("--child", choices=sorted(CHILDREN))
    ap.add_argument("--sync", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--path")
    ap.add_argument("--out")
    ap.add_argument("--plan")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    if args.keep:
        work = Path(args.keep) / f"layers{args.layers}-shard{args.shard_size}"
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="fxsurgery-bench-streaming-", dir=args.dir))
    try:
        src = work / "old"
        t0 = time.perf_counter()
        done = src / "params.json"     # written last: a generation cut short is done again
        if done.is_file():
            gen = json.loads(done.read_text())
        else:
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir()
            gen = run_child("generate", args, path=src)
            done.write_text(json.dumps(gen))
        shards = sorted(src.glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards) / GB
        total = sum(f.stat().st_size for f in shards) / GB
        print(f"checkpoint: {gen['params'] / 1e9:.2f}B parameters, bf16, {len(shards)} shards, {total:.2f} GB, "
              f"largest shard {largest:.2f} GB (generated in {time.perf_counter() - t0:.0f} s)")
        print(f"surgery: vocabulary {OLD_VOCAB} -> {NEW_VOCAB}, MLP {OLD_UNITS} -> {NEW_UNITS} units, "
              f"{args.layers} layers")
        plan_info = work / "plan.json"
        if plan_info.is_file() and (work / "plan.pt").is_file():
            planned = json.loads(plan_info.read_text())
        else:
            planned = run_child("plan", args, plan=work / "plan.pt")
            if args.keep:
                plan_info.write_text(json.dumps(planned))
        runs = {(kind, sync): [] for sync in (0, 1) for kind in ("copy", "stream")}
        for r in range(args.repeat):
            for (kind, sync), done in runs.items():      # alternating: the machine's noise hits all alike
                out = work / f"{kind}{r}"
                done.append(run_child(kind, args, path=src, out=out, plan=work / "plan.pt", sync=sync))
                if kind == "stream" and not sync and r == args.repeat - 1:
                    check = run_child("check", args, path=src, out=out)
                shutil.rmtree(out)
        t = {k: statistics.median(x["time"] for x in v) for k, v in runs.items()}
        cpu = {k: statistics.median(x["cpu"] for x in v) for k, v in runs.items()}
        copies, streams = runs["copy", 0] + runs["copy", 1], runs["stream", 0] + runs["stream", 1]
        copy_rss = max(c["rss"] for c in copies)
        stream_rss = max(s["rss"] for s in streams)
        s = runs["stream", 0][-1]
        print(f"\n{'':34s}{'copy':>10s}{'stream':>10s}{'ratio':>9s}")
        for sync, label in ((0, "time, page cache (s)"), (1, "time, fsynced (s)")):
            print(f"{label:34s}{t['copy', sync]:10.2f}{t['stream', sync]:10.2f}"
                  f"{t['stream', sync] / t['copy', sync]:8.2f}x   target <= 2x; median of {args.repeat}")
        for sync, label in ((0, "CPU time, page cache (s)"), (1, "CPU time, fsynced (s)")):
            print(f"{label:34s}{cpu['copy', sync]:10.2f}{cpu['stream', sync]:10.2f}"
                  f"{cpu['stream', sync] / cpu['copy', sync]:8.2f}x   user + system, all threads")
        print("  (page cache: the files written, not yet on the disk, as save_file leaves them; fsynced: every file and "
              "directory fsynced before returning, the copy as the stream's sync=True, which the command line uses)")
        print(f"{'peak RSS (GB, child)':34s}{copy_rss:10.2f}{stream_rss:10.2f}{stream_rss / copy_rss:8.2f}x"
              f"   (the stream child's includes the loaded plan)")
        if all(x["stream_peak"] is not None for x in streams):
            grow = max(x["stream_peak"] - x["stream_start"] for x in streams)
            peak = max(x["stream_peak"] for x in streams)
            print(f"{'streaming step alone (GB)':34s}{'':10s}{grow:10.2f}   resident growth during apply_to_checkpoint "
                  f"(peak {peak:.2f}, of which {s['stream_start']:.2f} before streaming: python, torch, the plan); target <= largest "
                  f"shard + 1 GB = {largest + 1:.2f}: {'met' if grow <= largest + 1 else 'NOT met'}")
        else:
            print("streaming step alone: not measured (needs Linux's /proc/self/clear_refs)")
        print(f"planning (a child of its own, not in the stream time): {planned['plan']:.1f} s on meta models, peak "
              f"RSS {planned['rss']:.2f} GB, plan saved in {planned['bytes'] / GB:.2f} GB; stream: {s['files']} "
              f"output shards, {s['total'] / GB:.2f} GB")
        for sync in (0, 1):
            print(f"all runs{', fsynced' if sync else ''}: copy {[round(c['time'], 2) for c in runs['copy', sync]]} s, "
                  f"stream {[round(x['time'], 2) for x in runs['stream', sync]]} s")
        ok = check["max_diff"] <= 0.02 * check["scale"]
        print(f"check: the new checkpoint loads strictly into the new model; logits on old tokens over the old "
              f"vocabulary differ from the old model's by at most {check['max_diff']:.3g} (largest logit "
              f"{check['scale']:.3g}): {'preserved' if ok else 'NOT preserved'} (bf16 arithmetic)")
    finally:
        if args.keep:
            for out in work.glob("copy*"):
                shutil.rmtree(out, ignore_errors=True)
            for out in work.glob("stream*"):
                shutil.rmtree(out, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
