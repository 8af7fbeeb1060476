"""GPT-2 weights in the Hugging Face layout, read and written slab by slab.

    model = GPT.from_pretrained("gpt2", grid)       # each rank reads only its own slices
    model.save_pretrained("out")                     # config.json + model.safetensors

The folder is what `transformers`' GPT2LMHeadModel.save_pretrained writes:

    config.json          model_type "gpt2", vocab_size V, n_positions S, n_embd h, n_layer L,
                         n_head H, layer_norm_epsilon, activation_function, ...
    model.safetensors    (or model.safetensors.index.json and the files its weight_map names)
      [transformer.]wte.weight (V, h)  wpe.weight (S, h)  ln_f.weight/bias (h)
      [transformer.]h.{i}.ln_1/ln_2.weight/bias (h)
      [transformer.]h.{i}.attn.c_attn.weight (h, 3h)  Conv1D (in, out), columns [Q | K | V]
      [transformer.]h.{i}.attn.c_attn.bias (3h)  attn.c_proj.weight (h, h)  .bias (h)
      [transformer.]h.{i}.mlp.c_fc.weight (h, 4h)  .bias (4h)  mlp.c_proj.weight (4h, h)  .bias (h)
      lm_head.weight (V, h), optional: the tied head, equal to wte.weight
      h.{i}.attn.bias, h.{i}.attn.masked_bias: attention-mask buffers, ignored

The model's parameter names are these without "transformer.". A parameter whose
shard view differs from the file's shape (the fused QKV weight, view (h, 3, h),
file (h, 3h)) has the file's last axis split into the view's last two: k blocks
of width w. Rank r's heads sit at columns [i*w + lo, i*w + hi) of every block i,
so loading reads k column slices (Q, K and V of the rank's heads), never the
fused block by thirds.

Loading: every rank opens the files (safetensors slices are lazy: only the rows
and columns asked for are read), converts to the model's dtype, and zero-fills
the padded vocabulary rows. float16, float32, float64 and bfloat16 files load
(bfloat16, which NumPy lacks, is widened to float32 exactly: its bits are the
upper half of a float32's).

Saving writes the unpadded tensors under "transformer." names in the model's
dtype, the tied head once (transformers ties lm_head to wte on load). The
header is computed from the config alone, so the TP ranks of DP replica 0 write
their bytes into one pre-sized file in parallel (positioned writes) wherever a
slab is a few contiguous runs of the file (row-split weights, the vocabulary,
biases); column-split weights are gathered to TP rank 0 in blocks of rows and
written from there. No rank ever holds more than one block of one tensor beyond
its own slabs. The folder must be on a filesystem all writing ranks share;
files are written under temporary names and renamed into place.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import numpy as np

from mpisplit.models.config import GPTConfig
from mpisplit.nn.module import Parameter
from mpisplit.runtime.backend import get_array_module, resolve_dtype, to_numpy
from mpisplit.runtime.errors import agree
from mpisplit.runtime.files import fsync_dir

if TYPE_CHECKING:  # the GPT class is passed in: gpt.py imports this file
    from mpisplit.models.gpt import GPT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PREFIX = "transformer."
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's bos and eos token, in its 50257-token vocabulary

# safetensors dtype codes <-> numpy. BF16 has no numpy dtype and is widened on read.
_READ_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": None}
_WRITE_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's tanh approximation, both names
# Parameters stored fused in the file: the view's last two axes are the file's last axis.
_FUSED = ("attn.c_attn.weight", "attn.c_attn.bias")
# Runs of contiguous file bytes a slab may be written as directly; more -> gather rows.
_MAX_RUNS = 4
_GATHER_BLOCK_BYTES = 32 << 20  # per rank, per gathered block of rows


# ----------------------------------------------------------------------------- layout


def hf_shape(name: str, p: Parameter) -> tuple[int, ...]:
    """Shape of parameter `name` in the Hugging Face file (the logical, unpadded shape)."""
    g = p.global_shape
    return g[:-2] + (g[-2] * g[-1],) if name.endswith(_FUSED) else g


def _slab_extent(p: Parameter) -> tuple[int, int]:
    """(lo, real): the slab's first global row along split_axis and how many of its rows are
    logical (the rest is vocabulary padding). Replicated: (0, 0)."""
    if p.split_axis is None:
        return 0, 0
    lo, hi = p.slab_bounds()
    return lo, max(0, min(hi, p.global_shape[p.split_axis]) - lo)


# ----------------------------------------------------------------------------- config


def read_config(folder: str | os.PathLike) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 folder; ValueError for anything GPT-2 it is not."""
    return _parse_config(Path(folder))[0]


