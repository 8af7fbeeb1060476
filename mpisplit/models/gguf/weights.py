"""A GGUF file's tensors under Hugging Face Llama/Qwen2 names, read slice by slice as float32.

    w = GGUFWeights("model.gguf")
    w.names()                                   # {"model.embed_tokens.weight", ...}
    w.shape("model.layers.0.self_attn.q_proj.weight")        # (H*hd, hidden): NumPy / HF order
    w.read("model.layers.0.self_attn.q_proj.weight", (slice(0, 128), slice(None)))

Layout facts:
- GGUF lists dimensions fastest first (ne0 = the row length), the reverse of NumPy's order, so a
  Hugging Face (out, in) matrix is stored as ne = [in, out]: the bytes are the same rows.
- Quantized types pack each row in blocks of 32 (Q4_0 ... Q8_0) or 256 (K-quants) values along
  the row (the last Hugging Face axis). A slice of rows reads and dequantizes only those rows; a
  slice of columns only the blocks that cover it.
- llama.cpp's converter permutes the rows of Llama's Q and K projections (weights and biases)
  within each head for its interleaved rotary embedding: a head's Hugging Face row i*hd/2 + j
  (half i, pair j) is stored as row 2*j + i. Reading undoes it (Qwen2 files are not permuted).
- Without output.weight the model is tied: there is no lm_head.weight.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from mpisplit.models.gguf.config import check_architecture, hf_config
from mpisplit.models.gguf.reader import GGUFFile, require_gguf

_LAYER_TENSORS = {  # GGUF name inside blk.{i}. -> Hugging Face name inside model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIASES = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
               "attn_v.bias": "self_attn.v_proj.bias"}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


def _expected(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (Hugging Face name, Hugging Face shape) of every tensor the model has."""
    h, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
    }
    per_layer = dict(_LAYER_TENSORS, **(_QKV_BIASES if cfg["model_type"] == "qwen2" else {}))
    out = {"token_embd.weight": ("model.embed_tokens.weight", (V, h)),
           "output_norm.weight": ("model.norm.weight", (h,))}
    if not cfg["tie_word_embeddings"]:
        out["output.weight"] = ("lm_head.weight", (V, h))
    for i in range(cfg["num_hidden_layers"]):
        for g, n in per_layer.items():
            out[f"blk.{i}.{g}"] = (f"model.layers.{i}.{n}", shapes[n])
    return out


def _row_index(rows: range, head_dim: int) -> np.ndarray:
    """GGUF rows holding Hugging Face rows `rows` of a permuted Q or K projection."""
    r = np.arange(rows.start, rows.stop, dtype=np.int64)
    head, within = np.divmod(r, head_dim)
    half, pair = np.divmod(within, head_dim // 2)
    return head * head_dim + 2 * pair + half


class GGUFWeights:
    """The tensors of one GGUF file by Hugging Face name (the interface of hf_gpt2's weight files)."""

    def __init__(self, path: str | os.PathLike, keep_quantized: bool = False) -> None:
        self.file = GGUFFile(path)
        # hf_llama.load_weights keeps the matrices' blocks where it can (models/gguf/blocks.py)
        self.keep_quantized = keep_quantized
        self.folder = Path(path)  # named so for error messages shared with Hugging Face folders
        f = self.file
        self.config = hf_config(f)
        expected = _expected(self.config)
        unknown = sorted(set(f.tensors) - set(expected) - {"rope_freqs.weight"})
        missing = sorted(set(expected) - set(f.tensors))
        if unknown or missing:
            raise ValueError(
                f"{f.path}: the tensors do not match a {check_architecture(f)} model of "
                f"{self.config['num_hidden_layers']} layers: missing {missing[:8]}, unexpected {unknown[:8]}"
            )
        self._gguf_name = {hf: g for g, (hf, _) in expected.items()}
        self._shape = {hf: shape for hf, shape in expected.values()}
        for g, (hf, shape) in expected.items():
            stored = tuple(int(d) for d in reversed(f.tensors[g].shape.tolist()))
            if stored != shape:
                raise ValueError(f"{f.path}: tensor {g} ({hf}) has shape {stored}; the metadata implies {shape}")
        # Llama files store Q and K (weights and biases) with rows permuted within each head.
        permuted = ("attn_q.", "attn_k.") if self.config["model_type"] == "llama" else ()
        self._permuted = {hf for g, (hf, _) in expected.items() if g.split(".", 2)[-1].startswith(permuted)}

    def names(self) -> set[str]:
        return set(self._shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def file_of(self, name: str) -> Path:
        return self.folder

    def gguf_type(self, name: str) -> str:
        return self.file.tensors[self._gguf_name[name]].tensor_type.name

    def check_float(self, name: str) -> None:
        """ValueError naming the tensor and its GGUF type when gguf.quants cannot dequantize it."""
        t = self.file.tensors[self._gguf_name[name]]
        if not _dequantizable(int(t.tensor_type)):
            raise ValueError(
                f"{self.folder}: tensor {t.name} ({name}) is stored as {t.tensor_type.name}, which the gguf "
                f"package cannot dequantize (gguf.quants.dequantize)"
            )

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """float32 tensor[index] in the Hugging Face layout, dequantizing only the rows and blocks it needs."""
        gguf = require_gguf()
        self.check_float(name)
        t = self.file.tensors[self._gguf_name[name]]
        shape = self._shape[name]
        bounds = _bounds(name, shape, index)
        # Every type as rows of bytes, (rows, bytes per row); a 1-D tensor is one row.
        raw = t.data.reshape(shape[0] if len(shape) == 2 else 1, -1).view(np.uint8)
        if len(shape) == 1:  # norms and biases: small, read whole
            full = gguf.quants.dequantize(raw, t.tensor_type)[0]
            if name in self._permuted:
                full = full[_row_index(range(shape[0]), self.config["head_dim"])]
            return np.array(full[bounds[0].start:bounds[0].stop], dtype=np.float32)
        rows, cols = bounds
        if not rows or not cols:
            return np.zeros((len(rows), len(cols)), dtype=np.float32)
        if name in self._permuted:
            raw = raw[_row_index(rows, self.config["head_dim"])]
        else:
            raw = raw[rows.start:rows.stop]
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        first, last = cols.start // block, -(-cols.stop // block)  # the blocks covering the columns
        part = np.ascontiguousarray(raw[:, first * type_size:last * type_size])
        out = gguf.quants.dequantize(part, t.tensor_type)
        # Owned float32: never a view of the memory-mapped file.
        return np.array(out[:, cols.start - first * block:cols.stop - first * block], dtype=np.float32)

    def close(self) -> None:
        self.file.close()


def _bounds(name: str, shape: tuple[int, ...], index: tuple[slice, ...] | None) -> list[range]:
    index = () if index is None else index
    if not isinstance(index, tuple) or len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise ValueError(f"index for {name} {shape} must be a tuple of at most {len(shape)} slices, got {index!r}")
    out = []
    for dim, s in zip(shape, index + (slice(None),) * (len(shape) - len(index))):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"index for {name}: slices must have step 1, got {s}")
        out.append(range(start, max(start, stop)))
    return out


@functools.cache
def _dequantizable(qtype: int) -> bool:
    """Whether gguf.quants.dequantize handles `qtype`, found by dequantizing one zero block."""
    gguf = require_gguf()
    kind = gguf.GGMLQuantizationType(qtype)
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True
