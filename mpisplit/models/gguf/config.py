"""A GGUF file's metadata as a Hugging Face config.json (Llama or Qwen2) and generation_config.json.

llama.cpp keys, under the architecture's prefix A ("llama", "qwen2"), to transformers' fields:

    A.block_count                      num_hidden_layers
    A.embedding_length                 hidden_size
    A.feed_forward_length              intermediate_size
    A.attention.head_count             num_attention_heads
    A.attention.head_count_kv          num_key_value_heads (default: head_count)
    A.attention.key_length             head_dim (default: hidden_size / head_count)
    A.attention.layer_norm_rms_epsilon rms_norm_eps
    A.rope.freq_base                   rope_theta (default 10000)
    A.rope.scaling.type / .factor      rope_scaling {"rope_type": "linear"|"yarn", "factor", ...}
    rope_freqs.weight tensor           rope_scaling {"rope_type": "llama3", ...} (below)
    A.context_length                   max_position_embeddings
    A.vocab_size                       vocab_size (default: the rows of token_embd.weight)
    no output.weight tensor            tie_word_embeddings
    tokenizer.ggml.{bos,eos,padding}_token_id   bos/eos/pad_token_id

Llama 3-style rope scaling is stored by llama.cpp as a `rope_freqs.weight` tensor of divisors d_i
of the inverse frequencies rather than as metadata. transformers' "llama3" rope_scaling (factor F,
low and high frequency factors l < h, original context n) divides inv_i by F where the wavelength
2 pi / inv_i > n / l, by 1 where it is < n / h, and in between by 1 / ((1 - s) / F + s) with
s = (n inv_i / (2 pi) - l) / (h - l). So F = max d_i, and on the in-between frequencies
s_i = (1/d_i - 1/F) / (1 - 1/F) is linear in inv_i: its slope and intercept give h - l and l for
the n the file names (8192, Llama 3's, when it names none). The recovered parameters must
reproduce every d_i (relative 1e-5), else the file is refused; so is one with fewer than two
in-between frequencies, where the line is not determined.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from mpisplit.models.gguf.reader import GGUFFile

if TYPE_CHECKING:
    from mpisplit.models.gguf.weights import GGUFWeights

# A .gguf path, or the file already open (opening parses all metadata: seconds for 50k tokens).
Source = Union[str, os.PathLike, GGUFFile, "GGUFWeights"]

# GGUF architecture -> (Hugging Face model_type, architectures[0]).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}


def open_file(path: Source) -> GGUFFile:
    if isinstance(path, GGUFFile):
        return path
    file = getattr(path, "file", None)
    if isinstance(file, GGUFFile):  # a GGUFWeights (not imported at run time: it imports this module)
        return file
    return GGUFFile(cast("str | os.PathLike", path))


def check_architecture(f: GGUFFile) -> str:
    arch = f.arch
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{f.path}: GGUF architecture {arch!r} is not supported; expected one of {sorted(ARCHITECTURES)}"
        )
    return arch


def _positive(f: GGUFFile, key: str, default: Any = None) -> int:
    value = f.get(key, int) if default is None else f.get(key, int, default)
    if value <= 0:
        raise ValueError(f"{f.path}: metadata {key} must be positive, got {value}")
    return value


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = f.get(f"{arch}.rope.scaling.type", str, None)
    factor = f.get(f"{arch}.rope.scaling.factor", float, None)
    if kind is None and (old := f.get(f"{arch}.rope.scale_linear", float, None)) is not None:
        kind, factor = "linear", old  # the key older converters wrote
    if "rope_freqs.weight" in f.tensors:
        if kind not in (None, "none"):
            raise ValueError(f"{f.path}: both rope scaling type {kind!r} and a rope_freqs.weight tensor")
        return _llama3_scaling(f, arch, head_dim, theta)
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    if kind not in ("linear", "yarn") or factor is None or factor <= 0:
        raise ValueError(f"{f.path}: rope scaling type {kind!r} with factor {factor!r} is not supported")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = _positive(f, f"{arch}.rope.scaling.original_context_length")
    return scaling


def llama3_divisors(scaling: dict[str, Any], inv: np.ndarray) -> np.ndarray:
    """What transformers' llama3 rope scaling divides the inverse frequencies `inv` by."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    s = (old / wavelength - low) / (high - low)
    between = 1 / ((1 - s) / factor + s)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, factor, between))


