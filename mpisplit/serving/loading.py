"""A model and its tokenizer from an mpisplit checkpoint or a Hugging Face GPT-2 folder."""

from __future__ import annotations

from typing import Any

from mpisplit.models import GPT, GPTConfig
from mpisplit.models.hf_tokenizer import load_hf_tokenizer
from mpisplit.runtime.errors import agree
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.data import CharTokenizer
from mpisplit.training.state import load_model, resolve_checkpoint


def load_model_and_tokenizer(grid: Any, *, ckpt: str | None = None, hf: str | None = None,
                             dtype: str = "float32") -> tuple[GPT, Any]:
    """(model, tokenizer or None) on every rank; each rank reads only its slabs. Collective.
    A checkpoint's tokenizer is its character vocabulary; a folder's is tokenizer.json or
    vocab.json + merges.txt (None without them: token ids only)."""
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of ckpt and hf")
    if ckpt is not None:
        with agree(grid.world):
            path = resolve_checkpoint(ckpt)
        reader = CheckpointReader(path, grid.world)
        with agree(grid.world):
            cfg = GPTConfig(**reader.meta["config"])
            cfg.validate(grid.tp)
            chars = reader.meta.get("tokenizer")
            tokenizer = CharTokenizer(chars) if chars else None
        model = GPT(cfg, grid, dtype=dtype, init=False)
        load_model(reader, model)
        reader.close()
        return model, tokenizer
    model = GPT.from_pretrained(hf, grid, dtype=dtype)
    with agree(grid.world):
        tokenizer = load_hf_tokenizer(hf, model.config.vocab_size)
    return model, tokenizer
