"""Llama-family weights (Llama, Qwen2, Mistral, SmolLM2, ...) in the Hugging Face layout, read slab
by slab and written back.

    model = GPT.from_pretrained("smollm2-135m", grid)   # each rank reads only its rows
    model.save_pretrained("out")                        # config.json + model.safetensors

Names and transposes are the table of models/hf_layout.py; the config is models/hf_llama_config.py.
A column-split weight here is a block of rows of the (out, in) file tensor: one row slice per
rank. A replicated key/value head (tp > kv heads) is read by each of its ranks. F32, F16, BF16
and F64 tensors load (BF16 widened exactly). Any object with the same methods as the
safetensors reader (names, shape, check_float, read, file_of, close) can be the source, so other
file formats load through the same code.

Saving gathers each tensor to TP rank 0 (world rank 0, pp = 1), transposes it into the file's
layout and writes it in order into a temporary file renamed at the end; a tied head is not
written (transformers ties it on load).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpisplit.models.hf_gpt2 import _WRITE_CODES, _pwrite_all, _slab_extent, _WeightFiles
from mpisplit.models.hf_layout import hf_name
from mpisplit.models.hf_llama_config import LLAMA_TYPES, config_from_dict, hf_config, parse_config
from mpisplit.nn.module import Parameter
from mpisplit.runtime.allocator import untouched_large_arrays
from mpisplit.runtime.backend import get_array_module, resolve_dtype, to_numpy
from mpisplit.runtime.errors import agree
from mpisplit.runtime.files import fsync_dir

if TYPE_CHECKING:  # the GPT class is passed in (gpt.py imports this file when loading)
    from mpisplit.models.gpt import GPT


def is_llama_folder(folder: Any) -> bool:
    """Whether `folder`/config.json names a Llama-family model_type (unreadable: False)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type") in LLAMA_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def weights_dtype(folder: Any) -> np.dtype:
    """float64 when the folder's embedding is stored in F64, else float32."""
    files = _WeightFiles(Path(folder))
    code = files.entries.get("model.embed_tokens.weight", (None, "F32"))[1]
    return np.dtype(np.float64 if code == "F64" else np.float32)


def from_pretrained(cls: type[GPT], folder: Any, grid: Any, dtype: Any = "float32", *,
                    max_model_len: int | None = None, source: Any = None, config: dict | None = None) -> GPT:
    """A `cls` (GPT) over `grid` with the weights of a Llama-family folder, or of `source` (a
    reader of the same tensors under the same names, e.g. a GGUF file) with `config` (the
    config.json contents). Collective over grid.world: any failure raises on every rank."""
    folder = Path(folder)
    with agree(grid.world):
        model_dtype = resolve_dtype(dtype)
        if config is None:
            gpt_config = parse_config(folder, max_model_len)
        else:
            gpt_config = config_from_dict(config, folder, max_model_len)
        gpt_config.validate(grid.tp)
        files = source if source is not None else _WeightFiles(folder)
    keep = getattr(files, "keep_quantized", False)
    with untouched_large_arrays() if keep else contextlib.nullcontext():  # most arrays never written
        model = cls(gpt_config, grid, dtype=model_dtype, init=False)
    with agree(grid.world):
        try:
            load_weights(model, files)
        finally:
            files.close()
    return model


def _check_tensors(model: GPT, files: Any) -> dict[str, tuple[str, bool]]:
    """{mpisplit name: (file name, transposed)}; ValueError for missing, extra or misshapen tensors."""
    params = dict(model.named_parameters())
    keys = {name: hf_name(name) for name in params}
    present = files.names()
    missing = sorted(k for k, _ in keys.values() if k not in present)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"the weights in {files.folder} lack tensor(s) {missing[:3]}{more}")
    for name, (key, transposed) in keys.items():
        files.check_float(key)
        g = params[name].global_shape
        expect = g[::-1] if transposed else g
        if tuple(files.shape(key)) != tuple(expect):
            raise ValueError(f"tensor {key!r} in {files.file_of(key)} has shape {tuple(files.shape(key))}; "
                             f"config.json implies {tuple(expect)}")
    return keys


def _read_slab(files: Any, key: str, transposed: bool, p: Parameter) -> np.ndarray:
    """This rank's slab of file tensor `key` in the layout of p.data, padding rows zero."""
    if p.split_axis is None:
        full = files.read(key, None)
        return (full.T if transposed else full).reshape(p.shape)
    lo, real = _slab_extent(p)
    ax = p.split_axis
    file_ax = (p.data.ndim - 1 - ax) if transposed else ax
    index = tuple(slice(lo, lo + real) if i == file_ax else slice(None) for i in range(p.data.ndim))
    part = files.read(key, index) if real else np.zeros(0, dtype=np.float32)
    out = np.zeros(p.shape, dtype=part.dtype)
    if real:
        out[tuple(slice(0, real) if i == ax else slice(None) for i in range(p.data.ndim))] = part.T if transposed else part
    return out


def load_weights(model: GPT, files: Any) -> None:
    """Fill every parameter of `model` (one pipeline stage or the whole) from `files`. A source
    that keeps quantized blocks (GGUFWeights(keep_quantized=True)) gives matrices their blocks
    instead (`p.quantized`), their float arrays replaced by read-only zeros that take no memory;
    what it could not keep is listed in model.quantized_report."""
    keys = _check_tensors(model, files)
    params = dict(model.named_parameters())
    report: dict[str, Any] = {"kept": [], "bytes": 0, "dequantized": []}
    for name, p in params.items():
        key, transposed = keys[name]
        if getattr(files, "keep_quantized", False) and p.ndim == 2:
            kept = _quantized_slab(files, key, transposed, p)
            if kept is not None:
                p.quantized = kept
                p.data = np.broadcast_to(np.zeros((), dtype=p.dtype), p.shape)  # zeros in no memory, read-only
                report["kept"].append(name)
                report["bytes"] += kept.nbytes
                continue
            report["dequantized"].append(f"{key} ({files.gguf_type(key)})")
        slab = _read_slab(files, key, transposed, p)
        xp = get_array_module(p.data)
        p.data[...] = xp.asarray(slab.astype(p.dtype, copy=False))
    if getattr(files, "keep_quantized", False):
        model.quantized_report = report  # type: ignore[attr-defined]