def _llama3_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    t = f.tensors["rope_freqs.weight"]
    if t.tensor_type.name != "F32" or t.n_elements != head_dim // 2:
        raise ValueError(f"{f.path}: rope_freqs.weight must be {head_dim // 2} F32 values, got "
                         f"{t.n_elements} {t.tensor_type.name}")
    d = np.asarray(t.data, dtype=np.float64).reshape(-1)
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(d.max())
    if np.all(d == 1.0):
        return None
    between = (d > 1 + 1e-6) & (d < factor * (1 - 1e-6))
    if between.sum() < 2 or not np.all(d >= 1):
        raise ValueError(f"{f.path}: rope_freqs.weight {np.round(d, 4).tolist()} is not a llama3 rope "
                         "scaling with two or more frequencies between the bands; not supported")
    s = (1 / d[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv[between], s, 1)
    old = f.get(f"{arch}.rope.scaling.original_context_length", int, 8192)
    span = old / (2 * math.pi * slope)
    low = -intercept * span
    exact = {"factor": factor, "low_freq_factor": low, "high_freq_factor": low + span}
    for params in ({k: round(v, 4) for k, v in exact.items()}, exact):  # the rounded ones when they fit
        scaling = {"rope_type": "llama3", **params, "original_max_position_embeddings": old}
        if 0 < low and np.allclose(llama3_divisors(scaling, inv), d, rtol=1e-5, atol=0):
            return scaling
    raise ValueError(f"{f.path}: rope_freqs.weight {np.round(d, 4).tolist()} does not follow llama3 rope scaling")


def _head_dim(f: GGUFFile, arch: str, hidden: int, heads: int) -> int:
    key_length = f.get(f"{arch}.attention.key_length", int, None)
    if key_length is None and hidden % heads:
        raise ValueError(
            f"{f.path}: hidden size {hidden} is not a multiple of {heads} heads and no key_length is given"
        )
    head_dim = key_length or hidden // heads
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        other = f.get(key, int, head_dim)
        if other != head_dim:
            raise ValueError(f"{f.path}: {key} = {other} differs from the head dimension {head_dim}; not supported")
    return head_dim


def _token_id(f: GGUFFile, name: str) -> int | None:
    return f.get(f"tokenizer.ggml.{name}_token_id", int, None)


def hf_config(path: Source) -> dict[str, Any]:
    """The config.json dict transformers' LlamaForCausalLM / Qwen2ForCausalLM loads."""
    f = open_file(path)
    arch = check_architecture(f)
    model_type, architecture = ARCHITECTURES[arch]
    hidden = _positive(f, f"{arch}.embedding_length")
    heads = _positive(f, f"{arch}.attention.head_count")
    kv_heads = _positive(f, f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ValueError(f"{f.path}: {heads} attention heads are not a multiple of {kv_heads} key/value heads")
    embed = f.tensors.get("token_embd.weight")
    rows = int(embed.shape[-1]) if embed is not None and len(embed.shape) == 2 else None
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": _positive(f, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _positive(f, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _head_dim(f, arch, hidden, heads),
        "hidden_act": "silu",
        "rms_norm_eps": f.get(f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": f.get(f"{arch}.rope.freq_base", float, 10000.0),
        "max_position_embeddings": _positive(f, f"{arch}.context_length"),
        "vocab_size": _positive(f, f"{arch}.vocab_size", rows),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "torch_dtype": "float32",
    }
    if (scaling := _rope_scaling(f, arch, cfg["head_dim"], cfg["rope_theta"])) is not None:
        cfg["rope_scaling"] = scaling
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False)
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if (token := _token_id(f, name)) is not None:
            cfg[key] = token
    return cfg


def generation_config(path: Source) -> dict[str, Any]:
    """generation_config.json: bos, pad and the end-of-generation ids (eos, and llama.cpp's eot/eom
    where the file names them: Llama 3's <|eot_id|> ends a chat turn but is not the eos)."""
    f = open_file(path)
    check_architecture(f)
    ends = [t for name in ("eos", "eot", "eom") if (t := _token_id(f, name)) is not None]
    ends = list(dict.fromkeys(ends))
    out: dict[str, Any] = {}
    if (bos := _token_id(f, "bos")) is not None:
        out["bos_token_id"] = bos
    if ends:
        out["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    if (pad := _token_id(f, "padding")) is not None:
        out["pad_token_id"] = pad
    return out
