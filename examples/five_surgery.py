"""Keeps an OpenAI-Five-like policy alive through five surgeries, and compares it with retraining.

    python examples/five_surgery.py [--steps 600] [--batch 128] [--out examples/out]

A `FivePolicy` (entity groups encoded per entity and max-pooled, an embedding of a categorical
input, an LSTM core, action heads; `fxsurgery.zoo.five_config_small`) imitates a fixed random
"teacher" on the CPU. The teacher is a function of every feature that will ever exist, two of
the action heads and a third one the student does not have yet, so the student can only catch
up by being changed: features are added, a stale one (the teacher ignores it) is removed, a
group is reordered, the LSTM is widened, a head is added. Each change is a new `FiveConfig`
and a new model built from it; `fs.transplant` carries the trained weights over, `fs.verify`
checks that the new model computes what the old one did, and training goes on. At every
change a model with the same new config is also trained from scratch, on the same batches for
the same number of steps, for comparison. The losses are plotted to <out>/five_surgery.png.

Everything is seeded: two runs print the same numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxsurgery as fs
from fxsurgery.surgery.report import counts
from fxsurgery.zoo import FiveConfig, FivePolicy, five_config_small

# nn.LSTM warns about its flat weights when torch.export captures it; nothing to act on here.
warnings.filterwarnings("ignore", message=".*_flat_weights.*")

TOL = 1e-5          # largest relative deviation accepted where the function must be preserved
EVAL_EVERY = 10     # steps between evaluations on the fixed evaluation set
WARMUP = 25         # learning-rate warm-up after every (re)start, same for both lineages


# the successive configs -------------------------------------------------------------------------

def _with_group(cfg: FiveConfig, group: str, names) -> FiveConfig:
    groups = dict(cfg.groups)
    groups[group] = (groups[group][0], tuple(names))
    return replace(cfg, groups=groups)


def add_features(cfg):
    n_allies = cfg.groups["allies"][1]
    cfg = _with_group(cfg, "allies", n_allies[:2] + ("allies.armor",) + n_allies[2:])
    return _with_group(cfg, "enemies", cfg.groups["enemies"][1] + ("enemies.armor", "enemies.range"))


STALE = "self.f3"   # the feature removed by the second surgery; the teacher never looked at it


def remove_feature(cfg):
    return _with_group(cfg, "self", [f for f in cfg.groups["self"][1] if f != STALE])


def reorder_features(cfg):
    names = cfg.groups["inventory"][1]
    return _with_group(cfg, "inventory", [names[i] for i in (2, 0, 3, 1)])


def widen_core(cfg):
    return replace(cfg, core=2 * cfg.core)


def add_head(cfg):
    return replace(cfg, heads={**cfg.heads, "use_item": 3})


CHANGES = [
    ("add features (allies +1, enemies +2)", add_features),
    (f"remove feature {STALE}", remove_feature),
    ("reorder inventory features", reorder_features),
    ("widen LSTM core 32 -> 64", widen_core),
    ("add head use_item (3 actions)", add_head),
]


SHORT = ["+ features", f"- {STALE}", "reorder inventory", "core 32 -> 64", "+ head use_item"]  # plot labels


def configs() -> list[FiveConfig]:
    out = [five_config_small()]
    for _, change in CHANGES:
        out.append(change(out[-1]))
    return out


# the synthetic task ------------------------------------------------------------------------------

class World:
    """Observations with every feature that ever exists (in a fixed "universe" order per group),
    and a fixed random teacher that acts on them. Features added by a surgery matter twice as
    much as the others (so that seeing them pays); the stale feature does not matter at all."""

    def __init__(self, cfgs: list[FiveConfig], seed: int, width: int = 16, temperature: float = 3.0):
        self.entities: dict[str, int] = {}
        self.names: dict[str, list[str]] = {}
        for cfg in cfgs:
            for g, (n, names) in cfg.groups.items():
                self.entities[g] = n
                self.names.setdefault(g, [])
                self.names[g] += [f for f in names if f not in self.names[g]]
        last = cfgs[-1]
        self.heads = dict(last.heads)
        self.categories = {c: len(names) for c, names in last.categories.items()}
        self.category_groups = dict(last.category_groups)
        late = {f for g in self.names for f in self.names[g] if f not in cfgs[0].groups[g][1]}
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen)

        self.w1 = {}
        for g, names in self.names.items():
            scale = torch.tensor([0.0 if f == STALE else 2.0 if f in late else 1.0 for f in names])
            self.w1[g] = randn(len(names), width) * scale[:, None] / math.sqrt(len(names))
        self.emb = {c: randn(n, width) for c, n in self.categories.items()}
        self.wp = randn(width * len(self.names), 32) * 2 / math.sqrt(width * len(self.names))
        self.wh = {h: randn(32, n) / math.sqrt(32) for h, n in self.heads.items()}
        # Centre and scale each head's logits on a calibration sample, so that every action is
        # taken about as often and the argmax is neither constant nor noise.
        self.shift, self.scale, self.temperature = {}, {}, temperature
        calib = self.logits(self.sample(4096, torch.Generator().manual_seed(seed + 1)), raw=True)
        for h, z in calib.items():
            self.shift[h], self.scale[h] = z.mean(0), z.std()

    def sample(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        data = {g: torch.randn(batch, self.entities[g], len(names), generator=gen)
                for g, names in self.names.items()}
        for c, n in self.categories.items():
            data[c] = torch.randint(n, (batch, self.entities[self.category_groups[c]]), generator=gen)
        return data

    def logits(self, data, raw=False) -> dict[str, torch.Tensor]:
        pooled = []
        for g in self.names:
            h = data[g] @ self.w1[g]
            for c, grp in self.category_groups.items():
                if grp == g:
                    h = h + self.emb[c][data[c]]
            pooled.append(torch.tanh(h).amax(dim=1))
        z = torch.tanh(torch.cat(pooled, -1) @ self.wp)
        out = {h: z @ w for h, w in self.wh.items()}
        if raw:
            return out
        return {h: (y - self.shift[h]) / self.scale[h] * self.temperature for h, y in out.items()}

    def targets(self, data) -> dict[str, torch.Tensor]:
        return {h: y.argmax(-1) for h, y in self.logits(data).items()}

    def inputs(self, cfg: FiveConfig, data) -> dict[str, torch.Tensor]:
        """What a student with config `cfg` sees: its groups' features in its order, by name."""
        out = {}
        for g, (_, names) in cfg.groups.items():
            idx = torch.tensor([self.names[g].index(f) for f in names])
            out[g] = data[g].index_select(-1, idx)
        for c in cfg.categories:
            out[c] = data[c]
        return out


