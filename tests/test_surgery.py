"""Surgery: plans, transplants and their checks on small models (function preservation to 1e-5,
copied elements bit-identical, new labels never copied), and every bad input."""
import pytest
import torch
import torch.nn as nn

import fxsurgery as fs
from fxsurgery.surgery import plan, transplant, verify
from fxsurgery.surgery.renames import rename_prefix
from fxsurgery.zoo import FivePolicy, five_config_small

from faults import nth_call_raises

OBS = ["hp", "mana", "x", "y"]


class MLP(nn.Module):
    def __init__(self, n_in=4, hidden=8, n_out=3, norm=False):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.ln = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, obs):
        return self.head(torch.tanh(self.fc2(torch.relu(self.ln(self.fc1(obs))))))


class TwoGroups(nn.Module):
    def __init__(self, na=3, nb=2):
        super().__init__()
        self.enc_a, self.enc_b, self.head = nn.Linear(na, 4), nn.Linear(nb, 4), nn.Linear(8, 2)

    def forward(self, a, b):
        return self.head(torch.cat([torch.tanh(self.enc_a(a)), torch.tanh(self.enc_b(b))], -1))


class TiedLM(nn.Module):
    """Embedding with an output projection tied to it: logits over the vocabulary."""

    def __init__(self, vocab=5, width=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.mix(self.emb(tok))))


class CNN(nn.Module):
    def __init__(self, channels=3, kernel=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, kernel, padding=kernel // 2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, image):
        h = torch.relu(self.bn1(self.conv1(image)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def randomise_batchnorm(model):
    """Non-trivial running statistics, so that carrying them over is visible."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(7)


def five(config, batch=2):
    torch.manual_seed(len(str(config)))
    model = FivePolicy(config)
    return model, dict(zip(model.input_names(), model.example_inputs(batch=batch))), model.features()


def five_old():
    return five(five_config_small())


def five_grown_config():
    cfg = five_config_small()
    n, names = cfg.groups["allies"]
    cfg.groups["allies"] = (n, names[:2] + ("allies.armor",) + names[2:])
    n, names = cfg.groups["enemies"]
    cfg.groups["enemies"] = (n, names + ("enemies.armor",))
    cfg.core = 40
    return cfg


def five_new():
    return five(five_grown_config())


# checks -----------------------------------------------------------------------------------------

def label_text(label, anchored=None, unit_map=None, rename=None) -> str:
    """Features "input:name" (no position), units "group[i]" (old units renamed and through the unit
    map), or "group<category>" for units that stand for categories (rows of a tied projection)."""
    if label.kind == "unit" and rename:
        label = label._replace(group=rename_prefix(label.group, rename))
    if label.kind == "unit" and anchored and label.index in anchored.get(label.group, {}):
        return f"{label.group}<{anchored[label.group][label.index].name}>"
    if label.kind == "unit" and unit_map and label.group in unit_map:
        k = unit_map[label.group].get(label.index)
        return f"{label.group}[{k}]" if k is not None else f"{label.group}[pruned {label.index}]"
    return str(label)


def dense_keys(imap, name, anchored=None, unit_map=None, rename=None):
    e = imap.entries[name]
    meets, aligned = e.key_meets.dense(imap.pool), e.key_aligned.dense(imap.pool)
    text = {}

    def names(sid):
        if sid not in text:
            text[sid] = frozenset(label_text(imap.pool.labels[i], anchored, unit_map, rename) for i in imap.pool.sets[sid])
        return text[sid]
    return [(names(m), names(a)) for m, a in zip(meets.reshape(-1).tolist(), aligned.reshape(-1).tolist())]


def assert_elements(p, before: dict):
    """Checks every element of every new parameter against the keys, independently of the plan's
    own bookkeeping: an element whose key is in the old parameter is bit-identical to the old
    element with that key (the i-th such new element to the i-th such old one), an element that
    meets a new label is zero, any other element keeps the new model's value."""
    old_state = p.old.model.state_dict()
    new_state = p.new.model.state_dict()
    anchored_old, anchored_new = p.space.category_units["old"], p.space.category_units["new"]
    umap = p.space.unit_maps
    old_labels = {label_text(l, anchored_old, umap, p.rename) for l in p.old_map.pool.labels}
    checked = 0
    for name, e in p.new_map.entries.items():
        pp = p.params[name]
        new_keys = dense_keys(p.new_map, name, anchored_new)
        got = new_state[name].reshape(-1)
        init = before[name].reshape(-1)
        sources: dict = {}
        if pp.old_name is not None and not pp.match.unexplained:
            old_keys = dense_keys(p.old_map, pp.old_name, anchored_old, umap, p.rename)
            old_val = old_state[pp.old_name].reshape(-1)
            for j, k in enumerate(old_keys):
                sources.setdefault(k, []).append(j)
        seen: dict = {}
        for i, k in enumerate(new_keys):
            r = seen[k] = seen.get(k, -1) + 1
            if any(l not in old_labels for l in k[0]):
                assert got[i] == 0, f"{name}[{i}] meets a new label {sorted(k[0])} but is {got[i]}"
            elif k in sources and r < len(sources[k]):
                src = old_val[sources[k][r]]
                assert got[i].view(-1).view(torch.uint8 if got.dtype == torch.bool else got.dtype).equal(
                    src.view(-1)), f"{name}[{i}] should be copied from old {pp.old_name}[{sources[k][r]}]"
            else:
                assert torch.equal(got[i], init[i]), f"{name}[{i}] should keep the new model's value"
            checked += 1
    return checked


def run_surgery(old, new, old_inputs, new_inputs, old_features, new_features, tol=1e-5, **kwargs):
    p = plan(fs.trace(old, old_inputs, old_features), fs.trace(new, new_inputs, new_features), **kwargs)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    p.apply()
    v = verify(p)
    assert v.max <= tol, str(v)
    assert_elements(p, before)
    return p, v


def feats(names, dim=-1):
    return {"obs": fs.Features(names, dim=dim)}


# adding, reordering, removing features ---------------------------------------------------------

@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_adding_features_to_one_group(where):
    new_names = {"start": ["armor", "speed"] + OBS, "middle": OBS[:2] + ["armor", "speed"] + OBS[2:],
                 "end": OBS + ["armor", "speed"]}[where]
    old, new = MLP(4), MLP(6)
    p, v = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 6)}, feats(OBS), feats(new_names))
    cols = [new_names.index(f) for f in OBS]
    assert torch.equal(new.fc1.weight[:, cols], old.fc1.weight)
    added = [new_names.index(f) for f in ("armor", "speed")]
    assert torch.count_nonzero(new.fc1.weight[:, added]) == 0
    for name in ("fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"):
        assert torch.equal(new.state_dict()[name], old.state_dict()[name])
    assert p.params["fc2.weight"].status == "copied" and p.params["fc1.weight"].status == "changed"
    assert "meets new obs: armor, speed (zeroed)" in p.table()
    assert p.preserves_function and not p.issues


