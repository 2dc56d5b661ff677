"""Grow a GPT-2 mid-training, and compare with training the large model from scratch.

A small GPT-2 (byte-level, width 64, 2 layers) learns the Python standard library's own
source; after half the steps it is grown with `fs.hf.resize` to width 128 and 4 layers (the
residual stream widened exactly through its LayerNorms, two identity layers added, the heads
and MLP grown with it), its Adam state carried over, and it trains on. The same large model
trained from scratch for all the steps is the baseline. Printed: the loss just before and just
after growth (the same: the grown model computes what the small one did), both final losses,
and the step at which the grown model first reaches the baseline's final loss, with the
training compute that saves (6 x parameters x tokens per step). With matplotlib installed, the
curves go to grow_gpt2.png.

    python examples/grow_gpt2.py [--steps 1200] [--lr 1e-3] [--quick]

Runs on a CPU in a few minutes (`--quick`: a few seconds, for the tests).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch
import transformers

import fxsurgery as fs

transformers.logging.set_verbosity_error()


def corpus(limit: int) -> torch.Tensor:
    """The bytes of the standard library's .py files (sorted, so that every run reads the same)."""
    root = os.path.dirname(os.__file__)
    data = bytearray()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data += f.read()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, length: int, seed: int, start: int = 0):
    """Step k's batch depends on (seed, k) only: every model sees the same data at each step."""
    step = start
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])
        step += 1


def gpt2(width: int, layers: int, heads: int, length: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=length, n_embd=width, n_layer=layers, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=held_out, labels=held_out).loss.item()
    model.train()
    return loss


def train(model, opt, stream, steps: int, held_out, every: int, log: list, offset: int = 0):
    model.train()
    for step in range(steps):
        ids = next(stream)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if (offset + step + 1) % every == 0:
            log.append((offset + step + 1, evaluate(model, held_out)))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="training steps in all (growth at half)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, for every model")
    ap.add_argument("--new-scale", choices=("zero", "mean"), default="zero",
                    help="Adam's second moment of new elements: zero, or the mean of the copied ones'")
    ap.add_argument("--quick", action="store_true", help="a few steps of tiny models (for the tests)")
    ap.add_argument("--plot", default="grow_gpt2.png", help="where to draw the curves (needs matplotlib)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    small, large = (dict(width=64, layers=2, heads=4), dict(width=128, layers=4, heads=8))
    batch, length, every = 16, 64, 20
    if args.quick:
        args.steps, batch, length, every = 20, 4, 32, 5
        small, large = dict(width=16, layers=1, heads=2), dict(width=32, layers=2, heads=4)
    data = corpus(2_000_000 if not args.quick else 100_000)
    split = int(data.numel() * 0.95)
    train_data, held = data[:split], data[split:]
    held_out = torch.stack([held[i * length:(i + 1) * length] for i in range(32 if not args.quick else 4)])
    half = args.steps // 2
    lr = args.lr

    t0 = time.time()
    model = gpt2(**small, length=length, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = batches(train_data, batch, length, seed=1)
    grown_log: list = []
    train(model, opt, stream, half, held_out, every, grown_log)
    before = evaluate(model, held_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        big, plan = fs.hf.resize(model, hidden_size=large["width"], num_attention_heads=large["heads"],
                                 num_hidden_layers=large["layers"])
    after = evaluate(big, held_out)
    big_opt = plan.carry_optimizer(opt, torch.optim.Adam(big.parameters(), lr=lr), new_scale=args.new_scale)
    grow_seconds = time.time() - t0
    train(big, big_opt, stream, args.steps - half, held_out, every, grown_log, offset=half)
    t_grown = time.time() - t0

    # The small model trained on without growth: what growing adds.
    kept = gpt2(**small, length=length, seed=0)
    kept.load_state_dict(model.state_dict())
    kept_opt = torch.optim.Adam(kept.parameters(), lr=lr)
    kept_opt.load_state_dict(opt.state_dict())
    kept_log = [entry for entry in grown_log if entry[0] <= half]
    train(kept, kept_opt, batches(train_data, batch, length, seed=1, start=half), args.steps - half, held_out, every,
          kept_log, offset=half)

    t0 = time.time()
    scratch = gpt2(**large, length=length, seed=0)
    scratch_opt = torch.optim.Adam(scratch.parameters(), lr=lr)
    scratch_log: list = []
    train(scratch, scratch_opt, batches(train_data, batch, length, seed=1), args.steps, held_out, every, scratch_log)
    t_scratch = time.time() - t0

    target = scratch_log[-1][1]
    reached = next((s for s, v in grown_log if s > half and v <= target), None)
    tokens = batch * length
    compute_grown = 6 * tokens * (n_params(model) * half + n_params(big) * ((reached or args.steps) - half))
    compute_scratch = 6 * tokens * n_params(scratch) * args.steps
    print(f"small model {n_params(model):,} parameters, grown and from scratch {n_params(big):,}")
    print(f"growth: {plan.config_changes}; preserves function: {plan.preserves_function}; "
          f"verify {plan.verification.max:.2g}")
    print(f"held-out loss just before growth {before:.4f}, just after {after:.4f} "
          f"(difference {abs(after - before):.2g})")
    print(f"final held-out loss after {args.steps} steps: grown {grown_log[-1][1]:.4f}, large from scratch "
          f"{target:.4f}, small never grown {kept_log[-1][1]:.4f}")
    if reached is None:
        print(f"the grown model did not reach the from-scratch model's final loss within {args.steps} steps")
    else:
        print(f"the grown model reaches the from-scratch final loss at step {reached} of {args.steps}: "
              f"{args.steps - reached} steps and {100 * (1 - compute_grown / compute_scratch):.0f}% of the "
              "training compute saved")
    # Equal compute: where the from-scratch run stood when it had spent what the grown run spent.
    spent = 6 * tokens * (n_params(model) * half + n_params(big) * (args.steps - half))
    equal = spent / (6 * tokens * n_params(scratch))
    at_equal = min(scratch_log, key=lambda e: abs(e[0] - equal))
    print(f"at equal training compute ({100 * spent / compute_scratch:.0f}% of the from-scratch run's, its step "
          f"{at_equal[0]}): from scratch {at_equal[1]:.4f}, grown {grown_log[-1][1]:.4f}")
    print(f"wall time: grown {t_grown:.0f} s (growth itself {grow_seconds:.1f} s in the first half), "
          f"from scratch {t_scratch:.0f} s")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*scratch_log), label=f"large from scratch ({n_params(scratch):,} parameters)")
        ax.plot(*zip(*grown_log), label="small, grown at step %d" % half)
        ax.plot(*zip(*kept_log[len([e for e in kept_log if e[0] <= half]) - 1:]), label="small, never grown",
                linestyle="--")
        ax.axvline(half, color="gray", linestyle=":")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (nats per byte)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"curves in {args.plot}")
    ok = plan.preserves_function and math.isclose(before, after, rel_tol=1e-4, abs_tol=1e-4)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