def head_losses(model: FivePolicy, world: World, data, targets) -> dict[str, torch.Tensor]:
    logits = model(*world.inputs(model.config, data).values())
    return {h: F.cross_entropy(y, targets[h]) for h, y in zip(model.config.heads, logits)}


def total(losses: dict) -> torch.Tensor:
    """The imitation loss: mean cross-entropy over the model's heads."""
    return sum(losses.values()) / len(losses)


class Learner:
    """A model, its optimiser and its evaluation history [(step, loss)]."""

    def __init__(self, model: FivePolicy, start: int, lr: float):
        self.model, self.start, self.lr = model, start, lr
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.history: list[tuple[int, float]] = []

    def train_step(self, step: int, world: World, data, targets) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (step - self.start + 1) / WARMUP)
        loss = total(head_losses(self.model, world, data, targets))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, step: int, world: World, evalset) -> dict[str, float]:
        losses = {h: float(v) for h, v in head_losses(self.model, world, *evalset).items()}
        self.history.append((step, sum(losses.values()) / len(losses)))
        return losses


def build(cfg: FiveConfig, seed: int) -> FivePolicy:
    torch.manual_seed(seed)
    return FivePolicy(cfg)


def fmt_losses(losses: dict) -> str:
    return f"{sum(losses.values()) / len(losses):.4f}  (" + ", ".join(f"{h} {v:.4f}" for h, v in losses.items()) + ")"