def _require(ok: bool, message: str) -> None:
    # A malformed file is a ValueError whatever the field, wrong JSON types included.
    if not ok:
        raise ValueError(message)


def _number(cfg: dict, key: str, default: float, where: Path) -> float:
    value = cfg.get(key, default)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{where}: {key} must be a number, got {value!r}",
    )
    return float(value)


def read_json_object(path: Path) -> dict:
    """A folder's JSON file holding an object (config.json, ...); clear errors for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {str(path.parent)!r} is not a Hugging Face model folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    _require(isinstance(data, dict), f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _parse_config(folder: Path) -> tuple[GPTConfig, bool]:
    """(GPTConfig, tie_word_embeddings) of config.json in `folder`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder {str(folder)!r} does not exist")
    path = folder / CONFIG_NAME
    cfg = read_json_object(path)
    if cfg.get("model_type") != "gpt2":
        raise ValueError(
            f"{path}: model_type {cfg.get('model_type')!r} (architectures {cfg.get('architectures')}); "
            f"GPT-2 (model_type 'gpt2') and the Llama family (model_type 'llama', 'qwen2', 'mistral') load"
        )
    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(f"{path}: activation_function {act!r} is not supported; expected one of {list(_TANH_GELUS)}")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in cfg]
    if "n_positions" not in cfg and "n_ctx" not in cfg:
        missing.append("n_positions")
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    config = GPTConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"] if "n_positions" in cfg else cfg["n_ctx"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"], n_embd=cfg["n_embd"],
        dropout=_number(cfg, "resid_pdrop", 0.1, path),  # transformers' default; one rate for all three sites
        layer_norm_eps=_number(cfg, "layer_norm_epsilon", 1e-5, path),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    n_inner = cfg.get("n_inner")
    if n_inner is not None and n_inner != 4 * config.n_embd:
        raise ValueError(f"{path}: n_inner {n_inner!r} is not 4 * n_embd = {4 * config.n_embd}; unsupported")
    for key, supported in (
        ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
    ):
        if cfg.get(key, supported) != supported:
            raise ValueError(f"{path}: {key}={cfg[key]} is not supported (only {supported})")
    return config, bool(cfg.get("tie_word_embeddings", True))


def weights_dtype(folder: str | os.PathLike) -> np.dtype:
    """The dtype the folder's wte.weight is stored in when a model can compute in it
    (float32, float64), else float32 (float16 and bfloat16 widen exactly to float32)."""
    files = _WeightFiles(Path(folder))
    for key in (PREFIX + "wte.weight", "wte.weight"):
        if key in files.entries:
            code = files.entries[key][1]
            return np.dtype(np.float64 if code == "F64" else np.float32)
    raise ValueError(f"the weights in {folder} lack tensor 'wte.weight'")


def hf_config(config: GPTConfig, dtype: np.dtype) -> dict[str, Any]:
    """config.json contents for a GPTConfig, as transformers' GPT2Config names them."""
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": np.dtype(dtype).name,
    }
    if config.vocab_size == GPT2_EOS + 1:  # the GPT-2 BPE vocabulary: <|endoftext|> is its last id
        out["bos_token_id"] = out["eos_token_id"] = GPT2_EOS
    return out


