"""The boolean mapping on hand-written models, against answers worked out by hand."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from helpers import Tied, element, key, names

OBS = ["hp", "mana", "x", "y"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)

    def forward(self, obs):
        return self.fc2(torch.relu(self.ln(self.fc1(obs))))


def test_mlp_first_layer_columns_meet_their_feature_only():
    imap = fs.interaction_map(fs.trace(MLP(), (torch.randn(2, 4),), {"obs": fs.Features(OBS)}))
    for i, f in enumerate(OBS):
        assert element(imap, "fc1.weight", (1, i)) == {f"obs:{f}"}
        assert imap.params_for(f)["fc1.weight"].equal(
            torch.zeros(3, 4, dtype=torch.bool).index_fill(1, torch.tensor([i]), True))
    # Past the first layer every hidden unit depends on every feature.
    assert element(imap, "fc2.weight", (0, 2)) == {f"obs:{f}" for f in OBS}
    assert names(imap.labels_of("ln.weight")) == {f"obs:{f}" for f in OBS}
    # Biases are only added: they meet nothing.
    assert imap.labels_of("fc1.bias") == set() and imap.labels_of("ln.bias") == set()


def test_mlp_keys_name_the_nearest_units():
    imap = fs.interaction_map(fs.trace(MLP(), (torch.randn(2, 4),), {"obs": fs.Features(OBS)}))
    assert key(imap, "fc1.weight", (1, 2)) == ({"obs:x"}, {"fc1[1]"})
    assert key(imap, "fc2.weight", (1, 2)) == ({"fc1[2]"}, {"fc2[1]"})
    assert key(imap, "fc2.bias", (1,)) == (set(), {"fc2[1]"})
    # A layer norm keeps positions: its scale j is fc1's unit j.
    assert key(imap, "ln.weight", (2,)) == ({"fc1[2]"}, {"fc1[2]"})


class TwoGroups(nn.Module):
    """Concatenated feature groups with separate encoders."""

    def __init__(self):
        super().__init__()
        self.enc_a, self.enc_b, self.head = nn.Linear(3, 2), nn.Linear(2, 3), nn.Linear(5, 1)

    def forward(self, a, b):
        return self.head(torch.cat([torch.tanh(self.enc_a(a)), torch.tanh(self.enc_b(b))], -1))


def test_concatenated_groups_keep_their_features_apart():
    feats = {"a": fs.Features(["a0", "a1", "a2"]), "b": fs.Features(["b0", "b1"])}
    imap = fs.interaction_map(fs.trace(TwoGroups(), (torch.randn(1, 3), torch.randn(1, 2)), feats))
    assert names(imap.labels_of("enc_a.weight")) == {"a:a0", "a:a1", "a:a2"}
    assert names(imap.labels_of("enc_b.weight")) == {"b:b0", "b:b1"}
    assert element(imap, "head.weight", (0, 1)) == {"a:a0", "a:a1", "a:a2"}
    assert element(imap, "head.weight", (0, 4)) == {"b:b0", "b:b1"}
    assert key(imap, "head.weight", (0, 1)) == ({"enc_a[1]"}, {"head[0]"})
    assert key(imap, "head.weight", (0, 3)) == ({"enc_b[1]"}, {"head[0]"})


class EntityBag(nn.Module):
    """Entities with features and a type embedding, encoded per entity, max-pooled."""

    def __init__(self):
        super().__init__()
        self.enc, self.emb, self.head = nn.Linear(3, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

    def forward(self, ents, kind):
        h = torch.relu(self.enc(ents) + self.emb(kind))
        return self.head(h.max(dim=1).values)


def test_embedding_bag_pooled_with_max():
    kinds = ["hero", "creep", "tower", "ward", "courier"]
    feats = {"ents": fs.Features(["hp", "x", "y"]), "kind": fs.Categories(kinds)}
    t = fs.trace(EntityBag(), (torch.randn(2, 6, 3), torch.randint(0, 5, (2, 6))), feats)
    imap = fs.interaction_map(t)
    for c, k in enumerate(kinds):
        assert element(imap, "emb.weight", (c, 1)) == {f"kind:{k}"}  # row c meets category c
        assert key(imap, "emb.weight", (c, 3)) == ({f"kind:{k}"}, {"emb:1[3]"})
    assert element(imap, "enc.weight", (0, 2)) == {"ents:y"}
    everything = {"ents:hp", "ents:x", "ents:y"} | {f"kind:{k}" for k in kinds}
    assert element(imap, "head.weight", (1, 0)) == everything
    assert imap.params_for("tower")["emb.weight"].nonzero()[:, 0].unique().tolist() == [2]


class FusedProjection(nn.Module):
    """A fused projection split into chunks, and a parameter used through a transpose."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 6)
        self.w = nn.Parameter(torch.randn(2, 2))
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q * k) @ self.w.t() * self.scale + v