def test_adding_features_to_several_groups():
    old, new = TwoGroups(3, 2), TwoGroups(4, 4)
    fo = {"a": fs.Features(["a0", "a1", "a2"]), "b": fs.Features(["b0", "b1"])}
    fn = {"a": fs.Features(["a0", "new_a", "a1", "a2"]), "b": fs.Features(["new_b", "b0", "b1", "new_c"])}
    p, _ = run_surgery(old, new, (torch.randn(1, 3), torch.randn(1, 2)), (torch.randn(1, 4), torch.randn(1, 4)),
                       fo, fn)
    assert torch.equal(new.enc_a.weight[:, [0, 2, 3]], old.enc_a.weight)
    assert torch.equal(new.enc_b.weight[:, [1, 2]], old.enc_b.weight)
    assert torch.count_nonzero(new.enc_a.weight[:, 1]) == 0
    assert torch.count_nonzero(new.enc_b.weight[:, [0, 3]]) == 0
    assert torch.equal(new.head.weight, old.head.weight)
    assert {str(l) for l in p.new_labels} == {"a:new_a", "b:new_b", "b:new_c"}


def test_reordering_features():
    order = ["y", "hp", "x", "mana"]
    old, new = MLP(4), MLP(4)
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 4)}, feats(OBS), feats(order))
    assert torch.equal(new.fc1.weight, old.fc1.weight[:, [OBS.index(f) for f in order]])
    assert "reordered" in p.table()
    assert p.table().count("unchanged") == 5


