"""Hugging Face transformers models in, transformers models out.

    new_model, plan = fs.hf.resize(model, num_hidden_layers=6, intermediate_size=1024)
    new_model, plan = fs.hf.resize(model, tokenizer=tok, add_tokens=["<tool>", "</tool>"])

transformers stays optional: it is imported when `resize` is called.
"""
from .config import SIZE_FIELDS
from .layers import NEW_LAYERS
from .resize import resize

__all__ = ["resize", "SIZE_FIELDS", "NEW_LAYERS"]