def test_units_keep_identity_through_chunks_and_transposed_parameters():
    t = fs.trace(FusedProjection(), (torch.randn(1, 3),), {"x": fs.Features(["a", "b", "c"])})
    imap = fs.interaction_map(t)
    # w is used transposed: w[o, i] multiplies (q*k)[i], the product of qkv units i and 2+i.
    assert key(imap, "w", (1, 0)) == ({"qkv[0]", "qkv[2]"}, {"w[1]"})
    assert element(imap, "w", (1, 0)) == {"x:a", "x:b", "x:c"}
    # scale multiplies w's outputs, which are units of w.
    assert key(imap, "scale", (1,)) == ({"w[1]"}, {"w[1]"})


def test_meta_device_model_maps_like_the_cpu_one():
    feats = {"obs": fs.Features(OBS)}
    cpu = fs.interaction_map(fs.trace(MLP(), (torch.randn(2, 4),), feats))
    with torch.device("meta"):
        meta_model = MLP()
    meta = fs.interaction_map(fs.trace(meta_model, (torch.empty(2, 4, device="meta"),), feats))
    assert cpu == meta


def test_the_model_is_not_modified():
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    fs.interaction_map(fs.trace(model, (torch.randn(2, 4),), {"obs": fs.Features(OBS)}))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unnamed_inputs_get_one_label_each():
    imap = fs.interaction_map(fs.trace(TwoGroups(), (torch.randn(1, 3), torch.randn(1, 2))))
    assert names(imap.labels_of("head.weight")) == {"a", "b"}
    assert element(imap, "head.weight", (0, 0)) == {"a"}


def test_tied_weights_are_one_entry_with_both_names():
    t = fs.trace(Tied(), (torch.randint(0, 4, (2, 5)),), {"tok": fs.Categories(["a", "b", "c", "d"])})
    imap = fs.interaction_map(t)
    assert imap.names == ["emb.weight"]
    assert imap.labels_of("out.weight") == imap.labels_of("emb.weight")
    assert "out.weight" in imap.table()


class Regions(nn.Module):
    """A buffer read under no_grad and a layer run with autocast disabled: torch.export wraps
    both regions in higher-order operators around a subgraph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("freq", torch.randn(3))

    def forward(self, obs):
        with torch.no_grad():
            f = torch.cos(self.freq * 2.0)
        with torch.autocast("cpu", enabled=False):
            h = self.fc(obs)
        return h * f


def test_no_grad_and_autocast_regions_are_mapped_as_if_inlined():
    t = fs.trace(Regions(), (torch.randn(2, 4),), {"obs": fs.Features(OBS)})
    wrappers = {n.target.name() for n in t.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)}
    assert wrappers == {"wrap_with_set_grad_enabled", "wrap_with_autocast"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.UnknownOperatorWarning)
        imap = fs.interaction_map(t)
    assert element(imap, "fc.weight", (1, 2)) == {"obs:x"}
    assert key(imap, "freq", (1,)) == ({"fc[1]"}, {"fc[1]"})  # the buffer meets the unit it scales
    assert imap == fs.gradient_interaction_map(t, trials=2)


class WithOptionalArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, obs, cache=None, mask=None):
        assert cache is None
        return self.fc(obs * mask)


def test_named_inputs_are_passed_by_keyword_when_they_skip_a_parameter():
    inputs = {"obs": torch.randn(2, 4), "mask": torch.ones(2, 4)}
    t = fs.trace(WithOptionalArgs(), inputs, {"obs": fs.Features(OBS)})
    assert t.keywords and t.input_names == ["obs", "mask"]
    assert names(fs.interaction_map(t).labels_of("fc.weight")) == {f"obs:{f}" for f in OBS} | {"mask"}
    assert not fs.trace(MLP(), {"obs": torch.randn(2, 4)}).keywords    # forward's leading parameters: positional