def _quantized_slab(files: Any, key: str, transposed: bool, p: Parameter) -> Any:
    """p's slab as the file's blocks (a QuantizedSlab), or None (see models/gguf/blocks.py). The
    file's (out, in) rows are p's columns when p is stored transposed ((in, out): a linear)."""
    from mpisplit.models.gguf.blocks import slab_blocks
    from mpisplit.nn.quantized import QuantizedSlab

    out_f, in_f = files.shape(key)
    rows, cols = range(out_f), range(in_f)
    if p.split_axis is not None:
        lo, real = _slab_extent(p)
        split_rows = (p.split_axis == 1) == transposed  # the split runs along the file's rows
        if not split_rows and real != p.shape[p.split_axis]:
            return None  # padded input features: the slab's columns would not match x
        if split_rows:
            rows = range(lo, lo + real)
        else:
            cols = range(lo, lo + real)
    got = slab_blocks(files, key, rows, cols)
    return None if got is None else QuantizedSlab(got[0], got[1], len(rows), len(cols))


# ---------------------------------------------------------------------------- writing


def _file_tensors(model: GPT) -> list[tuple[str, Parameter, str, bool]]:
    """(mpisplit name, parameter, file name, transposed) of every tensor the file holds."""
    return [(name, p, *hf_name(name)) for name, p in model.named_parameters()]


def _header(model: GPT) -> tuple[bytes, list[int], int]:
    code = _WRITE_CODES[np.dtype(model.dtype)]
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for _, p, key, transposed in _file_tensors(model):
        shape = p.global_shape[::-1] if transposed else p.global_shape
        nbytes = int(np.prod(shape, dtype=np.int64)) * p.dtype.itemsize
        entries[key] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, [start + o for o in offsets], start + pos


def gather_global(p: Parameter, tp_comm: Any) -> np.ndarray | None:
    """The logical (unpadded) global tensor of `p` on TP rank 0 (None elsewhere). Collective.
    Replicated slabs (tp > kv heads) land on the same rows, with the same values."""
    local = np.ascontiguousarray(to_numpy(p.data).reshape(p.view_shape))
    if p.split_axis is None:
        return local if tp_comm.rank == 0 else None
    mpi = tp_comm.mpi
    starts = mpi.gather(p.start, root=0)
    recv = np.empty((tp_comm.size, *local.shape), dtype=local.dtype) if tp_comm.rank == 0 else None
    mpi.Gather(local, recv, root=0)
    if recv is None:  # TP ranks > 0
        return None
    ax = p.split_axis
    padded = list(p.global_shape)
    padded[ax] = max(s + local.shape[ax] for s in starts)
    full = np.zeros(padded, dtype=local.dtype)
    for start, slab in zip(starts, recv):
        index = tuple(slice(start, start + slab.shape[ax]) if i == ax else slice(None) for i in range(full.ndim))
        full[index] = slab
    return full[tuple(slice(0, n) for n in p.global_shape)]


def save_pretrained(model: GPT, folder: Any) -> None:
    """Write `folder`/config.json + model.safetensors (Hugging Face layout of the model's family, the
    model's dtype, unpadded). Collective over the world; pp must be 1."""
    grid, folder = model.grid, Path(folder)
    world = grid.world
    with agree(world):
        if getattr(grid, "pp", 1) != 1:
            raise ValueError("save_pretrained of a Llama-family model needs the whole model (pp=1)")
        if np.dtype(model.dtype) not in _WRITE_CODES:
            raise ValueError(f"save_pretrained writes float32 or float64 models, not {model.dtype}")
        config_text = json.dumps(hf_config(model.config, np.dtype(model.dtype).name), indent=2) + "\n"
    header, offsets, size = _header(model)
    writer = world.rank == 0
    tmp = folder / f".model.safetensors.tmp-{secrets.token_hex(6)}"
    fd, error = None, None
    if writer:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(fd, np.frombuffer(header, dtype=np.uint8), 0)
            os.ftruncate(fd, size)
        except OSError as exc:
            error = exc
    # Every TP rank of DP replica 0 joins every gather: a failed write is remembered, not raised,
    # so no rank waits in a Gather alone; the failure is agreed on after the last one.
    if grid.dp_rank == 0:
        for (_, p, _, transposed), offset in zip(_file_tensors(model), offsets):
            full = gather_global(p, grid.tp_comm)
            if fd is not None and full is not None and error is None:  # world rank 0, TP rank 0
                try:
                    _pwrite_all(fd, np.ascontiguousarray(full.T if transposed else full), offset)
                except OSError as exc:
                    error = exc
    with agree(world):
        try:
            if fd is not None:
                os.fsync(fd)
                os.close(fd)
                fd = None
            if error is not None:
                raise error
            if writer:
                (folder / ".config.json.tmp").write_text(config_text, encoding="utf-8")
                os.replace(tmp, folder / "model.safetensors")
                os.replace(folder / ".config.json.tmp", folder / "config.json")
                fsync_dir(folder)
        finally:
            if fd is not None:
                os.close(fd)
            if writer:
                tmp.unlink(missing_ok=True)
