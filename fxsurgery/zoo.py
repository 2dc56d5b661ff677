"""Reference architectures for the examples, benchmarks, tests and the command-line demo.

The main one is `FivePolicy`, an OpenAI-Five-like policy: several groups of entities (heroes,
creeps, ...), each encoded per entity by a small MLP and max-pooled over its entities, then
one projection, an LSTM core and several action heads. It has what makes the surgery
interesting: per-group feature sets that grow between training runs, categorical inputs
feeding embeddings, pooling that mixes entities, and a recurrent core that mixes everything.

Every factory returns `(model, example_inputs, features)`:
  * `model` is an `nn.Module` taking the example inputs positionally,
  * `example_inputs` is a dict input name -> tensor, in positional order (`fxsurgery.trace`
    reads the names from it; `model(*example_inputs.values())` runs the model),
  * `features` maps each positional input's name to `Features` / `Categories`, for
    `fxsurgery.trace`; its order is the order of the positional inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import keyword

import torch
from torch import nn

from fxsurgery.labels import Categories, Features

__all__ = ["FiveConfig", "FivePolicy", "five_config_small", "five_config_large", "five_small",
           "five_large", "mlp", "small_cnn", "count_parameters"]


@dataclass
class FiveConfig:
    """Shape of a `FivePolicy`. Dicts are ordered: their order is the order of the inputs
    (groups then categories) and of the returned head logits.

    groups:          group name -> (n_entities, feature names); input [batch, n_entities, n_features]
    encoder_width:   width of the two Linear layers of each group's encoder
    core:            LSTM hidden size
    heads:           head name -> number of actions
    categories:      integer input name -> category names; input [batch, n_entities of its group]
    category_groups: integer input name -> the group whose per-entity encoding its embedding
                     is added to (a separate dict so that `categories` stays a plain name list)
    """

    groups: dict[str, tuple[int, tuple[str, ...]]]
    encoder_width: int = 32
    core: int = 32
    heads: dict[str, int] = field(default_factory=lambda: {"action": 4})
    categories: dict[str, list[str]] = field(default_factory=dict)
    category_groups: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        # Names become ModuleDict keys and labels, so catch bad ones here rather than as an
        # obscure error deep inside nn.Module or the tracer.
        for name in [*self.groups, *self.heads, *self.categories]:
            # A keyword ("global") is a valid attribute but not an attribute expression: the
            # module torch.export unlifts from the graph would not compile.
            if not name or "." in name or hasattr(nn.ModuleDict, name) or keyword.iskeyword(name):
                raise ValueError(f"FiveConfig: {name!r} is not usable as a module name")
        clash = set(self.groups) & set(self.categories)
        if clash:
            raise ValueError(f"FiveConfig: inputs {sorted(clash)} are both groups and categories")
        for cat in self.categories:
            if self.category_groups.get(cat) not in self.groups:
                raise ValueError(f"FiveConfig: category input {cat!r} needs category_groups"
                                 f"[{cat!r}] naming one of the groups {list(self.groups)}")


class FivePolicy(nn.Module):
    """OpenAI-Five-like policy; see `FiveConfig`. `forward(*groups, *categories, state=None)`
    returns a tuple of head logits [batch, n_actions] in `config.heads` order."""

    def __init__(self, config: FiveConfig):
        super().__init__()
        self.config = config
        w = config.encoder_width
        # Sequential(Linear, ReLU, Linear) gives the stable names encoders.<group>.0 / .2.
        self.encoders = nn.ModuleDict({
            g: nn.Sequential(nn.Linear(len(names), w), nn.ReLU(), nn.Linear(w, w))
            for g, (_, names) in config.groups.items()})
        self.embeddings = nn.ModuleDict({c: nn.Embedding(len(names), w)
                                         for c, names in config.categories.items()})
        self.project = nn.Linear(w * len(config.groups), config.core)
        self.core = nn.LSTM(config.core, config.core, batch_first=True)
        self.heads = nn.ModuleDict({h: nn.Linear(config.core, n) for h, n in config.heads.items()})

    def input_names(self) -> list[str]:
        return [*self.config.groups, *self.config.categories]

    def features(self) -> dict[str, Features | Categories]:
        out: dict[str, Features | Categories] = {
            g: Features(names) for g, (_, names) in self.config.groups.items()}
        out.update({c: Categories(names) for c, names in self.config.categories.items()})
        return out

    def example_inputs(self, batch: int = 1, device="cpu") -> tuple[torch.Tensor, ...]:
        groups, cats = self.config.groups, self.config.categories
        xs = [torch.randn(batch, n, len(names), device=device) for n, names in groups.values()]
        xs += [torch.randint(len(names), (batch, groups[self.config.category_groups[c]][0]),
                             device=device) for c, names in cats.items()]
        return tuple(xs)

    def forward(self, *inputs: torch.Tensor, state=None):
        cfg = self.config
        groups, cats = list(cfg.groups), list(cfg.categories)
        if len(inputs) != len(groups) + len(cats):
            raise TypeError(f"FivePolicy expects {len(groups) + len(cats)} positional inputs "
                            f"{self.input_names()}, got {len(inputs)}")
        by_name = dict(zip(self.input_names(), inputs))
        pooled = []
        for g in groups:
            h = self.encoders[g](by_name[g])  # the encoder acts on each entity separately
            for c in cats:  # embeddings join before pooling so they tag their own entity
                if cfg.category_groups[c] == g:
                    h = h + self.embeddings[c](by_name[c])
            pooled.append(h.amax(dim=1))  # max-pool: invariant to entity order and count
        x = torch.relu(self.project(torch.cat(pooled, dim=-1)))
        # One time step per call, as in acting; state=None lets the LSTM start from zeros.
        y, _ = self.core(x.unsqueeze(1), state)
        y = y.squeeze(1)
        return tuple(self.heads[h](y) for h in cfg.heads)


def _names(group: str, n: int) -> tuple[str, ...]:
    return tuple(f"{group}.f{i}" for i in range(n))


def five_config_small() -> FiveConfig:
    """4 groups, 21 features, one categorical input; a fresh config each call, safe to edit."""
    spec = {"self": (1, 6), "allies": (3, 5), "enemies": (4, 6), "inventory": (6, 4)}
    return FiveConfig(
        groups={g: (n, _names(g, f)) for g, (n, f) in spec.items()},
        encoder_width=24, core=32, heads={"move": 5, "attack": 4},
        categories={"enemy_type": ["hero", "creep", "tower", "ward"]},
        category_groups={"enemy_type": "enemies"})


def five_config_large() -> FiveConfig:
    """36 groups, 16,000 features, ~160M parameters (134M of them in the 4096-unit LSTM)."""
    # (kind, entities, features) for each of three sides, plus three flat groups; the
    # feature counts sum to 3 * 3712 + 4864 = 16000.
    kinds = [("heroes", 5, 1440), ("creeps", 16, 400), ("towers", 11, 320),
             ("buildings", 8, 240), ("couriers", 2, 192), ("wards", 8, 128),
             ("summons", 8, 320), ("abilities", 24, 256), ("items", 16, 192),
             ("modifiers", 32, 128), ("projectiles", 16, 96)]
    spec = {"world": (1, 1024), "self_hero": (1, 2560), "minimap": (1, 1280)}
    spec.update({f"{side}_{k}": (n, f) for side in ("allied", "enemy", "neutral")
                 for k, n, f in kinds})
    return FiveConfig(
        groups={g: (n, _names(g, f)) for g, (n, f) in spec.items()},
        encoder_width=128, core=4096,
        heads={"action_type": 512, "target_unit": 256, "ability": 128, "item": 128,
               "offset_x": 9, "offset_y": 9, "delay": 4},
        categories={"enemy_hero_id": [f"hero{i}" for i in range(128)]},
        category_groups={"enemy_hero_id": "enemy_heroes"})


def _five(config: FiveConfig, device):
    # Building under torch.device(device) creates the parameters there directly: on "meta"
    # nothing is allocated, so the 160M-parameter model costs no memory and builds quickly.
    with torch.device(device):
        model = FivePolicy(config)
    inputs = dict(zip(model.input_names(), model.example_inputs(device=device)))
    return model, inputs, model.features()


def five_small(device="cpu"):
    """Small FivePolicy (~20k parameters): `(model, example_inputs, features)`."""
    return _five(five_config_small(), device)


def five_large(device="meta"):
    """Large FivePolicy (~160M parameters, 16k features): `(model, example_inputs, features)`.
    On the default "meta" device it is for tracing/exporting only, not for running."""
    return _five(five_config_large(), device)


def mlp():
    """3-layer MLP over `obs` [1, 6]: `(model, example_inputs, features)`."""
    names = ["x", "y", "vx", "vy", "angle", "spin"]
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    return model, {"obs": torch.randn(1, 6)}, {"obs": Features(names)}


def small_cnn():
    """CNN over `image` [2, 3, 16, 16], channels labelled r, g, b: `(model, inputs, features)`.
    Left in training mode like any fresh module; call .eval() to freeze BatchNorm statistics."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    # Batch of 2 so that BatchNorm in training mode has more than one value per channel.
    return model, {"image": torch.randn(2, 3, 16, 16)}, {"image": Features(["r", "g", "b"], dim=1)}


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on "meta" models too)."""
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    import time

    for name, factory in [("five_small", five_small), ("five_large", five_large),
                          ("mlp", mlp), ("small_cnn", small_cnn)]:
        t = time.perf_counter()
        model, inputs, feats = factory()
        n_feat = sum(len(d) for d in feats.values())
        print(f"{name:10s} {count_parameters(model):>12,d} parameters  {n_feat:>6,d} labels "
              f"in {len(feats)} inputs  (built in {time.perf_counter() - t:.2f}s)")
    model, inputs, _ = five_small()
    print("five_small forward:", [tuple(y.shape) for y in model(*inputs)])