# the run -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps per phase (default 600)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out", help="directory for five_surgery.png")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    # The models are small: one thread is faster than two (and the run is then bit-reproducible).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    cfgs = configs()
    world = World(cfgs, seed=args.seed + 1000)
    eval_data = world.sample(1024, torch.Generator().manual_seed(args.seed + 2000))
    evalset = (eval_data, world.targets(eval_data))
    batches = torch.Generator().manual_seed(args.seed + 3000)
    print(f"teacher: {sum(len(n) for n in world.names.values())} features in {len(world.names)} groups, "
          f"heads {world.heads}; the student starts with "
          f"{sum(len(n) for _, n in cfgs[0].groups.values())} features and heads {cfgs[0].heads}")
    freq = {h: torch.bincount(t, minlength=world.heads[h]).div(len(t)).tolist() for h, t in evalset[1].items()}
    print("action frequencies of the teacher: " +
          "; ".join(f"{h} " + " ".join(f"{p:.2f}" for p in f) for h, f in freq.items()))

    lineage = Learner(build(cfgs[0], args.seed), 0, args.lr)
    segments = [lineage.history]        # one history per model of the lineage
    scratch: list[Learner] = []
    rows, failures = [], []
    step = 0

    def train_phase(learners):
        nonlocal step
        for _ in range(args.steps):
            data = world.sample(args.batch, batches)
            targets = world.targets(data)
            for learner in learners:
                learner.train_step(step, world, data, targets)
            step += 1
            if step % EVAL_EVERY == 0:
                for learner in learners:
                    learner.evaluate(step, world, evalset)

    lineage.evaluate(0, world, evalset)
    train_phase([lineage])
    print(f"\nphase 0 (base model, {args.steps} steps): loss {fmt_losses(lineage.evaluate(step, world, evalset))}")
    lineage.history.pop()   # already recorded at this step

    for k, ((title, _), old_cfg, new_cfg) in enumerate(zip(CHANGES, cfgs, cfgs[1:]), start=1):
        print(f"\n{'=' * 100}\nsurgery {k} at step {step}: {title}\n{'=' * 100}")
        old = lineage.model
        before = lineage.evaluate(step, world, evalset)
        lineage.history.pop()
        new = build(new_cfg, args.seed + k)
        example = world.sample(2, torch.Generator().manual_seed(args.seed + 4000 + k))
        t0 = time.perf_counter()
        model, plan = fs.transplant(old, new, world.inputs(old_cfg, example), world.inputs(new_cfg, example),
                                    old.features(), new.features())
        t_surgery = time.perf_counter() - t0
        print(plan.table())
        print()
        print(plan.summary())
        t0 = time.perf_counter()
        v = fs.verify(plan)
        t_verify = time.perf_counter() - t0
        print()
        print(v)
        # An output the old model lacks (a new head) has nothing to be compared with; every other
        # output must match the old model's.
        compared = [o for o in v.outputs if o.compared]
        ok = bool(compared) and all(o.relative <= TOL for o in compared)
        if not ok:
            failures.append(f"surgery {k} ({title}): largest relative deviation {v.max:.3g} > {TOL:g}")
        print(f"\nverification: {'OK' if ok else 'FAILED'} (tolerance {TOL:g}); transplant {t_surgery:.2f}s, "
              f"verify {t_verify:.2f}s")

        lineage = Learner(model, step, args.lr)
        after = lineage.evaluate(step, world, evalset)
        segments.append(lineage.history)
        fresh = Learner(build(new_cfg, args.seed + 100 + k), step, args.lr)
        at_init = fresh.evaluate(step, world, evalset)
        scratch.append(fresh)
        print(f"loss just before the surgery: {fmt_losses(before)}")
        print(f"loss just after the surgery:  {fmt_losses(after)}")
        print(f"from scratch at this step:    {fmt_losses(at_init)}")

        start = step
        train_phase([lineage, fresh])
        end_lineage, end_scratch = lineage.history[-1][1], fresh.history[-1][1]
        print(f"after {step - start} more steps: surgery lineage {end_lineage:.4f}, from scratch {end_scratch:.4f}")
        c = counts(plan)
        rows.append([k, title, c["copied"], c["zeroed"], c["kept"], c["dropped"], f"{v.max:.1e}",
                     "yes" if plan.preserves_function else f"no ({len(plan.issues)} issues)",
                     f"{sum(before.values()) / len(before):.4f}", f"{sum(after.values()) / len(after):.4f}",
                     f"{sum(at_init.values()) / len(at_init):.4f}", f"{end_lineage:.4f}", f"{end_scratch:.4f}"])

    runtime = time.perf_counter() - t_start
    print(f"\n{'=' * 100}\nsummary ({len(CHANGES)} surgeries, {args.steps} steps per phase, batch {args.batch}; "
          f"loss = mean cross-entropy over the model's heads on {len(eval_data[next(iter(eval_data))])} held-out "
          f"samples)\n{'=' * 100}")
    print(tabulate(rows, headers=["#", "change", "copied", "zeroed", "kept", "dropped", "max dev",
                                  "plan: preserved", "loss before", "loss after", "scratch (same step)",
                                  "end: surgery", "end: scratch"], intfmt=","))
    print("\n'max dev': largest relative output deviation of fs.verify (removed feature: against the old model "
          "with it at zero; new head: over the old heads). 'loss after' for the new head includes the new, "
          "untrained head.")

    path = plot(segments, scratch, SHORT, args)
    print(f"\nplot: {path}")
    print(f"runtime: {runtime:.1f}s (plot included: {time.perf_counter() - t_start:.1f}s)")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


def plot(segments, scratch, titles, args) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    colors = plt.get_cmap("tab10").colors
    for i, hist in enumerate(segments):
        xs, ys = zip(*hist)
        ax.plot(xs, ys, color="black", lw=2, label="surgery lineage" if i == 0 else None)
    for k, learner in enumerate(scratch, start=1):
        xs, ys = zip(*learner.history)
        ax.plot(xs, ys, color=colors[k % 10], lw=1.5, ls="--", label=f"from scratch after change {k}")
    top = max(y for h in [*segments, *(s.history for s in scratch)] for _, y in h)
    for k, (learner, title) in enumerate(zip(scratch, titles), start=1):
        ax.axvline(learner.start, color=colors[k % 10], lw=1, alpha=0.7)
        ax.text(learner.start + args.steps * 0.03, top * 0.03, f"{k}. {title}", rotation=90, va="bottom",
                ha="left", fontsize=9, color=colors[k % 10],
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_xlabel("training step")
    ax.set_ylabel("imitation loss (mean cross-entropy over heads, held-out)")
    ax.set_title("FivePolicy kept alive through 5 surgeries (fxsurgery) vs. retrained from scratch at each change")
    ax.set_ylim(0, top * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out / "five_surgery.png"
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
