"""Dense single-process float64 GPT-2 forward, written from the model's math alone.

The reference the split model is compared against: plain NumPy, no autograd, no
splitting. Parameters come as a dict of full (unsplit, unpadded) float64 arrays under
the Hugging Face GPT-2 names without the "transformer." prefix, with the fused QKV
weight as GPT-2 stores it: c_attn.weight (h, 3h) with columns [Q | K | V] and head j of
each in columns [j*hs, (j+1)*hs); c_attn.bias (3h,).
"""

from __future__ import annotations

import numpy as np


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis, biased variance."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(u: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    return 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    s = z - z.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def split_heads(a: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, h) -> (B, n_head, T, hs): head j takes columns [j*hs, (j+1)*hs)."""
    B, T, h = a.shape
    return a.reshape(B, T, n_head, h // n_head).transpose(0, 2, 1, 3)


def qkv(x: np.ndarray, w_attn: np.ndarray, b_attn: np.ndarray, n_head: int) -> tuple[np.ndarray, ...]:
    """q, k, v (B, n_head, T, hs) of x (B, T, h) under the fused weight (h, 3h) = [Q | K | V]."""
    h = x.shape[-1]
    fused = x @ w_attn + b_attn  # (B, T, 3h)
    return tuple(split_heads(fused[..., i * h:(i + 1) * h], n_head) for i in range(3))


def causal_attention(
    x: np.ndarray, w_attn: np.ndarray, b_attn: np.ndarray, w_proj: np.ndarray, b_proj: np.ndarray,
    n_head: int,
) -> np.ndarray:
    """Multi-head causal self-attention of x (B, T, h) with output projection -> (B, T, h)."""
    B, T, h = x.shape
    q, k, v = qkv(x, w_attn, b_attn, n_head)
    hs = h // n_head
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)  # (B, nh, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # key j > query i
    scores = np.where(future, -np.inf, scores)
    y = softmax(scores) @ v  # (B, nh, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, h)
    return y @ w_proj + b_proj


def mlp(x: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray, w_proj: np.ndarray, b_proj: np.ndarray) -> np.ndarray:
    return gelu(x @ w_fc + b_fc) @ w_proj + b_proj


def hidden_states(params: dict[str, np.ndarray], idx: np.ndarray, n_layer: int, n_head: int,
                  eps: float = 1e-5) -> np.ndarray:
    """idx (B, T) -> ln_f output (B, T, h)."""
    T = idx.shape[1]
    x = params["wte.weight"][idx] + params["wpe.weight"][:T]
    for i in range(n_layer):
        p = f"h.{i}."
        a = layer_norm(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], eps)
        x = x + causal_attention(
            a, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"],
            params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"], n_head,
        )
        m = layer_norm(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"], eps)
        x = x + mlp(
            m, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"],
            params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"],
        )
    return layer_norm(x, params["ln_f.weight"], params["ln_f.bias"], eps)


def logits(params: dict[str, np.ndarray], idx: np.ndarray, n_layer: int, n_head: int,
           eps: float = 1e-5) -> np.ndarray:
    """idx (B, T) -> logits (B, T, V) through the tied head x @ wte^T."""
    return hidden_states(params, idx, n_layer, n_head, eps) @ params["wte.weight"].T


def cross_entropy(z: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> float:
    """Mean over rows whose target is not ignore_index of -log softmax(z)[target]; 0 if none count."""
    z = z.reshape(-1, z.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    if not valid.any():
        return 0.0
    lp = log_softmax(z[valid])
    return float(-lp[np.arange(lp.shape[0]), t[valid]].mean())


def cross_entropy_grad(z: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """d cross_entropy / d z: (softmax - onehot) / count on counted rows, 0 on ignored rows."""
    shape = z.shape
    z = z.reshape(-1, shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    g = np.zeros_like(z)
    count = int(valid.sum())
    if count:
        p = softmax(z[valid])
        p[np.arange(count), t[valid]] -= 1.0
        g[valid] = p / count
    return g.reshape(shape)


def loss(params: dict[str, np.ndarray], idx: np.ndarray, targets: np.ndarray, n_layer: int, n_head: int,
         ignore_index: int = -100, eps: float = 1e-5) -> float:
    return cross_entropy(logits(params, idx, n_layer, n_head, eps), targets, ignore_index)
