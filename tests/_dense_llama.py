"""A dense float64 Llama-family forward in plain NumPy, from Hugging Face tensors, for tests.

Written from the published definitions (transformers' modeling_llama, Meta's llama3 rope
scaling), not from mpisplit's code: one process, no split, every head computed with its own
repeated key/value head, the rotary angles per position and frequency written out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# Tiny folders of each family: vocabularies that tp = 2, 3, 4 do not divide; tp = 4 replicates
# Llama's 2 KV heads and Mistral's 1; Mistral's head_dim is not hidden / heads.
FAMILIES = {
    "llama": {
        "model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    },
    "qwen2": {  # the older config layout: top-level rope_theta and rope_scaling with "type"
        "model_type": "qwen2", "vocab_size": 67, "hidden_size": 64, "intermediate_size": 80,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "hidden_act": "silu",
        "use_sliding_window": False, "sliding_window": 16,
    },
    "mistral": {
        "model_type": "mistral", "vocab_size": 53, "hidden_size": 48, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "sliding_window": None, "hidden_act": "silu",
    },
}


def head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def biases(c: dict) -> tuple[bool, bool, bool]:
    """(q/k/v, o, mlp) biases of a config."""
    if c["model_type"] == "qwen2":
        return True, False, False
    return c.get("attention_bias", False), c.get("attention_bias", False), c.get("mlp_bias", False)


def arrays(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 tensors under transformers' names, norms and biases non-trivial."""
    rng = np.random.default_rng(seed)
    V, h, I, H, KV, d = (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                         c["num_key_value_heads"], head_dim(c))
    qkv_b, o_b, mlp_b = biases(c)

    def n(*shape: int, std: float = 0.15) -> np.ndarray:
        return rng.standard_normal(shape) * std

    w = {"model.embed_tokens.weight": n(V, h, std=1.0), "model.norm.weight": 1 + n(h, std=0.2)}
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        w[b + "input_layernorm.weight"] = 1 + n(h, std=0.2)
        w[b + "post_attention_layernorm.weight"] = 1 + n(h, std=0.2)
        for name, rows in (("q", H * d), ("k", KV * d), ("v", KV * d)):
            w[b + f"self_attn.{name}_proj.weight"] = n(rows, h)
            if qkv_b:
                w[b + f"self_attn.{name}_proj.bias"] = n(rows, std=0.1)
        w[b + "self_attn.o_proj.weight"] = n(h, H * d)
        if o_b:
            w[b + "self_attn.o_proj.bias"] = n(h, std=0.1)
        for name, shape in (("gate", (I, h)), ("up", (I, h)), ("down", (h, I))):
            w[b + f"mlp.{name}_proj.weight"] = n(*shape)
            if mlp_b:
                w[b + f"mlp.{name}_proj.bias"] = n(shape[0], std=0.1)
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = n(V, h, std=0.5)
    return w


def write_folder(folder: Path, c: dict, w: dict[str, np.ndarray], dtype: type = np.float64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(dtype) for k, v in w.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(c))


def inv_freq(c: dict) -> np.ndarray:
    d = head_dim(c)
    rope = dict(c.get("rope_parameters") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = []
    for i in range(d // 2):
        f = theta ** (-2.0 * i / d)
        if kind == "linear":
            f /= scaling["factor"]
        elif kind == "llama3":
            wavelen = 2 * math.pi / f
            old = scaling["original_max_position_embeddings"]
            low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
            if wavelen > old / low:
                f /= factor
            elif wavelen >= old / high:
                smooth = (old / wavelen - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        out.append(f)
    return np.array(out)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x (B, T, n, d) rotated: the pair (x_j, x_{j + d/2}) by the angle position * freqs[j]."""
    half = x.shape[-1] // 2
    ang = positions[:, None] * freqs[None, :]  # (T, d/2)
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def forward(c: dict, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) of ids (B, T) at positions 0..T-1."""
    H, KV, d, eps = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c), c["rms_norm_eps"]
    B, T = ids.shape
    pos, freqs = np.arange(T, dtype=np.float64), inv_freq(c)
    x = w["model.embed_tokens.weight"][ids]

    def lin(a: np.ndarray, key: str) -> np.ndarray:
        out = a @ w[key + ".weight"].T
        return out + w[key + ".bias"] if key + ".bias" in w else out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a = _rms(x, w[b + "input_layernorm.weight"], eps)
        q = _rope(lin(a, b + "self_attn.q_proj").reshape(B, T, H, d), pos, freqs)
        k = _rope(lin(a, b + "self_attn.k_proj").reshape(B, T, KV, d), pos, freqs)
        v = lin(a, b + "self_attn.v_proj").reshape(B, T, KV, d)
        k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)  # head j reads KV head j // (H/KV)
        s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + lin(np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * d), b + "self_attn.o_proj")
        m = _rms(x, w[b + "post_attention_layernorm.weight"], eps)
        g = lin(m, b + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(m, b + "mlp.up_proj"), b + "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