def test_removing_a_feature():
    """The old model with the removed feature at zero is what the new model computes."""
    kept = ["hp", "x", "y"]
    old, new = MLP(4), MLP(3)
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 3)}, feats(OBS), feats(kept))
    assert torch.equal(new.fc1.weight, old.fc1.weight[:, [0, 2, 3]])
    assert p.params["fc1.weight"].match.n_dropped() == 8
    assert [str(l) for l in p.removed_labels] == ["obs:mana"]
    issue, = p.issues
    assert issue.where == "fc1.weight" and "obs: mana" in issue.message and "non-zero" in issue.message
    assert not p.preserves_function


def test_removing_a_feature_whose_column_was_zero_preserves_the_function():
    old, new = MLP(4), MLP(3)
    with torch.no_grad():
        old.fc1.weight[:, 1] = 0
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 3)}, feats(OBS),
                       feats(["hp", "x", "y"]))
    assert not p.issues


# categories, hidden units, channels -------------------------------------------------------------

VOCAB = ["<pad>", "a", "b", "c", "d"]


@pytest.mark.parametrize("how", ["zero", "mean", "keep"])
def test_adding_categories_with_a_tied_output_projection(how):
    old, new = TiedLM(5), TiedLM(7)
    new_vocab = ["<pad>", "a", "new1", "b", "c", "d", "new2"]
    tok_old, tok_new = torch.randint(0, 5, (2, 4)), torch.randint(0, 7, (2, 4))
    p, v = run_surgery(old, new, (tok_old,), (tok_new,), {"tok": fs.Categories(VOCAB)},
                       {"tok": fs.Categories(new_vocab)}, new_categories=how) if how == "zero" else \
        _categories_other(old, new, tok_old, tok_new, new_vocab, how)
    assert new.out.weight is new.emb.weight  # still tied
    rows = [new_vocab.index(c) for c in VOCAB]
    assert torch.equal(new.emb.weight[rows], old.emb.weight)
    added = new.emb.weight[[2, 6]]
    if how == "zero":
        assert torch.count_nonzero(added) == 0
    elif how == "mean":
        assert torch.allclose(added, old.emb.weight.mean(0, keepdim=True).expand(2, -1))
    assert torch.equal(new.mix.weight, old.mix.weight)
    out_issue = [i for i in p.issues if i.kind == "new output"]
    assert out_issue and "gains 16 elements" in out_issue[0].message
    assert v.outputs[0].compared == 2 * 4 * 5 and "old positions" in v.outputs[0].note


def _categories_other(old, new, tok_old, tok_new, new_vocab, how):
    p = plan(fs.trace(old, (tok_old,), {"tok": fs.Categories(VOCAB)}),
             fs.trace(new, (tok_new,), {"tok": fs.Categories(new_vocab)}), new_categories=how)
    p.apply()
    v = verify(p)
    assert v.max <= 1e-5, str(v)
    return p, v


def test_widening_a_hidden_linear():
    old, new = MLP(4, hidden=8), MLP(4, hidden=13)
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 4)}, feats(OBS), feats(OBS))
    assert torch.equal(new.fc1.weight[:8], old.fc1.weight) and torch.equal(new.fc1.bias[:8], old.fc1.bias)
    assert torch.equal(new.fc2.weight[:8, :8], old.fc2.weight)
    assert torch.count_nonzero(new.fc2.weight[:, 8:]) == 0          # outgoing weights of new units
    assert torch.count_nonzero(new.head.weight[:, 8:]) == 0
    assert torch.count_nonzero(new.fc1.weight[8:]) > 0               # new units keep their init
    row = p.params["fc2.weight"].match
    assert row.n_copied() == 64 and row.n_zeroed() == 13 * 5


def test_widening_before_a_layer_norm_is_reported():
    old, new = MLP(4, hidden=8, norm=True), MLP(4, hidden=10, norm=True)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)), fs.trace(new, {"obs": torch.randn(2, 4)}, feats(OBS)))
    issue, = p.issues
    assert issue.kind == "normalisation" and "layer_norm" in issue.where and "(ln)" in issue.where
    assert "fc1[8, 9]" in issue.message
    p.apply()
    assert verify(p).max > 1e-3  # indeed not preserved


class Policy(nn.Module):
    def __init__(self, actions=3):
        super().__init__()
        self.body, self.logits = nn.Linear(4, 8), nn.Linear(8, actions)

    def forward(self, obs):
        return torch.softmax(self.logits(torch.tanh(self.body(obs))), dim=-1)


