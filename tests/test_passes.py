"""The rewriting passes on hand-written models: each pass, function preservation (relative
deviation <= 1e-5 where the plan says it is preserved), the returned module as an ordinary module
(trains, saves and loads, is traced and changed again), two passes in a row, and bad input
(a clear error naming what exists, the input model untouched)."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsurgery as fs
from fxsurgery.passes import PassError, SizingError
from helpers import ThreeLayer as MLP

TOL = 1e-5
OBS = ["hp", "mana", "x", "y"]


pytestmark = pytest.mark.usefixtures("quiet")


class Core(nn.Module):
    """Two groups concatenated, an LSTM and a GRU core, two heads."""

    def __init__(self, rnn="lstm"):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 6)
        self.core = (nn.LSTM if rnn == "lstm" else nn.GRU)(12, 10, batch_first=True)
        self.move, self.attack = nn.Linear(10, 5), nn.Linear(10, 2)

    def forward(self, obs, other):
        h, _ = self.core(torch.cat([torch.relu(self.a(obs)), torch.relu(self.b(other))], -1))
        return self.move(h), self.attack(h)


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, image):
        x = torch.relu(self.bn(self.stem(image)))
        x = x + torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


class TiedLM(nn.Module):
    def __init__(self, vocab=6, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.mix(self.emb(tok))))


class Attention(nn.Module):
    """Separate q/k/v projections, grouped key/value heads repeated by expand + reshape."""

    def __init__(self, d=16, heads=4, kv=2, hd=4):
        super().__init__()
        self.hd = hd
        self.emb = nn.Linear(5, d)
        self.q, self.k, self.v = nn.Linear(d, heads * hd), nn.Linear(d, kv * hd), nn.Linear(d, kv * hd)
        self.o = nn.Linear(heads * hd, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, t, _ = x.shape
        e = self.emb(x)
        q = self.q(e).view(b, t, -1, self.hd).transpose(1, 2)
        k = self.k(e).view(b, t, -1, self.hd).transpose(1, 2)
        v = self.v(e).view(b, t, -1, self.hd).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(b, k.shape[1], rep, t, self.hd).reshape(b, -1, t, self.hd)
        v = v[:, :, None].expand(b, v.shape[1], rep, t, self.hd).reshape(b, -1, t, self.hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        return self.head(torch.relu(e + self.o(a)))


def traced_mlp(seed=0):
    torch.manual_seed(seed)
    m = MLP().eval()
    return m, fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})


def plan_of(gm):
    return gm.meta["fxsurgery"]["plan"]


def check(gm, preserved=True):
    p = plan_of(gm)
    assert p.preserves_function == preserved, [str(i) for i in p.issues]
    v = fs.verify(p)
    if preserved:
        assert v.max <= TOL, str(v)
    return p, v


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# each pass ----------------------------------------------------------------------------------

@pytest.mark.parametrize("at, expected", [(None, OBS + ["armor", "speed"]), (1, ["hp", "armor", "speed", "mana", "x", "y"]),
                                          ("x", ["hp", "mana", "x", "armor", "speed", "y"])])
def test_add_features_puts_the_new_columns_where_asked_and_zero(at, expected):
    m, tr = traced_mlp()
    before = snapshot(m)
    gm = fs.passes.add_features(tr, "obs", ["armor", "speed"], at=at)
    check(gm)
    assert gm.meta["fxsurgery"]["features"]["obs"].names == tuple(expected)
    w = gm.state_dict()["fc1.weight"]
    assert w.shape == (8, 6)
    new_cols = [expected.index("armor"), expected.index("speed")]
    assert torch.count_nonzero(w[:, new_cols]) == 0
    old_cols = [expected.index(n) for n in OBS]
    assert torch.equal(w[:, old_cols], m.fc1.weight)            # copied bit for bit, in their new places
    assert unchanged(m, before)


def test_remove_features_computes_the_old_function_with_the_feature_held_at_zero():
    m, tr = traced_mlp()
    gm = fs.passes.remove_features(tr, "obs", ["mana"])
    p, _ = check(gm, preserved=False)
    assert [i.kind for i in p.issues] == ["removed input"]
    x = torch.randn(5, 3)
    x_old = torch.stack([x[:, 0], torch.zeros(5), x[:, 1], x[:, 2]], 1)
    torch.testing.assert_close(gm(x), m(x_old), rtol=TOL, atol=TOL)


def test_reorder_features_moves_columns():
    m, tr = traced_mlp()
    order = ["y", "hp", "x", "mana"]
    gm = fs.passes.reorder_features(tr, "obs", order)
    check(gm)
    assert torch.equal(gm.state_dict()["fc1.weight"], m.fc1.weight[:, [OBS.index(n) for n in order]])


def test_widen_a_hidden_linear_appends_units_with_zero_outgoing_weights():
    m, tr = traced_mlp()
    gm = fs.passes.widen(tr, "fc1", 12)
    check(gm)
    sd = gm.state_dict()
    assert sd["fc1.weight"].shape == (12, 4) and sd["fc2.weight"].shape == (8, 12)
    assert torch.equal(sd["fc1.weight"][:8], m.fc1.weight)
    assert torch.count_nonzero(sd["fc2.weight"][:, 8:]) == 0
    assert torch.equal(sd["fc2.weight"][:, :8], m.fc2.weight)


def test_prune_units_keeps_exactly_the_surviving_units():
    m, tr = traced_mlp()
    keep = [6, 1, 3]
    gm = fs.passes.prune_units(tr, "fc2", keep)
    sd = gm.state_dict()
    assert torch.equal(sd["fc2.weight"], m.fc2.weight[keep])
    assert torch.equal(sd["fc2.bias"], m.fc2.bias[keep])
    assert torch.equal(sd["fc3.weight"], m.fc3.weight[:, keep])
    p = plan_of(gm)
    assert {i.kind for i in p.issues} == {"pruned units"}
    # The function is the old one with the pruned units silenced.
    with torch.no_grad():
        ref = MLP().eval()
        ref.load_state_dict(m.state_dict())
        mask = torch.zeros(8)
        mask[keep] = 1
        ref.fc2.weight.mul_(mask[:, None])
        ref.fc2.bias.mul_(mask)
    x = torch.randn(4, 4)
    torch.testing.assert_close(gm(x), ref(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_widen_a_recurrent_core_keeps_gate_blocks(rnn):
    torch.manual_seed(1)
    m = Core(rnn).eval()
    tr = fs.trace(m, {"obs": torch.randn(2, 3, 4), "other": torch.randn(2, 3, 3)},
                  {"obs": fs.Features(OBS), "other": fs.Features(["p", "q", "r"])})
    gm = fs.passes.widen(tr, "core", by=3)
    check(gm)
    gates = 4 if rnn == "lstm" else 3
    w = gm.state_dict()["core.weight_hh_l0"]
    assert w.shape == (gates * 13, 13)
    for g in range(gates):   # each gate block: old rows copied in place, the new units' columns zero
        assert torch.equal(w[g * 13:g * 13 + 10, :10], m.core.weight_hh_l0[g * 10:(g + 1) * 10])
        assert torch.count_nonzero(w[g * 13:(g + 1) * 13, 10:]) == 0


def test_add_input_channels_to_a_residual_cnn_with_batch_norm():
    torch.manual_seed(2)
    m = ResCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    m.eval()
    tr = fs.trace(m, {"image": torch.randn(2, 3, 8, 8)}, {"image": fs.Features(["r", "g", "b"], dim=1)})
    gm = fs.passes.add_features(tr, "image", ["depth"])
    check(gm)
    sd = gm.state_dict()
    assert sd["stem.weight"].shape == (8, 4, 3, 3) and torch.count_nonzero(sd["stem.weight"][:, 3]) == 0
    assert torch.equal(sd["bn.running_mean"], m.bn.running_mean)


def test_widen_a_residual_stream_widens_every_coupled_layer():
    torch.manual_seed(3)
    m = ResCNN().eval()
    tr = fs.trace(m, {"image": torch.randn(2, 3, 8, 8)}, {"image": fs.Features(["r", "g", "b"], dim=1)})
    gm = fs.passes.widen(tr, "conv", by=2)      # conv's output is added to stem's: both widen
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    assert shapes["stem.weight"] == (10, 3, 3, 3) and shapes["conv.weight"] == (10, 10, 3, 3)
    assert shapes["bn.running_var"] == (10,) and shapes["head.weight"] == (4, 10)
    check(gm)


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_add_categories_grows_the_embedding_and_its_tied_output(how):
    torch.manual_seed(4)
    m = TiedLM().eval()
    vocab = [f"t{i}" for i in range(6)]
    tr = fs.trace(m, {"tok": torch.tensor([[0, 3, 5]])}, {"tok": fs.Categories(vocab)})
    gm = fs.passes.add_categories(tr, "tok", ["new0", "new1"], new_categories=how)
    p, v = check(gm)
    assert gm.emb.weight is gm.out.weight                      # still tied
    assert gm.emb.weight.shape == (8, 8)
    assert torch.equal(gm.emb.weight[:6], m.emb.weight)
    if how == "zero":
        assert torch.count_nonzero(gm.emb.weight[6:]) == 0
    else:
        torch.testing.assert_close(gm.emb.weight[6:], m.emb.weight.mean(0, keepdim=True).expand(2, -1))


@pytest.mark.parametrize("heads, kv, n", [(4, 4, 2), (4, 2, 2), (6, 2, 3)])
def test_add_heads_appends_whole_heads_and_key_value_groups(heads, kv, n):
    torch.manual_seed(5)
    m = Attention(heads=heads, kv=kv).eval()
    tr = fs.trace(m, {"x": torch.randn(2, 6, 5)}, {"x": fs.Features(list("abcde"))})
    gm = fs.passes.add_heads(tr, "", n)
    check(gm)
    sd = gm.state_dict()
    new_kv = kv + n // (heads // kv)
    assert sd["q.weight"].shape == ((heads + n) * 4, 16) and sd["k.weight"].shape == (new_kv * 4, 16)
    assert torch.count_nonzero(sd["o.weight"][:, heads * 4:]) == 0


def test_add_heads_with_grouped_keys_refuses_a_partial_group_and_a_single_shared_head():
    m = Attention(heads=4, kv=2).eval()
    tr = fs.trace(m, {"x": torch.randn(2, 6, 5)}, {"x": fs.Features(list("abcde"))})
    with pytest.raises(PassError, match="4 query heads sharing 2 key/value heads .*multiple of 2"):
        fs.passes.add_heads(tr, "", 1)
    m = Attention(heads=4, kv=1).eval()
    tr = fs.trace(m, {"x": torch.randn(2, 6, 5)}, {"x": fs.Features(list("abcde"))})
    with pytest.raises(PassError, match="multi-query attention.*not supported"):
        fs.passes.add_heads(tr, "", 4)


@pytest.mark.parametrize("after", ["fc1", "fc2"])
def test_insert_identity_layer_preserves_the_function(after):
    m, tr = traced_mlp()
    gm = fs.passes.insert_identity_layer(tr, after)
    check(gm)
    layer = getattr(gm, f"{after}_identity")
    assert torch.equal(layer.weight, torch.eye(8)) and torch.count_nonzero(layer.bias) == 0
    assert any(n.op == "get_attr" and n.target == f"{after}_identity.weight" for n in gm.graph.nodes)


def test_insert_identity_layer_after_a_convolution_is_a_1x1_convolution():
    torch.manual_seed(6)
    m = ResCNN().eval()
    tr = fs.trace(m, {"image": torch.randn(2, 3, 8, 8)}, {"image": fs.Features(["r", "g", "b"], dim=1)})
    gm = fs.passes.insert_identity_layer(tr, "conv", name="extra")
    check(gm)
    assert gm.extra.weight.shape == (8, 8, 1, 1)


# the result is an ordinary module ------------------------------------------------------------

def test_the_result_trains_saves_loads_and_is_changed_again():
    m, tr = traced_mlp()
    gm = fs.passes.add_features(tr, "obs", ["armor"])
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    x = torch.randn(2, 5)
    losses = []
    for _ in range(3):
        loss = gm(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    twin = fs.passes.add_features(tr, "obs", ["armor"])
    twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), strict=True)
    torch.testing.assert_close(twin(x), gm(x))
    again = fs.passes.widen(gm, "fc2", by=2)        # the pass output goes straight into another pass
    check(again)
    assert again.state_dict()["fc2.weight"].shape == (10, 8)
    assert gm.state_dict()["fc2.weight"].shape == (8, 8)       # the input module untouched


def test_widen_twice_is_the_sum_and_add_then_remove_is_the_original():
    m, tr = traced_mlp()
    once = fs.passes.widen(fs.passes.widen(tr, "fc1", by=2), "fc1", by=3)
    check(once)
    assert once.state_dict()["fc1.weight"].shape == (13, 4)
    assert torch.equal(once.state_dict()["fc1.weight"][:8], m.fc1.weight)
    back = fs.passes.remove_features(fs.passes.add_features(tr, "obs", ["armor"], at=2), "obs", ["armor"])
    p = check(back)[0]
    assert not p.issues and back.meta["fxsurgery"]["features"]["obs"].names == tuple(OBS)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 4)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_a_module_with_inputs_and_features_is_accepted():
    torch.manual_seed(0)
    m = MLP().eval()
    gm = fs.passes.add_features(m, "obs", ["armor"], inputs={"obs": torch.randn(2, 4)},
                                features={"obs": fs.Features(OBS)})
    check(gm)


# bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda tr: fs.passes.add_features(tr, "obsx", ["a"]), r"no input 'obsx'; its inputs are \['obs'\]"),
    (lambda tr: fs.passes.add_features(tr, "obs", ["hp"]), r"\['hp'\] already exist"),
    (lambda tr: fs.passes.add_features(tr, "obs", ["a"], at="nope"), r"no feature 'nope'.*\['hp', 'mana', 'x', 'y'\]"),
    (lambda tr: fs.passes.remove_features(tr, "obs", ["armor"]), r"no features \['armor'\]; the features are"),
    (lambda tr: fs.passes.reorder_features(tr, "obs", ["hp", "x"]), r"must name every feature once"),
    (lambda tr: fs.passes.widen(tr, "fc9", 10), r"no hidden axis 'fc9'; the model's hidden axes are \['fc1', 'fc2', 'fc3'\]"),
    (lambda tr: fs.passes.widen(tr, "fc1", 4), r"fc1 has 8 units; use prune_units"),
    (lambda tr: fs.passes.prune_units(tr, "fc1", [0, 0]), r"distinct positions in 0..7"),
    (lambda tr: fs.passes.prune_units(tr, "fc1", [9]), r"distinct positions in 0..7"),
    (lambda tr: fs.passes.insert_identity_layer(tr, "fc7"), r"no module 'fc7'.*\['fc1', 'fc2', 'fc3'\]"),
    (lambda tr: fs.passes.add_categories(tr, "obs", ["a"]), r"input 'obs' is not described by fs.Categories"),
    (lambda tr: fs.passes.add_heads(tr, "fc1", 1), r"no scaled_dot_product_attention in module 'fc1'"),
])
def test_bad_requests_name_what_exists_and_leave_the_model_untouched(call, match):
    m, tr = traced_mlp()
    before = snapshot(m)
    with pytest.raises(PassError, match=match):
        call(tr)
    assert unchanged(m, before)


class FromInput(nn.Module):
    """fc's units are added to the raw input: widening them would widen the input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, obs):
        return self.out(obs + self.fc(obs))


