"""Small GGUF files written with gguf.GGUFWriter from seeded Hugging Face Llama / Qwen2 arrays.

    arrays = llama_arrays(TINY, seed=0)                   # HF names -> float32 arrays, HF shapes
    write_gguf(path, TINY, arrays, qtype="Q8_0")          # llama.cpp's layout and names

The file is what llama.cpp's converter writes: Q and K rows permuted within each head for Llama
(w.reshape(heads, 2, hd/2, in).swapaxes(1, 2), the inverse of what a reader must undo), GGUF
names, matrices quantized to `qtype` (norms and biases stay F32), a byte-level BPE vocabulary
(256 byte tokens, a few merges, three control tokens) or a SentencePiece one, and a chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "inter": 96, "ctx": 64,
        "tied": True, "theta": 10000.0, "eps": 1e-5}
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (a fact of the byte-level BPE format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): control tokens first, then bytes, then merge results."""
    tokens = CONTROL + byte_alphabet()
    tokens += [m.replace(" ", "") for m in MERGES]
    return tokens, [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL)), MERGES


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a small SentencePiece vocabulary with byte fallback."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["\u2581", "a", "b", "c", "d", "e", "h", "l", "o", "r", "t", "w", "1", "2", "\u2581t", "he",
              "\u2581the", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "ab", "\u2581ab", "12"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def llama_arrays(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, I, L = cfg["hidden"], cfg["inter"], cfg["layers"]
    hd = h // cfg["heads"]
    q, kv = cfg["heads"] * hd, cfg["kv_heads"] * hd
    V = len(gpt2_vocab()[0]) if cfg.get("tokenizer", "gpt2") == "gpt2" else len(spm_vocab()[0])

    def normal(*shape: int, std: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    p = {"model.embed_tokens.weight": normal(V, h, std=1.0), "model.norm.weight": 1 + normal(h)}
    if not cfg["tied"]:
        p["lm_head.weight"] = normal(V, h)
    for i in range(L):
        b = f"model.layers.{i}."
        p[b + "input_layernorm.weight"], p[b + "post_attention_layernorm.weight"] = 1 + normal(h), 1 + normal(h)
        p[b + "self_attn.q_proj.weight"], p[b + "self_attn.k_proj.weight"] = normal(q, h), normal(kv, h)
        p[b + "self_attn.v_proj.weight"], p[b + "self_attn.o_proj.weight"] = normal(kv, h), normal(h, q)
        p[b + "mlp.gate_proj.weight"], p[b + "mlp.up_proj.weight"] = normal(I, h), normal(I, h)
        p[b + "mlp.down_proj.weight"] = normal(h, I)
        if cfg["arch"] == "qwen2":
            p[b + "self_attn.q_proj.bias"], p[b + "self_attn.k_proj.bias"] = normal(q), normal(kv)
            p[b + "self_attn.v_proj.bias"] = normal(kv)
    return p


_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_shape(w: Any, cfg: dict[str, Any]) -> None:
    """The model's shape keys (llama.cpp's names) on a gguf.GGUFWriter."""
    w.add_block_count(cfg["layers"])
    w.add_context_length(cfg["ctx"])
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["inter"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_rope_freq_base(cfg["theta"])


def write_gguf(path: Path, cfg: dict[str, Any], arrays: dict[str, np.ndarray], qtype: str = "F32",
               metadata: dict[str, Any] | None = None, extra_tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
               pre: str = "default") -> Path:
    import gguf

    arch = cfg["arch"]
    w = gguf.GGUFWriter(str(path), arch=arch)
    add_shape(w, cfg)
    if cfg.get("tokenizer", "gpt2") == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    quant = gguf.GGMLQuantizationType[qtype]
    hd = cfg["hidden"] // cfg["heads"]
    for name, a in arrays.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, a.shape[0] // hd)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, a.shape[0] // hd)
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            data = (random_k_blocks(*a.shape, qtype, np.random.default_rng(a.size)) if qtype.endswith("_K")
                    else gguf.quants.quantize(a, quant))
            w.add_tensor(gguf_name(name), data, raw_dtype=quant)
        else:
            w.add_tensor(gguf_name(name), a)
    for name, (a, raw) in (extra_tensors or {}).items():
        w.add_tensor(name, a, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_k_blocks(rows: int, features: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(rows, features / 256 * block bytes) uint8: K-quant super-blocks of random bytes (every byte
    string is a valid block; gguf has no K-quant quantizer) with fp16 scales of a weight's size."""
    from mpisplit.kernels.block_dot import LAYOUTS

    lay = LAYOUTS[kind]
    n = features // lay.elems
    blocks = rng.integers(0, 256, (rows, n, lay.size), dtype=np.uint8)
    for at in (lay.d, lay.m):
        if at is not None:
            scale = rng.uniform(1e-3, 2e-2, (rows, n)).astype(np.float16)
            blocks[:, :, at:at + 2] = scale.view(np.uint8).reshape(rows, n, 2)
    return blocks.reshape(rows, -1)


def quantized(a: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader must return for a matrix stored as `qtype`: its dequantized quantization."""
    import gguf

    quant = gguf.GGMLQuantizationType[qtype]
    if a.ndim != 2 or quant == gguf.GGMLQuantizationType.F32:
        return a
    return gguf.quants.dequantize(gguf.quants.quantize(a, quant), quant)