def test_a_softmax_over_new_actions_is_reported_and_old_positions_compared():
    old, new = Policy(3), Policy(5)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)), fs.trace(new, {"obs": torch.randn(2, 4)}, feats(OBS)))
    kinds = sorted(i.kind for i in p.issues)
    assert kinds == ["new output", "softmax"], p.issues
    softmax = next(i for i in p.issues if i.kind == "softmax")
    assert "logits[3, 4]" in softmax.message
    p.apply()
    assert torch.equal(new.logits.weight[:3], old.logits.weight)
    v = verify(p)
    assert v.outputs[0].compared == 2 * 3 and v.max > 1e-4   # the new actions take probability mass


def test_adding_input_channels_to_a_cnn_with_batchnorm():
    old, new = CNN(3).eval(), CNN(4).eval()
    randomise_batchnorm(old)
    fo = {"image": fs.Features(["r", "g", "b"], dim=1)}
    fn = {"image": fs.Features(["r", "g", "depth", "b"], dim=1)}
    p, _ = run_surgery(old, new, (torch.randn(2, 3, 8, 8),), (torch.randn(2, 4, 8, 8),), fo, fn)
    assert torch.equal(new.conv1.weight[:, [0, 1, 3]], old.conv1.weight)
    assert torch.count_nonzero(new.conv1.weight[:, 2]) == 0
    for name in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "bn2.running_var", "bn1.weight",
                 "conv2.weight", "fc.weight"):
        assert torch.equal(new.state_dict()[name], old.state_dict()[name]), name
    assert not p.issues


def test_pruning_with_a_unit_map_keeps_exactly_the_surviving_units():
    old, new = MLP(4, hidden=8), MLP(4, hidden=5)
    keep = [6, 0, 3, 2, 7]
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)), fs.trace(new, {"obs": torch.randn(2, 4)}, feats(OBS)),
             units={"fc1": keep})
    p.apply()
    assert torch.equal(new.fc1.weight, old.fc1.weight[keep])
    assert torch.equal(new.fc1.bias, old.fc1.bias[keep])
    assert torch.equal(new.fc2.weight, old.fc2.weight[:5][:, keep])  # fc2 rows by position, columns by the map
    assert torch.equal(new.head.weight, old.head.weight[:, :5])
    assert p.params["fc1.weight"].match.n_dropped() == 3 * 4
    assert {i.kind for i in p.issues} == {"pruned units"}
    assert "fc1[1, 4, 5]" in str(p)


def test_pruning_units_whose_outgoing_weights_are_zero_preserves_the_function():
    old, new = MLP(4, hidden=8), MLP(4, hidden=6)
    keep = [0, 1, 2, 4, 5, 7]
    with torch.no_grad():
        old.fc2.weight[:, [3, 6]] = 0
        old.fc2.weight[6:] = 0     # fc2 keeps its first 6 units: the others must not matter either
        old.fc2.bias[6:] = 0
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 4)}, feats(OBS), feats(OBS),
                       units={"fc1": keep})
    assert not [i for i in p.issues if i.kind == "pruned units" and i.where == "fc2.weight"]


def test_renamed_module():
    class Renamed(MLP):
        def __init__(self):
            super().__init__()
            self.enc = self.fc1
            del self.fc1

        def forward(self, obs):
            return self.head(torch.tanh(self.fc2(torch.relu(self.enc(obs)))))

    old, new = MLP(4), Renamed()
    p, _ = run_surgery(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 4)}, feats(OBS), feats(OBS),
                       rename={"fc1": "enc"})
    assert torch.equal(new.enc.weight, old.fc1.weight)
    assert p.params["fc2.weight"].status == "copied"   # fc2 meets units enc[k], renamed from fc1[k]


class Attention(nn.Module):
    def __init__(self, width=16, heads=4):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_widening_attention_matches_q_k_v_and_heads_part_by_part():
    old, new = Attention(16).eval(), Attention(20).eval()
    x = {"x": fs.Features(["a", "b", "c"])}
    p = plan(fs.trace(old, (torch.randn(2, 5, 3),), x), fs.trace(new, (torch.randn(2, 5, 3),), x))
    assert p.space.unit_splits["new"]["attn.in_proj"] == [20, 5]   # thirds, then heads
    p.apply()
    for part in range(3):
        for head in range(4):
            rows_new = [part * 20 + head * 5 + j for j in range(4)]
            rows_old = [part * 16 + head * 4 + j for j in range(4)]
            assert torch.equal(new.attn.in_proj_weight[rows_new, :16], old.attn.in_proj_weight[rows_old])
    cols = [h * 5 + j for h in range(4) for j in range(4)]   # out_proj reads v's head dimensions
    assert torch.equal(new.attn.out_proj.weight[:16, cols], old.attn.out_proj.weight)
    assert torch.count_nonzero(new.attn.out_proj.weight[:, [h * 5 + 4 for h in range(4)]]) == 0
    issue, = p.issues   # wider heads change the scores (and their 1/sqrt(d) scale)
    assert issue.kind == "attention" and "(attn)" in issue.where