def test_widening_an_axis_that_is_also_a_fixed_size_input_is_refused():
    m = FromInput().eval()
    before = snapshot(m)
    tr = fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    with pytest.raises(SizingError, match=r"node %add.*the units of fc share their positions with the features "
                                          r"of input 'obs'.*fixed-size input"):
        fs.passes.widen(tr, "fc", by=2)
    assert unchanged(m, before)


class Paired(nn.Module):
    """fc's 8 units are read as 2 groups of 4 and summed: 2 more units fit neither shape."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(4, 2)

    def forward(self, obs):
        return self.out(self.fc(obs).view(-1, 2, 4).sum(1))


class Sliced(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear((hi or 8) - lo, 2)

    def forward(self, obs):
        return self.out(torch.relu(self.fc(obs)[:, self.lo:self.hi]))


def test_a_change_the_graph_cannot_express_is_a_clear_error():
    m = Paired().eval()
    before = snapshot(m)
    tr = fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    with pytest.raises(SizingError, match=r"node %sum_1: takes the units of fc in blocks of 2 .*add or remove "
                                          r"whole blocks"):
        fs.passes.widen(tr, "fc", by=2)
    assert unchanged(m, before)


@pytest.mark.parametrize("lo, hi, width", [(2, 5, 3), (4, None, 6)])
def test_slices_of_a_widened_axis_keep_their_positions(lo, hi, width):
    """A slice in the middle keeps the same units; an open-ended one takes the new units too."""
    torch.manual_seed(7)
    m = Sliced(lo, hi).eval()
    tr = fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    gm = fs.passes.widen(tr, "fc", by=2)
    check(gm)
    assert gm.state_dict()["out.weight"].shape == (2, width)


# the OpenAI-Five-like policy ----------------------------------------------------------------

def test_every_pass_on_the_five_policy():
    """Features added, removed and reordered in entity groups, a category added, the LSTM core
    widened, and an identity layer inserted before it, each on the flagship policy."""
    from fxsurgery import zoo
    torch.manual_seed(8)
    m, inputs, feats = zoo.five_small("cpu")
    m.eval()
    before = snapshot(m)
    tr = fs.trace(m, inputs, feats)
    allies = list(feats["allies"].names)
    cases = [
        (fs.passes.add_features(tr, "allies", ["allies.armor", "allies.speed"], at=2), True),
        (fs.passes.remove_features(tr, "enemies", [feats["enemies"].names[1]]), False),
        (fs.passes.reorder_features(tr, "allies", allies[::-1]), True),
        (fs.passes.add_categories(tr, "enemy_type", ["shrine"]), True),
        (fs.passes.widen(tr, "core", by=8), True),
        (fs.passes.insert_identity_layer(tr, "project"), True),
    ]
    for gm, preserved in cases:
        check(gm, preserved)
    widened = cases[4][0].state_dict()
    assert widened["core.weight_hh_l0"].shape == (4 * 40, 40)
    assert unchanged(m, before)


def test_the_result_carries_node_metadata_of_its_own_shapes():
    """Other torch passes read node.meta["val"]: it must describe the new module."""
    m, tr = traced_mlp()
    gm = fs.passes.widen(tr, "fc1", 12)
    linear = next(n for n in gm.graph.nodes if n.name == "linear")
    assert tuple(linear.meta["val"].shape) == (2, 12)
    assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)


class SoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, obs):
        return torch.softmax(self.fc(obs), -1)


def test_pruning_units_under_a_softmax_is_reported():
    """A softmax over units some of which are pruned normalises over fewer terms: the plan must
    say so (found by the property over random architectures)."""
    torch.manual_seed(9)
    m = SoftmaxHead().eval()
    tr = fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    p = plan_of(fs.passes.prune_units(tr, "fc", [0, 2]))
    assert not p.preserves_function
    softmax = [i for i in p.issues if i.kind == "softmax"]
    assert softmax and "kept positions together with removed ones (fc[1, 3, 4])" in softmax[0].message, p.issues
    # A reordering removes nothing, but fc's units are the output's columns: they move.
    p = plan_of(fs.passes.prune_units(tr, "fc", [0, 1, 2, 3, 4][::-1]))
    assert [i.kind for i in p.issues] == ["moved output"] and "0 -> 4" in p.issues[0].message, p.issues
    assert not p.preserves_function and fs.verify(p).max <= TOL   # (verify compares by label)


def test_a_raw_input_sharing_the_stream_with_units_is_refused():
    """x0 is zero-padded straight into the stream that c0's embedding units share: reordering
    x0's features would permute those units' positions for what follows (a layer across
    tokens), so the output's channels would move. Found by the property; refused."""
    from fxsurgery.testing import ArchSpec, InputSpec, LayerSpec, build
    spec = ArchSpec(inputs=(InputSpec("x0", n=3, raw=True), InputSpec("c0", kind="categories", n=2)), width=3,
                    layers=(LayerSpec("mix_tokens"),), outputs=("stream",))
    m, inputs, feats = build(spec, seed=0)
    tr = fs.trace(m, inputs, feats)
    names = list(feats["x0"].names)
    with pytest.raises(SizingError, match=r"node %cat: the features of input 'x0' share their positions with the "
                                          r"units of encoders.1.embedding:1 \(the input runs straight into"):
        fs.passes.reorder_features(tr, "x0", names[::-1])


class MeanOverUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, obs):
        return torch.tanh(self.fc(obs)).mean(-1, keepdim=True)


def test_widening_or_pruning_units_under_a_reduction_is_reported():
    """A mean over a unit axis takes the new units' outputs (or loses the pruned ones) with no
    weight in between to zero: not preserved, and the plan says where (found by the property)."""
    torch.manual_seed(10)
    m = MeanOverUnits().eval()
    tr = fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)})
    for gm in (fs.passes.widen(tr, "fc", by=2), fs.passes.prune_units(tr, "fc", [0, 1, 2])):
        p = plan_of(gm)
        assert not p.preserves_function
        red = [i for i in p.issues if i.kind == "reduction"]
        assert red and red[0].where.startswith("mean at %mean"), p.issues


def test_the_result_runs_on_any_batch_size():
    """torch.export bakes the example batch size into the graph; the rewritten module has it
    follow its inputs (read off a second capture of the old model with one more row)."""
    from fxsurgery import zoo
    torch.manual_seed(11)
    m, inputs, feats = zoo.five_small("cpu")
    m.eval()
    gm = fs.passes.widen(fs.trace(m, inputs, feats), "core", by=4)
    assert gm.meta["fxsurgery"]["batch"].startswith("free")
    x_new = [torch.randn(5, *x.shape[1:]) if x.is_floating_point() else x[:1].expand(5, *x.shape[1:]).clone()
             for x in gm.meta["fxsurgery"]["inputs"].values()]
    for a, b in zip(gm(*x_new), m(*x_new)):          # widening keeps the inputs' shapes
        assert a.shape[0] == 5
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


