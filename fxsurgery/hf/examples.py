"""Example inputs for capturing a transformers model, and the names of what they hold.

The planner matches embedding rows by category name and input channels by feature name, so
the names are what make a vocabulary change exact: with a tokenizer they are its tokens (old
ids keep their rows wherever the new ones go); without one, row i is "<id i>", and new rows
come after the old ones. Rows a config holds beyond the tokenizer's length (a vocabulary
padded to a multiple of 64) are "<unused i>".
"""
from __future__ import annotations

import torch

from ..labels import Categories, Features
from ..surgery.errors import SurgeryError

__all__ = ["token_names", "example", "BATCH", "LENGTH"]

BATCH, LENGTH = 2, 8


def token_names(vocab_size: int, tokenizer=None) -> list[str]:
    """The name of each embedding row."""
    if tokenizer is None:
        return [f"<id {i}>" for i in range(vocab_size)]
    known = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    names = [str(t) for t in known] + [f"<unused {i}>" for i in range(len(known), vocab_size)]
    if len(set(names)) != len(names):
        seen = {}
        for i, n in enumerate(names):
            if n in seen:
                raise SurgeryError(f"resize: the tokenizer names rows {seen[n]} and {i} both {n!r}; rows are "
                                   "matched by token, so each must be named once")
            seen[n] = i
    return names


def _length(config) -> int:
    most = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return max(2, min(LENGTH, most)) if most else LENGTH


def example(model, names: list[str] | None, channels: list[str] | None = None,
            high: int | None = None) -> tuple[dict, dict]:
    """(inputs, features) for `fs.trace`: token ids (with an attention mask whose last sequence
    is padded at the end, so that masks are exercised) for a text model, images for a vision
    model (`main_input_name` says which). Token ids are drawn below `high` (the old model's
    vocabulary, so that one example serves both models)."""
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "input_ids":
        if names is None:
            raise SurgeryError(f"resize: {type(model).__name__} reads input_ids but its config has no vocab_size")
        n = _length(config)
        ids = torch.randint(0, high or len(names), (BATCH, n), generator=g)
        mask = torch.ones(BATCH, n, dtype=torch.int64)
        mask[-1, -2:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        return inputs, {"input_ids": Categories(names)}
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        n = getattr(config, "num_channels", 3)
        x = torch.randn(BATCH, n, size, size, generator=g, dtype=model.dtype)
        return {"pixel_values": x}, {"pixel_values": Features(channels or [f"channel {i}" for i in range(n)], dim=1)}
    raise SurgeryError(f"resize: {type(model).__name__} reads {main!r}; pass inputs= and features= (example inputs "
                       "for fs.trace, by forward's parameter names) for it")