# ---------------------------------------------------------------------------- reading


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from None
    _require(isinstance(header, dict), f"{path} is not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    return header, 8 + n


class _WeightFiles:
    """The tensors of a Hugging Face folder: names, shapes, dtypes, and lazy slices."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
        if single.is_file():
            files = {single: None}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = {folder / _plain_name(f, index): None for f in sorted(set(weight_map.values()))}
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index} is not a valid safetensors index: {exc!r}") from None
        elif (folder / "pytorch_model.bin").exists():
            raise FileNotFoundError(
                f"{folder} holds pytorch_model.bin but no {WEIGHTS_NAME}; convert it to safetensors "
                f"(transformers: model.save_pretrained(out, safe_serialization=True))"
            )
        else:
            raise FileNotFoundError(f"{single} is missing (and there is no {WEIGHTS_INDEX_NAME})")
        # name -> (file, safetensors dtype code, shape, absolute byte offset of its data)
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for path in files:
            header, data_start = _read_header(path)
            for name, e in header.items():
                try:
                    code, shape, begin = e["dtype"], tuple(int(s) for s in e["shape"]), int(e["data_offsets"][0])
                except (KeyError, TypeError, ValueError, IndexError):
                    raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {e!r}") from None
                self.entries[name] = (path, code, shape, data_start + begin)
        self._handles: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self.entries)

    def file_of(self, name: str) -> Path:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def check_float(self, name: str) -> None:
        path, code, _, _ = self.entries[name]
        if code not in _READ_DTYPES:
            raise ValueError(f"tensor {name!r} in {path} has dtype {code}; expected one of {list(_READ_DTYPES)}")

    def read(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
        """tensor[index] (the whole tensor if None) as a numpy array; BF16 widened to float32."""
        path, code, shape, offset = self.entries[name]
        if code == "BF16":
            bits = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=shape)
            part = np.array(bits if index is None else bits[index])
            return (part.astype(np.uint32) << 16).view(np.float32)
        from safetensors import safe_open

        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="numpy")
            handle = self._handles[path]
            out = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: cannot read tensor {name!r}: {exc}") from None
        return np.asarray(out)

    def close(self) -> None:
        self._handles.clear()


def _plain_name(name: Any, where: Path) -> str:
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"{where} names file {name!r}, which is not a plain file name in the folder")
    return name


def _read_slab(files: _WeightFiles, key: str, name: str, p: Parameter) -> np.ndarray:
    """This rank's slab of `key` in the layout of p.data (file dtype), padding rows zero."""
    if p.split_axis is None:
        return files.read(key, None).reshape(p.shape)
    ax = p.split_axis
    lo, real = _slab_extent(p)
    file_ndim = len(hf_shape(name, p))
    out = None
    if file_ndim == len(p.view_shape):  # the file holds the view itself: one slice
        index = tuple(slice(lo, lo + real) if i == ax else slice(None) for i in range(file_ndim))
        if real:
            part = files.read(key, index)
            out = np.zeros(p.view_shape, dtype=part.dtype)
            out[tuple(slice(0, real) if i == ax else slice(None) for i in range(file_ndim))] = part
        else:
            out = np.zeros(p.view_shape, dtype=np.float32)
    else:
        # Fused: view (..., k, w) is file (..., k*w), split on the last view axis: one read
        # per block i, columns [i*w + lo, i*w + lo + real) (Q, K, V of this rank's heads).
        assert ax == len(p.view_shape) - 1 and file_ndim == ax, (name, p.view_shape)
        k, w = p.global_shape[-2], p.global_shape[-1]
        lead = (slice(None),) * (file_ndim - 1)
        blocks = [files.read(key, (*lead, slice(i * w + lo, i * w + lo + real))) for i in range(k)]
        out = np.zeros(p.view_shape, dtype=blocks[0].dtype)
        out[..., :real] = np.stack(blocks, axis=-2)
    return out.reshape(p.shape)


def from_pretrained(cls: type[GPT], folder: str | os.PathLike, grid: Any, dtype: Any = "float32") -> GPT:
    """A `cls` (GPT) over `grid` holding the weights of a Hugging Face GPT-2 folder, each rank
    reading only its slices. Collective over grid.world: any failure raises on every rank."""
    folder = Path(folder)
    with agree(grid.world):
        model_dtype = resolve_dtype(dtype)
        config, tied = _parse_config(folder)
        config.validate(grid.tp)
        files = _WeightFiles(folder)
    model = cls(config, grid, dtype=model_dtype, init=False)
    with agree(grid.world):
        try:
            _load_weights(model, files, tied)
        finally:
            files.close()
    return model


def _load_weights(model: GPT, files: _WeightFiles, tied: bool) -> None:
    params = dict(model.named_parameters())
    prefix = PREFIX if PREFIX + "wte.weight" in files.entries else ""
    where = f"the weights in {files.folder}"
    wanted = {prefix + name for name in params}
    missing = sorted(wanted - set(files.entries))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{where} lack tensor(s) {missing[:3]}{more}")
    ignored = {"lm_head.weight"}
    extra = sorted(
        n for n in set(files.entries) - wanted - ignored if not n.endswith((".attn.bias", ".attn.masked_bias"))
    )
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ValueError(
            f"{where} include tensors {extra[:3]}{more} that a GPT-2 language model with "
            f"n_layer={model.config.n_layer} does not have"
        )
    for name, p in params.items():
        key = prefix + name
        files.check_float(key)
        expect = hf_shape(name, p)
        if files.shape(key) != expect:
            raise ValueError(
                f"tensor {key!r} in {files.file_of(key)} has shape {files.shape(key)}; "
                f"config.json implies {expect}"
            )
    head = "lm_head.weight"
    if head in files.entries:
        files.check_float(head)
        wte_key = prefix + "wte.weight"
        if files.shape(head) != files.shape(wte_key):
            raise ValueError(
                f"lm_head.weight has shape {files.shape(head)}, wte.weight {files.shape(wte_key)}: "
                f"untied output heads are not supported"
            )
    elif not tied:
        raise ValueError("config.json sets tie_word_embeddings=false but there is no lm_head.weight")
    for name, p in params.items():
        slab = _read_slab(files, prefix + name, name, p)
        # Each rank checks its own rows of a stored head against its rows of wte.
        if (
            name == "wte.weight" and head in files.entries
            and not np.array_equal(_read_slab(files, head, name, p), slab, equal_nan=True)
        ):
            raise ValueError("lm_head.weight differs from wte.weight: untied output heads are not supported")
        xp = get_array_module(p.data)
        p.data[...] = xp.asarray(slab.astype(p.dtype, copy=False))


# ---------------------------------------------------------------------------- writing


def _runs(p: Parameter, offset: int) -> list[tuple[int, tuple[int | slice | EllipsisType, ...]]] | None:
    """The slab's contiguous byte runs in the file: (file byte offset, index into the slab
    viewed as p.view_shape) per run, or None when there are more than _MAX_RUNS.
    Replicated tensors are one run."""
    item = p.dtype.itemsize
    if p.split_axis is None:
        return [(offset, (...,))]
    ax = p.split_axis
    lo, real = _slab_extent(p)
    if real == 0:
        return []
    g = p.global_shape  # view coordinates; the file is the same bytes in row-major order
    outer = int(np.prod(g[:ax], dtype=np.int64))  # runs: one per index of the axes before ax
    if outer > _MAX_RUNS:
        return None
    inner = int(np.prod(g[ax + 1:], dtype=np.int64))  # elements per row of the split axis
    runs: list[tuple[int, tuple[int | slice | EllipsisType, ...]]] = []
    for o in range(outer):
        first = (o * g[ax] + lo) * inner
        idx = np.unravel_index(o, g[:ax]) if ax else ()
        runs.append((offset + first * item, (*(int(i) for i in idx), slice(0, real))))
    return runs


def _header(model: GPT) -> tuple[bytes, list[tuple[str, Parameter, int]], int]:
    """The safetensors header (length prefix and JSON padded to 8 bytes), (name, param,
    absolute data offset) per tensor, and the file's size. Computed from the config alone."""
    code = _WRITE_CODES[model.dtype]
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    layout, pos = [], 0
    for name, p in model.named_parameters():
        shape = hf_shape(name, p)
        nbytes = int(np.prod(shape, dtype=np.int64)) * p.dtype.itemsize
        entries[PREFIX + name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        layout.append((name, p, pos))
        pos += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data section aligned to 8 bytes
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, [(n, p, start + off) for n, p, off in layout], start + pos


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).data.cast("B")  # a memoryview
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _gather_rows(p: Parameter, offset: int, tp_comm: Any, fd: int, error: Exception | None) -> Exception | None:
    """Gather a column-split weight to TP rank 0 in blocks of leading rows and write each block
    (contiguous in the file) there. Collective over tp_comm; fd is used on TP rank 0 only.
    Returns the first write error (`error` if one was already met: nothing is written then)."""
    mpi, t, rank = tp_comm.mpi, tp_comm.size, tp_comm.rank
    ax, g = p.split_axis, p.global_shape
    assert ax is not None and ax > 0, (p.split_axis, g)
    view = to_numpy(p.data).reshape(p.view_shape)  # (n0, ..., this rank's part of axis ax, ...)
    file_row_bytes = int(np.prod(g[1:], dtype=np.int64)) * p.dtype.itemsize
    step = max(1, _GATHER_BLOCK_BYTES // max(1, view[0].nbytes))
    for r0 in range(0, g[0], step):
        r1 = min(g[0], r0 + step)
        send = np.ascontiguousarray(view[r0:r1])
        recv = np.empty((t, *send.shape), dtype=send.dtype) if rank == 0 else None
        mpi.Gather(send, recv, root=0)
        if recv is not None and error is None:  # TP rank 0
            full = np.concatenate(list(recv), axis=ax)  # TP rank order is column order along ax
            full = full[tuple(slice(0, s) for s in (r1 - r0, *g[1:]))]  # drop padding, if any
            try:
                _pwrite_all(fd, full, offset + r0 * file_row_bytes)
            except OSError as exc:
                error = exc
    return error


def save_pretrained(model: GPT, folder: str | os.PathLike) -> None:
    """Write `folder`/config.json and `folder`/model.safetensors (Hugging Face GPT-2 layout,
    "transformer." names, unpadded, the model's dtype). Collective over model.grid.world."""
    grid = model.grid
    world = grid.world
    folder = Path(folder)
    header, layout, size = _header(model)
    tmp_name = config_tmp = fd = None
    with agree(world):
        if world.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            tmp_name = f".{WEIGHTS_NAME}.tmp-{secrets.token_hex(6)}"
            try:
                with open(folder / tmp_name, "wb") as f:
                    f.write(header)
                    f.truncate(size)  # every writer then fills its own byte ranges
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                (folder / tmp_name).unlink(missing_ok=True)
                raise
    tmp_name = world.mpi.bcast(tmp_name, root=0)
    tmp = folder / tmp_name
    writer = grid.dp_rank == 0
    try:
        with agree(world):
            if writer:
                try:
                    fd = os.open(tmp, os.O_WRONLY)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{tmp} created by world rank 0 is not visible here; "
                        f"save_pretrained needs a folder on a filesystem all ranks share"
                    ) from None
        # Past this point no rank leaves the loop early: a failed write is remembered and
        # reported after the last collective, so the other ranks never wait in a Gather alone.
        error: Exception | None = None
        if fd is not None:  # a writer (DP replica 0): each opened the file, or all ranks raised
            for _, p, offset in layout:
                runs = _runs(p, offset)
                if runs is None:
                    error = _gather_rows(p, offset, grid.tp_comm, fd, error)
                    continue
                if error is not None or (p.split_axis is None and grid.tp_rank != 0):
                    continue
                try:
                    view = to_numpy(p.data).reshape(p.view_shape)
                    for at, index in runs:
                        _pwrite_all(fd, view[index], at)
                except OSError as exc:
                    error = exc
        with agree(world):
            if fd is not None:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    fd = None
            if error is not None:
                raise error
        with agree(world):
            if world.rank == 0:
                config = json.dumps(hf_config(model.config, model.dtype), indent=2) + "\n"
                config_tmp = folder / f".{CONFIG_NAME}.tmp-{tmp_name.rsplit('-', 1)[1]}"
                with open(config_tmp, "w", encoding="utf-8") as f:
                    f.write(config)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, folder / WEIGHTS_NAME)
                os.replace(config_tmp, folder / CONFIG_NAME)
                fsync_dir(folder)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if world.rank == 0:
            for leftover in (tmp, config_tmp):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
        raise