class Outer(nn.Module):
    """A parameter whose key varies along both axes jointly: the element-wise fallback."""

    def __init__(self, na=3, nb=2):
        super().__init__()
        self.p = nn.Parameter(torch.randn(nb, na))
        self.head = nn.Linear(na * nb, 2)

    def forward(self, a, b):
        x = a.unsqueeze(1) * b.unsqueeze(2) * self.p
        return self.head(x.flatten(1))


def test_a_key_that_is_not_separable_is_matched_element_by_element():
    old, new = Outer(3, 2), Outer(4, 2)
    fo = {"a": fs.Features(["a0", "a1", "a2"]), "b": fs.Features(["b0", "b1"])}
    fn = {"a": fs.Features(["a0", "a1", "new", "a2"]), "b": fs.Features(["b0", "b1"])}
    p = plan(fs.trace(old, (torch.randn(1, 3), torch.randn(1, 2)), fo), fs.trace(new, (torch.randn(1, 4), torch.randn(1, 2)), fn))
    assert [b.axes for b in p.params["p"].match.blocks] == [(0, 1)]
    p.apply()
    assert torch.equal(new.p[:, [0, 1, 3]], old.p)
    assert torch.count_nonzero(new.p[:, 2]) == 0


# the FivePolicy ---------------------------------------------------------------------------------

def _five_recurrent_rules():
    return torch.ops.aten.lstm.input in fs.REGISTRY


@pytest.mark.skipif(not _five_recurrent_rules(), reason="needs the recurrent (LSTM) label rules")
def test_five_policy_with_features_added_to_two_groups_and_a_wider_core():
    old, oi, of = five_old()
    new, ni, nf = five_new()
    p, v = run_surgery(old, new, oi, ni, of, nf)
    assert {str(l) for l in p.new_labels if l.kind == "feature"} == {"allies:allies.armor", "enemies:enemies.armor"}
    assert torch.equal(new.encoders.allies[0].weight[:, [0, 1, 3, 4, 5]], old.encoders.allies[0].weight)
    assert torch.count_nonzero(new.encoders.allies[0].weight[:, 2]) == 0
    assert torch.count_nonzero(new.encoders.enemies[0].weight[:, -1]) == 0
    h_old, h_new = 32, 40
    for g in range(4):  # gate rows g*H + j: old unit j of gate g is new row g*H' + j
        assert torch.equal(new.core.weight_hh_l0[g * h_new:g * h_new + h_old, :h_old],
                           old.core.weight_hh_l0[g * h_old:(g + 1) * h_old])
        assert torch.equal(new.core.bias_ih_l0[g * h_new:g * h_new + h_old], old.core.bias_ih_l0[g * h_old:(g + 1) * h_old])
    assert torch.count_nonzero(new.core.weight_hh_l0[:, h_old:]) == 0
    assert torch.count_nonzero(new.core.weight_ih_l0[:, h_old:]) == 0   # meets new project units
    assert torch.count_nonzero(new.heads.move.weight[:, h_old:]) == 0
    assert len(v.outputs) == 2 and not p.issues


def test_an_element_that_meets_a_new_label_is_never_copied():
    old, oi, of = five_old()
    new, ni, nf = five_new()
    with torch.no_grad():
        for t in new.parameters():
            t.fill_(0.5)  # so that a zero can only come from the plan
    p = plan(fs.trace(old, oi, of), fs.trace(new, ni, nf))
    p.apply()
    new_labels = {t for t in p.space.new_only}
    for name, pp in p.params.items():
        if not pp.in_graph:
            continue
        e = p.new_map.entries[name]
        dense = e.key_meets.dense(p.new_map.pool).reshape(-1)
        meets_new = torch.tensor([bool(p.space.tokens("new", int(s)) & new_labels) for s in dense.tolist()])
        value = new.state_dict()[name].reshape(-1)
        assert bool((value[meets_new] == 0).all()), name
        copied = _copied_mask(pp.match).reshape(-1)
        assert not bool((copied & meets_new).any()), name


