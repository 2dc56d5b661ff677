"""Small helpers shared by the tests: label names of a parameter, row by row."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsurgery as fs


def names(labels) -> set[str]:
    return {str(l) for l in labels}


def element(imap: fs.InteractionMap, param: str, index) -> set[str]:
    return names(imap.element_labels(param, tuple(index)))


def key(imap: fs.InteractionMap, param: str, index) -> tuple[set[str], set[str]]:
    meets, aligned = imap.key_of(param, tuple(index))
    return names(meets), names(aligned)


class Tied(nn.Module):
    """An embedding whose table is also the output projection (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.out = nn.Linear(3, 4, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.emb(tok)))


class TwoLayer(nn.Module):
    """obs -> fc1 -> relu -> fc2 (3 outputs): the smallest model with a hidden axis."""

    def __init__(self, n_in=4, h=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, h), nn.Linear(h, 3)

    def forward(self, obs):
        return self.fc2(torch.relu(self.fc1(obs)))


class ThreeLayer(nn.Module):
    """Three Linear layers with ReLU and tanh between them (fc1, fc2, fc3)."""

    def __init__(self, n_in=4, h=8):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(n_in, h), nn.Linear(h, h), nn.Linear(h, 3)

    def forward(self, obs):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(obs)))))


class SelfAttention(nn.Module):
    """q, k, v projections split into heads, fused attention, an output projection."""

    def __init__(self, d=8, heads=2, hd=4):
        super().__init__()
        self.hd = hd
        self.q, self.k, self.v = nn.Linear(d, heads * hd), nn.Linear(d, heads * hd), nn.Linear(d, heads * hd)
        self.o = nn.Linear(heads * hd, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


# recurrent and attention models shared by the rule tests and the golden cases ---------------
class Recurrent(nn.Module):
    def __init__(self, core, head_in):
        super().__init__()
        self.core = core
        self.head = nn.Linear(head_in, 2)

    def forward(self, x):
        out, _ = self.core(x)
        return self.head(out)


class WithState(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, x, h0):
        return self.core(x, h0)[0]


class Block(nn.Module):
    """A pre-norm transformer block on the residual stream."""

    def __init__(self, d=4, heads=2, need_weights=False):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d))
        self.need_weights = need_weights

    def forward(self, x):
        x = self.inp(x)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.ln2(x))


class Causal(nn.Module):
    """Causal self-attention over a sequence whose positions carry the labels."""

    def __init__(self, T, d=4, heads=2):
        super().__init__()
        self.proj = nn.Linear(3, 3 * d)
        self.scale = nn.Parameter(torch.randn(T, 1))
        self.heads = heads

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.proj(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)     # [B, heads, T, e]
        return out.transpose(1, 2).reshape(B, T, -1) * self.scale
