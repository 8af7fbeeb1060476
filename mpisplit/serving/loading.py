"""A model, its tokenizer and its end-of-sequence ids from an mpisplit checkpoint or a Hugging
Face GPT-2 folder.

The eos ids: a folder's come from its config.json and generation_config.json
(`models.hf_eos.eos_token_ids`); a checkpoint's from its meta "eos_token_ids" (written by
`mpisplit convert --from-hf` from the folder's), else none: a character-level checkpoint has
no end-of-sequence token and generates to max_tokens.
"""

from __future__ import annotations

from typing import Any

from mpisplit.models import GPT, GPTConfig
from mpisplit.models.gpt import check_eos_ids
from mpisplit.models.hf_eos import eos_token_ids
from mpisplit.models.hf_tokenizer import load_hf_tokenizer
from mpisplit.runtime.errors import agree
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.data import CharTokenizer
from mpisplit.training.state import load_model, resolve_checkpoint


def load_model_and_tokenizer(grid: Any, *, ckpt: str | None = None, hf: str | None = None,
                             dtype: str = "float32") -> tuple[GPT, Any, tuple[int, ...]]:
    """(model, tokenizer or None, eos ids) on every rank; each rank reads only its slabs, and
    hashes the checkpoint files it reads before using them. Collective. A checkpoint's
    tokenizer is its character vocabulary; a folder's is tokenizer.json or vocab.json +
    merges.txt (None without them: token ids only)."""
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
            eos = tuple(int(i) for i in check_eos_ids(reader.meta.get("eos_token_ids", ()), cfg.vocab_size))
        model = GPT(cfg, grid, dtype=dtype, init=False)
        load_model(reader, model)
        reader.close()
        return model, tokenizer, eos
    model = GPT.from_pretrained(hf, grid, dtype=dtype)
    with agree(grid.world):
        tokenizer = load_hf_tokenizer(hf, model.config.vocab_size)
        eos = tuple(int(i) for i in check_eos_ids(eos_token_ids(hf), model.config.vocab_size))
    return model, tokenizer, eos