def _copied_mask(m):
    mask = torch.ones(m.new_shape, dtype=torch.bool)
    for b in m.blocks:
        (a,) = b.axes
        view = [1] * len(m.new_shape)
        view[a] = -1
        mask = mask & (b.index >= 0).reshape(view)
    return mask if m.copy else torch.zeros(m.new_shape, dtype=torch.bool)


# plan, table, verify, transplant ----------------------------------------------------------------

def test_table_and_summary_texts():
    old, new = MLP(4), MLP(5, hidden=10)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)),
             fs.trace(new, {"obs": torch.randn(2, 5)}, feats(OBS + ["armor"])))
    t = p.table()
    for word in ("parameter", "old shape", "new shape", "copied", "zeroed", "kept", "dropped", "reason",
                 "8x4", "10x5", "obs: armor", "fc1[8, 9]"):
        assert word in t, word
    assert "0 old elements dropped" in str(p) and "SurgeryPlan(" in repr(p)


def test_apply_reports_progress():
    old, new = MLP(4), MLP(5)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)),
             fs.trace(new, {"obs": torch.randn(2, 5)}, feats(OBS + ["z"])))
    calls = []
    p.apply(progress=lambda name, done, total: calls.append((name, done, total)))
    assert [c[0] for c in calls] == list(p.params) and calls[-1][1] == calls[-1][2] == 8 * 5 + 8 + 64 + 8 + 24 + 3


def test_verify_reports_each_output_and_the_largest_deviation():
    old, new = MLP(4), MLP(4)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)), fs.trace(new, {"obs": torch.randn(2, 4)}, feats(OBS)))
    before = verify(p, n=2)
    assert before.max > 1e-3 and "not been applied" in str(before)
    p.apply()
    v = verify(p, n=3, seed=5)
    assert v.max == 0.0 and v.ok() and v.trials == 3 and "largest relative deviation" in str(v)


def test_verify_leaves_batchnorm_statistics_alone_in_training_mode():
    old, new = CNN(3).train(), CNN(3).train()
    p = plan(fs.trace(old, (torch.randn(2, 3, 8, 8),), {"image": fs.Features(["r", "g", "b"], dim=1)}),
             fs.trace(new, (torch.randn(2, 3, 8, 8),), {"image": fs.Features(["r", "g", "b"], dim=1)}))
    p.apply()
    stats = old.bn1.running_mean.clone()
    assert verify(p).max <= 1e-5
    assert torch.equal(old.bn1.running_mean, stats) and int(old.bn1.num_batches_tracked) == 0


class Tokens(nn.Module):
    """An embedding of a categories input next to a features input."""

    def __init__(self, n_in=4, vocab=5):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(vocab, 6), nn.Linear(n_in, 6), nn.Linear(6, 2)

    def forward(self, obs, tok):
        return self.head(torch.tanh(self.fc(obs) + self.emb(tok).mean(1)))


def _materialise(model):
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def test_verify_after_the_meta_workflow():
    """The new model traced on meta (inputs on meta too), materialised, applied: verify draws its
    inputs on the models' device and never reads the values of meta example inputs (integer
    inputs: the Categories' size)."""
    vocab = ["a", "b", "c", "d", "e"]
    old = Tokens(4, 5)
    with torch.device("meta"):
        new = Tokens(5, 6)
        new_inputs = {"obs": torch.randn(2, 5), "tok": torch.zeros(2, 3, dtype=torch.int64)}
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4), "tok": torch.randint(0, 5, (2, 3))},
                      {"obs": fs.Features(OBS), "tok": fs.Categories(vocab)}),
             fs.trace(new, new_inputs, {"obs": fs.Features(OBS + ["armor"]), "tok": fs.Categories(vocab + ["f"])}))
    _materialise(new)
    p.apply()
    v = verify(p, n=3)
    assert v.max <= 1e-5 and v.ok()
    # categories shared with the old model never: drawn among the new model's own categories
    with torch.device("meta"):
        new2 = Tokens(4, 5)
    p2 = plan(fs.trace(old, {"obs": torch.randn(2, 4), "tok": torch.randint(0, 5, (2, 3))},
                       {"obs": fs.Features(OBS)}),
              fs.trace(new2, {"obs": torch.randn(2, 4, device="meta"),
                              "tok": torch.zeros(2, 3, dtype=torch.int64, device="meta")}, {"obs": fs.Features(OBS)}))
    _materialise(new2)
    p2.apply()
    assert verify(p2, n=2).max <= 1e-5


