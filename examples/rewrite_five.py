"""The rewriting passes on the OpenAI-Five-like policy: the changes of the main example made
without writing a new model (no new config, no new class), each pass fed the previous pass's
output, then a few training steps of the result at another batch size.

    python examples/rewrite_five.py

Prints each change's plan summary and verification, and exits with status 1 if a change
that the plan says preserves the function deviates by more than 1e-5.
"""
import sys
import warnings

import torch

import fxsurgery as fs
from fxsurgery import zoo

TOL = 1e-5


def main() -> int:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, inputs, features = zoo.five_small("cpu")
    model.eval()
    stale = features["self"].names[3]
    changes = [
        ("add allies.armor after allies.f1", lambda m: fs.passes.add_features(
            m, "allies", ["allies.armor"], at="allies.f1")),
        ("add enemies.armor, enemies.range", lambda m: fs.passes.add_features(
            m, "enemies", ["enemies.armor", "enemies.range"])),
        (f"remove {stale}", lambda m: fs.passes.remove_features(m, "self", [stale])),
        ("reorder inventory", lambda m: fs.passes.reorder_features(
            m, "inventory", list(reversed(features["inventory"].names)))),
        ("widen the LSTM core 32 -> 64", lambda m: fs.passes.widen(m, "core", 64)),
        ("insert an identity layer after the core projection",
         lambda m: fs.passes.insert_identity_layer(m, "project")),
    ]
    current = fs.trace(model, inputs, features)
    failed = False
    for title, change in changes:
        current = change(current)
        plan = current.meta["fxsurgery"]["plan"]
        check = fs.verify(plan)
        print(f"\n== {title}\n{plan.summary()}\nverify: max relative deviation {check.max:.2g}; "
              f"batch size {current.meta['fxsurgery']['batch']}")
        if plan.preserves_function and check.max > TOL:
            failed = True
    # The result is an ordinary module: train it a little, at a batch size of 16.
    x = [torch.randn(16, *t.shape[1:]) if t.is_floating_point() else t[:1].expand(16, *t.shape[1:]).clone()
         for t in current.meta["fxsurgery"]["inputs"].values()]
    opt = torch.optim.Adam(current.parameters(), lr=1e-3)
    for step in range(3):
        loss = sum(out.logsumexp(-1).mean() for out in current(*x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"training step {step}: loss {loss.item():.4f}")
    print("\nparameters:", {k: tuple(v.shape) for k, v in current.state_dict().items()
                           if k.startswith(("core.", "encoders.allies.0", "project_identity"))})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
