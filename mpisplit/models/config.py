"""GPTConfig: the shape and the parts of a decoder (what a checkpoint or a Hugging Face config.json holds).

One decoder, parts chosen by the config: GPT-2 is LayerNorm + GELU MLP + learned positions +
biases + tied head (the defaults); the Llama family (Llama, Qwen2, Mistral, SmolLM2) is RMSNorm +
SwiGLU MLP + rotary positions + grouped-query attention, biases and tying as its config says
(`GPTConfig.llama`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpisplit.nn.attention import valid_tp_degrees


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # real (unpadded) vocabulary size
    block_size: int = 1024  # longest sequence: rows of the position table
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (the TP degree must divide it)
    n_embd: int = 768  # hidden size (a multiple of n_head)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches while training
    layer_norm_eps: float = 1e-5  # epsilon of every norm (LayerNorm or RMSNorm)
    # ---- parts (the defaults are GPT-2's)
    family: str = "gpt2"  # Hugging Face layout: "gpt2", or "llama", "qwen2", "mistral"
    norm: str = "layernorm"  # "layernorm" (weight + bias) or "rmsnorm" (weight only)
    mlp: str = "gelu"  # "gelu": fc -> GELU -> proj; "swiglu": down(silu(gate) * up)
    positions: str = "learned"  # "learned" (a position table) or "rotary"
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # MLP width; None: 4 * n_embd
    qkv_bias: bool = True  # biases of the query/key/value projections
    out_bias: bool = True  # bias of the attention output projection
    mlp_bias: bool = True
    tie_embeddings: bool = True  # the head is the token table (False: its own lm_head)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None)  # {"rope_type": "linear"|"llama3", ...}

    @classmethod
    def llama(cls, **fields: Any) -> GPTConfig:
        """A Llama-family shape: RMSNorm, SwiGLU, rotary, no biases, untied unless told."""
        parts: dict[str, Any] = {
            "family": "llama", "norm": "rmsnorm", "mlp": "swiglu", "positions": "rotary", "qkv_bias": False,
            "out_bias": False, "mlp_bias": False, "tie_embeddings": False, "layer_norm_eps": 1e-6, "dropout": 0.0,
        }
        parts.update(fields)
        return cls(**parts)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def ffn_size(self) -> int:
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size

    def validate(self, tp: int = 1) -> None:
        """ValueError naming the values when the shape cannot be built at this TP degree."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _positive(self, name, getattr(self, name))
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            if getattr(self, name) is not None:
                _positive(self, name, getattr(self, name))
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("positions", ("learned", "rotary")), ("family", FAMILIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.n_head % tp:
            raise ValueError(
                f"n_head={self.n_head} cannot be split over tp={tp} ranks; "
                f"tp values that work: {valid_tp_degrees(self.n_head)}"
            )
        self._validate_kv(tp)
        if self.positions == "learned":
            self._validate_fused_attention()
        else:
            if self.head_size % 2:
                raise ValueError(f"rotary positions need an even head dimension, got head_dim={self.head_size}")
            from mpisplit.nn.rotary import check_rope_scaling

            check_rope_scaling(self.rope_scaling)
            if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
                raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _validate_kv(self, tp: int) -> None:
        kv = self.kv_heads
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={kv}")
        if kv % tp and tp % kv:
            ok = [d for d in valid_tp_degrees(self.n_head) if kv % d == 0 or d % kv == 0]
            raise ValueError(
                f"n_kv_head={kv} key/value heads can neither be split over tp={tp} ranks (kv % tp != 0) "
                f"nor replicated on them (tp % kv != 0); tp values that work: {ok}"
            )

    def _validate_fused_attention(self) -> None:
        # Learned positions use GPT-2's fused QKV attention: all heads alike, biases on.
        if self.kv_heads != self.n_head or self.head_size * self.n_head != self.n_embd:
            raise ValueError(
                "learned positions (GPT-2 attention) need n_kv_head == n_head and head_dim == n_embd / n_head; "
                f"got n_kv_head={self.kv_heads}, head_dim={self.head_size}; use positions='rotary'"
            )
        if not (self.qkv_bias and self.out_bias):
            raise ValueError("learned positions (GPT-2 attention) have biases: qkv_bias and out_bias must be True")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FAMILIES = ("gpt2", "llama", "qwen2", "mistral")


def _positive(cfg: GPTConfig, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
