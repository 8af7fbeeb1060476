"""A Hugging Face folder (Llama, Mistral, Qwen2 or GPT-2) as one GGUF file llama.cpp loads.

    export = write_gguf("llama-folder", "model.gguf", "q8_0")   # tokenizer: the folder's, or tokenizer=
    print(export.summary())     # wrote model.gguf from llama-folder: 21 tensors, 1,234,567 bytes, q8_0

For the Llama family it is the inverse of what this package reads (config.py, weights.py,
tokenizer.py): the file read back is the folder's config, tokenizer and weights (f32 bit for bit;
otherwise each matrix's own rounding, gguf.quants.dequantize(gguf.quants.quantize(W))). Written
as llama.cpp's convert_hf_to_gguf.py writes them:

- metadata, A = "llama" (Llama, Mistral) or "qwen2": A.block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count, head_count_kv, layer_norm_rms_epsilon, rope.freq_base,
  rope.dimension_count, vocab_size; attention.key_length/value_length where head_dim is not
  hidden / heads; linear rope scaling as rope.scaling.type + factor; llama3 rope scaling as the
  tensor rope_freqs.weight (what each inverse frequency is divided by, config.llama3_divisors) and
  rope.scaling.original_context_length. GPT-2: gpt2.* with attention.layer_norm_epsilon.
- tensors named by gguf.get_tensor_name_map; Llama's (not Qwen2's) Q and K rows permuted within
  each head for llama.cpp's interleaved rotary (Hugging Face row i*hd/2 + j, half i and pair j,
  becomes row 2*j + i); GPT-2's Conv1D weights transposed to (out, in); no output.weight when
  the head is tied (llama.cpp then uses token_embd).
- types (--type): f32; f16; q8_0 and q4_0 by gguf.quants.quantize, blocks of 32 along the input
  dimension. 1-D tensors (norms, biases), position_embd and rope_freqs stay F32 in every type; a
  matrix whose input dimension is not a multiple of 32 is written F16 (llama.cpp's converter
  falls back the same way) and named in the summary.
- the tokenizer: vocab.py.

Everything is checked before the file is opened; tensors are then read, converted and written
one at a time, under a temporary name beside `out` that is renamed into place at the end.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.models.config import GPTConfig
from mpisplit.models.gguf.config import llama3_divisors
from mpisplit.models.gguf.reader import require_gguf
from mpisplit.models.gguf.vocab import GGUFVocab, read_vocab
from mpisplit.models.gguf.weights import _expected
from mpisplit.runtime.files import fsync_dir, fsync_file

# --type -> (GGML type, general.file_type): llama.cpp's names for them.
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
         "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# mpisplit family -> GGUF architecture (llama.cpp reads Mistral as Llama).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: where it comes from and how it changes on the way."""

    name: str  # GGUF name
    source: str | None  # Hugging Face name; None: `data` is the tensor
    shape: tuple[int, ...]  # NumPy order, as written: (out, in) for a matrix
    heads: int = 0  # > 0: Llama's Q/K rows, permuted within this many heads
    transpose: bool = False  # GPT-2's Conv1D weights are stored (in, out)
    keep_f32: bool = False  # F32 in every type
    data: np.ndarray | None = None


@dataclass
class GGUFExport:
    """What write_gguf wrote."""

    path: Path
    source: Path
    out_type: str
    tensors: int
    nbytes: int
    kept_f16: list[str] = field(default_factory=list)  # matrices not quantized (input dim % 32)
    padded_tokens: int = 0

    def summary(self) -> str:
        text = f"wrote {self.path} from {self.source}: {self.tensors} tensors, {self.nbytes:,} bytes, {self.out_type}"
        if self.kept_f16:
            names = ", ".join(self.kept_f16[:6]) + (", ..." if len(self.kept_f16) > 6 else "")
            text += f" ({len(self.kept_f16)} written f16, input dimension not a multiple of 32: {names})"
        if self.padded_tokens:
            text += f"; {self.padded_tokens} vocabulary rows without a token named [PAD<id>]"
        return text


def check_type(out_type: str) -> tuple[Any, Any]:
    """(GGMLQuantizationType, LlamaFileType) of a --type name (ValueError naming the choices)."""
    if out_type not in TYPES:
        raise ValueError(f"--type {out_type!r} is not one of {list(TYPES)}")
    gguf = require_gguf()
    qtype, ftype = TYPES[out_type]
    return gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[ftype]


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its converter's `permute`): each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(tmap: Any, name: str, arch: str, where: Path) -> str:
    found = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ValueError(f"{where}: tensor {name!r} has no place in a GGUF {arch} model")
    return found


def _llama_tensors(cfg: GPTConfig, files: Any, arch: str) -> list[_Tensor]:
    """The tensors weights.py reads back (its _expected table), named by gguf's map."""
    from mpisplit.models.hf_llama_config import hf_config

    if cfg.family != "qwen2" and (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias):
        raise ValueError(f"{files.folder}: attention_bias / mlp_bias {cfg.family} models are not written to "
                         "GGUF (this package reads Llama-family biases from qwen2 files only)")
    gguf = require_gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    expected = _expected(hf_config(cfg, "float32"))  # GGUF name -> (Hugging Face name, shape)
    stored = files.names() - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    by_name = {_gguf_name(tmap, n, arch, files.folder): n for n in sorted(stored)}
    missing, unknown = sorted(set(expected) - set(by_name)), sorted(set(by_name) - set(expected))
    if missing or unknown:
        raise ValueError(f"{files.folder}: the tensors do not match the config's {cfg.family} model: missing "
                         f"{[expected[g][0] for g in missing][:8]}, unexpected {[by_name[g] for g in unknown][:8]}")
    heads = {"attn_q.weight": cfg.n_head, "attn_k.weight": cfg.kv_heads} if arch == "llama" else {}
    out = []
    for g, (_, shape) in expected.items():
        if tuple(files.shape(by_name[g])) != shape:
            raise ValueError(f"{files.folder}: tensor {by_name[g]} has shape {files.shape(by_name[g])}; the config "
                             f"implies {shape}")
        out.append(_Tensor(g, by_name[g], shape, heads=heads.get(g.split(".", 2)[-1], 0)))
    return _rope_freqs(cfg) + out


