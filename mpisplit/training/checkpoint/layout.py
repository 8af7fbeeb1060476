"""The on-disk layout of sharded, atomic safetensors checkpoints that load at any tensor-parallel degree.

A tensor of logical global shape G is split along `split_axis` (None = replicated)
over the TP ranks; a rank's slab covers global rows [start, start + len) of that
axis in the padded layout the model uses. A checkpoint stores only logical rows:

    root/
      latest                           "step-00000200\\n"
      step-00000200/
        index.json                     schema, shard map, sha256 per file, meta
        tp00-of-04.safetensors         slabs of TP rank 0 (+ every replicated tensor)
        tp01-of-04.safetensors         ...
        dp01-of-02-tp00-of-04.safetensors   pieces of DP rank 1 (see below)

(with pipeline stages every name starts with `ppKK-of-PP-`). Every TP rank of DP replica 0
writes its own file in parallel; nothing is gathered on one rank. Reading at another TP degree
takes exactly the rows a rank needs from whichever files overlap them (safetensors slices are
lazy), and zero-fills rows past the logical length (the padding of the new layout).

Pieces (format version 2). State that the DP ranks hold in parts (a sharded optimizer's
moments and master weights) is stored as pieces: a piece is the elements [lo, hi) of the
C-order flattening of one slab, a 1-D tensor in the file of the DP rank that holds them. The
slab of a split tensor is global rows [start, start + rows) along split_axis, padding rows
included (`rows` is the saving rank's slab length, `stop` its logical end min(start + rows,
G)); the slab of a replicated tensor is the whole tensor. In index.json a piece is a shard
entry with `"elements": [lo, hi]` (and `"rows"` when split); the pieces of a slab tile its
elements exactly once, the slabs tile the split axis as plain slabs do. A tensor is stored
either as plain slabs or as pieces. Version 1 checkpoints (no pieces) read unchanged, and a
checkpoint without pieces is still written as version 1.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.runtime.errors import agree

FORMAT = "mpisplit-checkpoint"
FORMAT_VERSION = 2  # the newest this code writes (2: pieces); READABLE_VERSIONS it reads
READABLE_VERSIONS = (1, 2)
INDEX_NAME = "index.json"
LATEST_NAME = "latest"

# numpy dtype name -> safetensors header dtype code; only these round-trip bitwise.
_DTYPES = {
    "bool": "BOOL",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.old-step-(\d+)-[0-9a-f]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 << 20


@dataclass
class ShardInfo:
    """One rank's slab of a tensor, or one piece of it.

    `array` holds global indices [start, start + array.shape[split_axis]) along
    `split_axis` (the padded layout; rows >= global_shape[split_axis] are padding
    and are not saved). `global_shape` is the logical, unpadded shape. With
    `split_axis=None` the tensor is replicated and `array.shape == global_shape`.

    A piece (`elements=(lo, hi)`): `array` is 1-D, the elements [lo, hi) of the C-order
    flattening of the slab: global rows [start, start + rows) along split_axis (padding
    included), or the whole tensor when replicated. Every DP rank writes its pieces; lo == hi
    is a rank that holds none of the tensor (it still names it: every rank lists the same
    tensors).
    """

    array: np.ndarray
    global_shape: tuple[int, ...]
    split_axis: int | None = None
    start: int = 0
    elements: tuple[int, int] | None = None
    rows: int | None = None


def slab_rows_view(global_shape: tuple[int, ...], axis: int | None, rows: int | None = None) -> tuple[int, int, int]:
    """(outer, rows, inner): a slab of `rows` rows along `axis` seen as a 3-D C-order array,
    the rows in the middle; a replicated tensor (axis None) is (1, 1, size)."""
    if axis is None:
        return 1, 1, int(np.prod(global_shape, dtype=np.int64))
    outer = int(np.prod(global_shape[:axis], dtype=np.int64))
    inner = int(np.prod(global_shape[axis + 1:], dtype=np.int64))
    return outer, int(global_shape[axis] if rows is None else rows), inner


def _mpi(comm: Any) -> Any:
    """The mpi4py communicator behind a Communicator (or the mpi4py comm itself)."""
    return getattr(comm, "mpi", comm)


def _agree(comm: Any) -> contextlib.AbstractContextManager[None]:
    """errors.agree over comm (raise on every rank if any raised); comm=None: this process alone."""
    return contextlib.nullcontext() if comm is None else agree(comm)


# ------------------------------------------------------------------- file helpers


def _shard_file_name(tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1, dp_rank: int = 0, dp: int = 1) -> str:
    """`[ppKK-of-PP-][dpDD-of-NN-]tpTT-of-MM.safetensors`: the stage prefix only at pp > 1, the DP
    prefix only for the pieces of DP ranks > 0 (DP replica 0's file keeps the plain slabs' name)."""
    stage = f"pp{pp_rank:02d}-of-{pp:02d}-" if pp > 1 else ""
    replica = f"dp{dp_rank:02d}-of-{dp:02d}-" if dp_rank > 0 else ""
    return f"{stage}{replica}tp{tp_rank:02d}-of-{tp:02d}.safetensors"


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"
