"""Widening coupled axes: a GRU core, a residual convolution stream, more attention heads.
Each checks function preservation (relative deviation <= 1e-5) and that every old element
survives bit-identically somewhere in the new state."""
import torch
import torch.nn as nn

import fxsurgery as fs

TOL = 1e-5


def transplant(old, new, inputs, features):
    new_model, plan = fs.transplant(old, new, inputs, inputs, features, features)
    assert plan.preserves_function, plan.table()
    deviation = fs.verify(plan)
    assert float(deviation) <= TOL, str(deviation)
    return new_model, plan


class GRUPolicy(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.enc, self.core, self.head = nn.Linear(3, 4), nn.GRU(4, hidden, batch_first=True), nn.Linear(hidden, 2)

    def forward(self, obs):
        out, _ = self.core(torch.tanh(self.enc(obs)))
        return self.head(out[:, -1])


def test_widening_a_gru_core_preserves_the_function_gate_by_gate():
    torch.manual_seed(0)
    old, new = GRUPolicy(5).eval(), GRUPolicy(7).eval()
    feats = {"obs": fs.Features(["a", "b", "c"])}
    new_model, _ = transplant(old, new, {"obs": torch.randn(2, 4, 3)}, feats)
    H, H2 = 5, 7
    for g in range(3):  # gate blocks r, z, n: old rows g*H+j land at g*H2+j
        assert torch.equal(new_model.core.weight_ih_l0[g * H2: g * H2 + H], old.core.weight_ih_l0[g * H: (g + 1) * H])
        assert torch.equal(new_model.core.weight_hh_l0[g * H2: g * H2 + H, :H], old.core.weight_hh_l0[g * H: (g + 1) * H])
    assert torch.equal(new_model.head.weight[:, H:], torch.zeros(2, H2 - H))  # new units' outgoing weights


class ResNet(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, img):
        x = torch.relu(self.stem(img))
        x = x + self.conv2(torch.relu(self.bn(self.conv1(x))))  # the residual couples the widths
        return self.head(x.mean(dim=(2, 3)))


def test_widening_a_residual_convolution_stream_widens_the_coupled_layers_together():
    torch.manual_seed(0)
    old, new = ResNet(4).eval(), ResNet(6).eval()
    with torch.no_grad():  # trained-looking statistics, so that they must be carried over
        old.bn.running_mean.uniform_(-1, 1)
        old.bn.running_var.uniform_(0.5, 2)
    feats = {"img": fs.Features(["r", "g", "b"], dim=1)}
    new_model, _ = transplant(old, new, {"img": torch.randn(2, 3, 6, 6)}, feats)
    assert torch.equal(new_model.conv2.weight[:4, :4], old.conv2.weight)
    assert torch.equal(new_model.bn.running_var[:4], old.bn.running_var)
    assert torch.equal(new_model.conv1.weight[:, 4:], torch.zeros(6, 2, 3, 3))


class Attn(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.inp = nn.Linear(3, 2 * heads)
        self.attn = nn.MultiheadAttention(2 * heads, heads, batch_first=True)
        self.out = nn.Linear(2 * heads, 2)

    def forward(self, seq):
        h = self.inp(seq)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(h + a)


def test_adding_attention_heads_of_the_same_size_preserves_the_function():
    torch.manual_seed(0)
    old, new = Attn(2).eval(), Attn(3).eval()
    feats = {"seq": fs.Features(["a", "b", "c"])}
    new_model, _ = transplant(old, new, {"seq": torch.randn(2, 5, 3)}, feats)
    E, E2 = 4, 6
    for part in range(3):  # q, k, v blocks: old rows land at the start of each new block
        assert torch.equal(new_model.attn.in_proj_weight[part * E2: part * E2 + E, :E],
                           old.attn.in_proj_weight[part * E: (part + 1) * E])