def test_transplant_is_the_one_call_form():
    old, new = MLP(4), MLP(5)
    model, p = transplant(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 5)}, feats(OBS),
                          feats(OBS + ["armor"]))
    assert model is new and p.applied and verify(p).max <= 1e-5


def test_the_old_model_is_never_modified():
    old, new = MLP(4), MLP(6, hidden=10)
    state = {k: v.clone() for k, v in old.state_dict().items()}
    transplant(old, new, {"obs": torch.randn(2, 4)}, {"obs": torch.randn(2, 6)}, feats(OBS),
               feats(OBS + ["a", "b"]))
    with torch.no_grad():
        new.fc2.weight.add_(1)  # the new model does not share storage with the old one
    assert all(torch.equal(state[k], v) for k, v in old.state_dict().items())


def test_dtypes_and_devices_of_the_new_model_are_kept():
    old, new = MLP(4), MLP(5).double()
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)),
             fs.trace(new, {"obs": torch.randn(2, 5, dtype=torch.float64)}, feats(OBS + ["z"])))
    p.apply()
    assert new.fc1.weight.dtype == torch.float64
    assert torch.equal(new.fc1.weight[:, :4], old.fc1.weight.double())


# bad input ---------------------------------------------------------------------------------------

def _mlp_traces(hidden_new=8):
    old, new = MLP(4), MLP(4, hidden=hidden_new)
    return (fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)),
            fs.trace(new, {"obs": torch.randn(2, 4)}, feats(OBS)))


@pytest.mark.parametrize("units, message", [
    ({"fc1": [0, 1, 8]}, r"units\['fc1'\]\[2\] = 8 is out of range: .* has 8 units"),
    ({"fc1": [0, -1]}, r"units\['fc1'\]\[1\] = -1 is out of range"),
    ({"fc1": [3, 1, 3]}, r"units\['fc1'\]: old unit 3 is repeated \(at positions 0 and 2\)"),
    ({"fc9": [0]}, r"units\['fc9'\]: no hidden axis named 'fc9'.*'fc1'"),
    ({"fc1": [0, 1, 2, 3, 4, 5, 6]}, r"lists 7 surviving units, but .* has only 6"),
    ({"fc1": [0, "a"]}, r"must be integers"),
])
def test_bad_unit_maps(units, message):
    from fxsurgery.surgery import SurgeryError
    old, new = _mlp_traces(hidden_new=6)
    with pytest.raises(SurgeryError, match=message):
        plan(old, new, units=units)


def test_rename_to_a_missing_name():
    from fxsurgery.surgery import SurgeryError
    old, new = _mlp_traces()
    with pytest.raises(SurgeryError, match=r"rename 'fc1' -> 'encoder': the new model has no .*'encoder'.*fc1.weight"):
        plan(old, new, rename={"fc1": "encoder"})
    with pytest.raises(SurgeryError, match=r"rename 'fc7' -> 'fc1': the old model has no .*'fc7'"):
        plan(old, new, rename={"fc7": "fc1"})


