"""Small helpers shared by the tests: label names of a parameter, row by row."""
import torch
import torch.nn as nn

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