class BatchBranch(nn.Module):
    """A forward that branches on the batch size: another batch size, another graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, obs):
        return self.fc(obs) * (2.0 if obs.shape[0] == 2 else 1.0)


def test_a_graph_that_changes_with_the_batch_size_keeps_it_fixed_and_says_so():
    m = BatchBranch().eval()
    gm = fs.passes.widen(fs.trace(m, {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}), "fc", by=1)
    assert gm.meta["fxsurgery"]["batch"].startswith("fixed at 2"), gm.meta["fxsurgery"]["batch"]
    check(gm)    # (a new output position: the old ones are compared)


def test_coupled_units_along_a_flattened_tokens_by_channels_axis_widen_together():
    """Two index inputs embedded, concatenated along the tokens and flattened: each input's rows
    carry its own embedding's units, and only read together (as one component) do they show
    the [tokens x channels] structure of the flattened axis. Once refused; now widened and
    pruned with the function preserved on the old positions."""
    from fxsurgery.testing import ArchSpec, InputSpec, build
    spec = ArchSpec(inputs=(InputSpec("c0", kind="categories", length=3), InputSpec("c1", kind="categories", n=7)),
                    width=3, outputs=("stream", "flat"))
    m, inputs, feats = build(spec, seed=0)
    tr = fs.trace(m, inputs, feats)
    gm = fs.passes.widen(tr, "encoders.0.embedding", by=2)
    p, v = check(gm, preserved=False)   # the flattened output's later tokens shift: reported
    assert [(i.kind, i.where) for i in p.issues if i.blocking] == [("moved output", "output 1")], p.issues
    assert v.max <= TOL                                                     # compared by label
    assert gm.state_dict()["encoders.1.embedding.weight"].shape[1] == 5      # dragged along
    p = plan_of(fs.passes.prune_units(tr, "encoders.0.embedding", [0, 2]))
    assert [i.kind for i in p.issues] == ["output", "moved output"] * 2 and "loses" in p.issues[0].message
    assert fs.verify(p).max <= TOL                                          # the kept positions


def test_a_raw_input_through_a_layer_across_tokens_is_reordered_by_name():
    """x0 runs straight into the stream and through a layer across tokens to the output: the
    output channels keep no keys of their own, but each depends on its feature, which is how
    the plan matches them after a reordering."""
    from fxsurgery.testing import ArchSpec, InputSpec, LayerSpec, build
    spec = ArchSpec(inputs=(InputSpec("x0", n=3, raw=True),), width=3, layers=(LayerSpec("mix_tokens"),),
                    outputs=("stream",))
    m, inputs, feats = build(spec, seed=0)
    names = list(feats["x0"].names)
    gm = fs.passes.reorder_features(fs.trace(m, inputs, feats), "x0", [names[1], names[0], names[2]])
    p, v = check(gm, preserved=False)   # ... and the output's channels are swapped: reported
    assert [i.kind for i in p.issues] == ["moved output"] and "1 -> 0" in p.issues[0].message, p.issues
    assert v.max <= TOL and v.outputs[0].by == "label"


def test_a_raw_input_padded_into_a_stream_other_units_share_is_refused():
    """x0 (3 features) is zero-padded into a 4-channel stream whose other row holds c0's
    embedding units: its features and those units share channel positions across rows, and
    reordering x0 alone would pair them differently in a layer across tokens. Refused (found
    by the property after the coupled case above was fixed)."""
    from fxsurgery.testing import ArchSpec, InputSpec, LayerSpec, build
    spec = ArchSpec(inputs=(InputSpec("x0", n=3, raw=True), InputSpec("c0", kind="categories", n=2)), width=4,
                    layers=(LayerSpec("mix_tokens"),), outputs=("stream",))
    m, inputs, feats = build(spec, seed=0)
    names = list(feats["x0"].names)
    with pytest.raises(SizingError, match=r"features of input 'x0' share their positions with the units"):
        fs.passes.reorder_features(fs.trace(m, inputs, feats), "x0", names[::-1])