def test_no_parameter_in_common():
    from fxsurgery.surgery import SurgeryError
    old = fs.trace(MLP(4), {"obs": torch.randn(2, 4)}, feats(OBS))
    new = fs.trace(CNN(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(SurgeryError, match=r"no parameter or buffer in common .*fc1.weight.*conv1.weight"):
        plan(old, new)


def test_unexplainable_shape_change_warns_or_raises_in_strict_mode():
    from fxsurgery.surgery import SurgeryError, SurgeryWarning
    fo = {"image": fs.Features(["r", "g", "b"], dim=1)}
    old, new = CNN(3, kernel=3).eval(), CNN(3, kernel=5).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(SurgeryError, match=r"conv1.weight: axis 2 changes size \(3 -> 5\) but its positions carry no "
                                           r"labels.*strict"):
        plan(fs.trace(old, (x,), fo), fs.trace(new, (x,), fo), strict=True)
    with pytest.warns(SurgeryWarning, match="re-initialising conv1.weight"):
        p = plan(fs.trace(old, (x,), fo), fs.trace(new, (x,), fo))
    before = new.conv1.weight.clone()
    p.apply()
    assert torch.equal(new.conv1.weight, before)          # re-initialised: the new model's own values
    assert torch.equal(new.conv1.bias, old.conv1.bias)    # the rest is carried over
    assert "re-initialised" in p.table()


def test_a_failed_apply_leaves_the_new_model_untouched(monkeypatch):
    import fxsurgery.surgery.planning as plan_module
    from fxsurgery.surgery import SurgeryError
    old, new = MLP(4), MLP(6)
    p = plan(fs.trace(old, {"obs": torch.randn(2, 4)}, feats(OBS)),
             fs.trace(new, {"obs": torch.randn(2, 6)}, feats(OBS + ["a", "b"])))
    before = {k: v.clone() for k, v in new.state_dict().items()}
    # fails on the fourth parameter, after three were prepared
    monkeypatch.setattr(plan_module, "build", nth_call_raises(plan_module.build, 4, RuntimeError("disk on fire")))
    with pytest.raises(RuntimeError, match="disk on fire"):
        p.apply()
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    monkeypatch.undo()
    old.fc2.weight = nn.Parameter(torch.randn(8, 9))   # the old model changed since the plan
    with pytest.raises(SurgeryError, match=r"old model's fc2.weight has shape \(8, 9\).*nothing was written"):
        p.apply()
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert not p.applied


def test_bad_options():
    from fxsurgery.surgery import SurgeryError
    old, new = _mlp_traces()
    with pytest.raises(SurgeryError, match="new_categories must be one of"):
        plan(old, new, new_categories="random")
    with pytest.raises(SurgeryError, match="expects traced models"):
        plan(MLP(), new)


@pytest.mark.parametrize("change", ["reorder and add", "widen core", "categories mean", "float64 old"])
def test_in_place_writes_equal_the_fresh_build(change):
    """apply() writes into the new model's own tensors where it can and builds fresh tensors
    otherwise; both ways must give the same bits for every parameter of the same plan."""
    from fxsurgery.surgery.apply import build, in_place_writes
    old, oi, of = five_old()
    cfg = five_config_small()
    how = "zero"
    if change == "reorder and add":
        n, names = cfg.groups["allies"]
        cfg.groups["allies"] = (n, tuple(reversed(names)) + ("allies.new",))
    elif change == "widen core":
        cfg.core += 3
    elif change == "categories mean":
        cfg.categories["enemy_type"] = cfg.categories["enemy_type"] + ["shrine", "outpost"]
        how = "mean"
    if change == "float64 old":
        old = old.double()
    new, ni, nf = five(cfg)
    p = plan(fs.trace(old, oi if change != "float64 old" else
                      {k: (v.double() if v.is_floating_point() else v) for k, v in oi.items()}, of),
             fs.trace(new, ni, nf), new_categories=how)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    in_place = 0
    for q in p.params.values():
        o = old_sd[q.old_name] if q.old_name is not None else None
        fresh = build(q.match, o, new_sd[q.name], how)
        dest = new_sd[q.name].clone()
        writes = in_place_writes(q.match, o, dest, how)
        if writes is None:
            continue
        in_place += 1
        for w in writes:
            w()
        assert torch.equal(dest, fresh), q.name
    assert in_place >= len(p.params) // 2


class Positional(nn.Module):
    """A non-persistent buffer (position-like, computed from the configuration) read by the graph."""

    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, 2)
        self.register_buffer("pos", torch.linspace(0.5, 1.5, 4), persistent=False)

    def forward(self, obs):
        return self.fc2(torch.tanh(self.fc1(obs * self.pos)))


def test_non_persistent_buffers_are_not_state_the_new_model_keeps_its_own():
    torch.manual_seed(0)
    old, new = Positional(5), Positional(7)
    feats = {"obs": fs.Features(OBS)}
    p = plan(fs.trace(old, (torch.randn(2, 4),), feats), fs.trace(new, (torch.randn(2, 4),), feats))
    pos = p.params["pos"]
    assert not pos.persistent and pos.status == "kept" and pos.old_name is None
    assert "non-persistent buffer" in p.table() and "pos" not in p.dropped
    assert p.preserves_function, str(p)
    with torch.no_grad():
        new.pos.mul_(2)   # what the new model computed for itself is what it keeps
    want = new.pos.clone()
    p.apply()
    assert torch.equal(new.pos, want)
    assert torch.equal(new.fc1.weight[:5], old.fc1.weight)
    with torch.no_grad():
        new.pos.copy_(old.pos)
    assert float(verify(p)) <= 1e-5