def _rope_freqs(cfg: GPTConfig) -> list[_Tensor]:
    """rope_freqs.weight for llama3 rope scaling (llama.cpp divides each inverse frequency by it)."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return []
    hd = cfg.head_size
    inv = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    divisors = llama3_divisors(scaling, inv).astype(np.float32)
    return [_Tensor("rope_freqs.weight", None, divisors.shape, keep_f32=True, data=divisors)]


def _gpt2_tensors(cfg: GPTConfig, files: Any) -> list[_Tensor]:
    """GPT-2's tensors by gguf's map; the head is the token table (mpisplit ties GPT-2's)."""
    gguf = require_gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    out = []
    for name in sorted(files.names()):
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # attention-mask buffers; the tied head
        shape = tuple(files.shape(name))
        transpose = len(shape) == 2 and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
        g = _gguf_name(tmap, name, "gpt2", files.folder)
        out.append(_Tensor(g, name, shape[::-1] if transpose else shape, transpose=transpose,
                           keep_f32=g == "position_embd.weight"))
    parts = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    want = {f"blk.{i}.{p}.{s}" for i in range(cfg.n_layer) for p in parts for s in ("weight", "bias")}
    want |= {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    have = {t.name for t in out}
    if have != want:
        raise ValueError(f"{files.folder}: the tensors do not make a GPT-2 model of {cfg.n_layer} layers: missing "
                         f"{sorted(want - have)[:8]}, unexpected {sorted(have - want)[:8]}")
    return out


def _add_rope_scaling(writer: Any, cfg: GPTConfig) -> None:
    gguf = require_gguf()
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":  # the divisors are the tensor rope_freqs.weight; config.py reads n back
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind is not None:
        raise ValueError(f"rope scaling {kind!r} is not written to GGUF; linear and llama3 are")


def _add_metadata(writer: Any, cfg: GPTConfig, arch: str, name: str, ftype: Any) -> None:
    """general.* and the architecture's hyperparameters (keys prefixed with `arch` by the writer)."""
    gguf = require_gguf()
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.ffn_size)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
    else:
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_layer_norm_rms_eps(cfg.layer_norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_size)
        if cfg.head_size * cfg.n_head != cfg.n_embd:
            writer.add_key_length(cfg.head_size)
            writer.add_value_length(cfg.head_size)
        _add_rope_scaling(writer, cfg)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_type(t: _Tensor, qtype: Any) -> Any:
    """The GGML type `t` is written in when the file's type is `qtype`."""
    gguf = require_gguf()
    kinds = gguf.GGMLQuantizationType
    if len(t.shape) == 1 or t.keep_f32:
        return kinds.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if t.shape[-1] % block == 0 else kinds.F16


def _encode(t: _Tensor, files: Any, qtype: Any) -> np.ndarray:
    """Tensor `t` as the bytes (or floats) of GGML type `qtype`."""
    gguf = require_gguf()
    a = np.asarray(t.data if t.source is None else files.read(t.source, None), dtype=np.float32)
    if t.transpose:
        a = a.T
    if t.heads:
        a = permute_rows(a, t.heads)
    a = np.ascontiguousarray(a)
    if qtype == gguf.GGMLQuantizationType.F32:
        return a
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _write_file(writer: Any, tensors: list[_Tensor], types: list[Any], files: Any, out: Path) -> int:
    """Tensor table, then each tensor converted in turn, into a temporary file renamed to `out`;
    returns its size."""
    gguf = require_gguf()
    for t, q in zip(tensors, types):
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, q), dtype=np.int64))
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=q)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, q in zip(tensors, types):
            writer.write_tensor_data(_encode(t, files, q))
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def write_gguf(folder: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16",
               tokenizer: str | os.PathLike | None = None, name: str | None = None) -> GGUFExport:
    """Write Hugging Face folder `folder` (its tokenizer, or `tokenizer`'s) as GGUF file `out`, which
    must not exist; general.name is `name` or the folder's name."""
    from mpisplit.models.hf import read_config
    from mpisplit.models.hf_gpt2 import _WeightFiles

    qtype, ftype = check_type(out_type)
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise ValueError(f"output file {str(out)!r} already exists; choose a new name")
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {str(folder)!r} does not exist")
    cfg = read_config(folder)
    arch = ARCHITECTURES[cfg.family]
    files = _WeightFiles(folder)
    try:
        tensors = _gpt2_tensors(cfg, files) if arch == "gpt2" else _llama_tensors(cfg, files, arch)
        vocab: GGUFVocab = read_vocab(folder if tokenizer is None else tokenizer, cfg.vocab_size)
        writer = require_gguf().GGUFWriter(None, arch)
        _add_metadata(writer, cfg, arch, name or folder.resolve().name, ftype)
        vocab.add_to(writer)
        types = [_tensor_type(t, qtype) for t in tensors]
        nbytes = _write_file(writer, tensors, types, files, out)
    finally:
        files.close()
    kept = [t.name for t, q in zip(tensors, types) if q != qtype and len(t.shape) == 2 and not t.keep_f32]
    return GGUFExport(out, folder, out_type, len(tensors), nbytes, kept, vocab.padded)
