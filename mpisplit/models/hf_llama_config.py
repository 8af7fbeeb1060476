"""config.json of a Llama-family folder (model_type llama, qwen2, mistral) <-> GPTConfig.

Read as transformers reads it:
- shape: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads (default: the heads), head_dim when given (it may differ from
  hidden / heads), rms_norm_eps, vocab_size, max_position_embeddings.
- biases: llama and mistral `attention_bias` (q, k, v and o) and `mlp_bias`; qwen2 always has
  q, k, v biases and none on o or the MLP.
- tie_word_embeddings (default False for all three).
- rotary: transformers 5's `rope_parameters` {rope_type, rope_theta, ...} or the older top-level
  `rope_theta` + `rope_scaling` {type | rope_type, ...}; types default, linear, llama3 (others
  refused with the type named).
- sliding windows: mistral's `sliding_window`, qwen2's when `use_sliding_window`; a window shorter
  than the context would need a banded mask, so it is refused unless the context is capped to it
  (max_model_len <= window: the band then never cuts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpisplit.models.config import GPTConfig
from mpisplit.models.hf_gpt2 import read_json_object

LLAMA_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _int(cfg: dict, key: str, where: Path, default: Any = None) -> int:
    v = cfg.get(key, default)
    if v is None and default is None:
        raise ValueError(f"{where} lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


def _float(cfg: dict, key: str, where: Path, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {v!r}")  # noqa: TRY004 - a bad file
    return float(v)


def rope_settings(cfg: dict, where: Path) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either layout of the rotary settings."""
    params = cfg.get("rope_parameters")
    scaling: dict | None
    if isinstance(params, dict) and "rope_theta" in params:
        theta = _float(params, "rope_theta", where, 10000.0)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _float(cfg, "rope_theta", where, 10000.0)
        given = cfg.get("rope_scaling")
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"{where}: rope_scaling must be an object or null, got {given!r}")
        scaling = dict(given) if given else None
    if scaling is not None:
        kind = scaling.pop("type", None)
        scaling.setdefault("rope_type", kind or "default")
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    window = cfg.get("sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def parse_config(folder: Path, max_model_len: int | None = None) -> GPTConfig:
    """The GPTConfig of a Llama-family folder's config.json (ValueError naming what is wrong)."""
    path = folder / "config.json"
    return config_from_dict(read_json_object(path), path, max_model_len)


def config_from_dict(cfg: dict, path: Any, max_model_len: int | None = None) -> GPTConfig:
    """The GPTConfig of config.json contents `cfg` (read from `path`, named in errors)."""
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of the Llama family {list(LLAMA_TYPES)}")
    try:
        return _parse(cfg, path, model_type, max_model_len)
    except ValueError as exc:
        raise ValueError(f"{exc} (config.json names model_type {model_type!r}; GPT-2 folders name 'gpt2')") from None


def _parse(cfg: dict, path: Path, model_type: str, max_model_len: int | None) -> GPTConfig:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (the Llama family uses 'silu')")
    heads = _int(cfg, "num_attention_heads", path)
    positions = _int(cfg, "max_position_embeddings", path, 2048)
    if max_model_len is not None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 0:
            raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        positions = min(positions, max_model_len)
    window = _sliding_window(cfg, model_type)
    if window is not None and window < positions:
        raise ValueError(
            f"{path}: sliding_window {window} is shorter than the context of {positions} positions; a banded "
            f"attention mask is not built: cap the context to the window (max_model_len <= {window})"
        )
    theta, scaling = rope_settings(cfg, path)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * heads == cfg.get("hidden_size"):
        head_dim = None  # the default: hidden / heads
    qwen = model_type == "qwen2"
    config = GPTConfig.llama(
        family=model_type, vocab_size=_int(cfg, "vocab_size", path), block_size=positions,
        n_layer=_int(cfg, "num_hidden_layers", path), n_head=heads, n_embd=_int(cfg, "hidden_size", path),
        n_kv_head=_int(cfg, "num_key_value_heads", path, heads),
        head_dim=None if head_dim is None else _int(cfg, "head_dim", path),
        intermediate_size=_int(cfg, "intermediate_size", path),
        layer_norm_eps=_float(cfg, "rms_norm_eps", path, 1e-6),
        qkv_bias=True if qwen else bool(cfg.get("attention_bias", False)),
        out_bias=False if qwen else bool(cfg.get("attention_bias", False)),
        mlp_bias=False if qwen else bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta, rope_scaling=scaling, dropout=_float(cfg, "attention_dropout", path, 0.0),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config


def hf_config(config: GPTConfig, dtype_name: str) -> dict[str, Any]:
    """config.json contents for a Llama-family GPTConfig, as transformers names them."""
    family = config.family
    if family == "qwen2" and not (config.qkv_bias and not config.out_bias and not config.mlp_bias):
        raise ValueError("a qwen2 model has q/k/v biases and no others; this config cannot be written as qwen2")
    if family != "qwen2" and config.qkv_bias != config.out_bias:
        raise ValueError(f"a {family} model has attention biases on all of q, k, v, o or none; got "
                         f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.ffn_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_size,
        "hidden_act": "silu", "max_position_embeddings": config.block_size, "rms_norm_eps": config.layer_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout, "torch_dtype": dtype_name,
    }
    if family != "qwen2":
        out["attention_bias"], out["mlp_bias"] = config.qkv_bias, config.mlp_bias
    if family == "mistral":
        out["sliding_window"] = None
    return out
