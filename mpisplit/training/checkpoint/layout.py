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

Every TP rank of DP replica 0 writes its own file in parallel; nothing is gathered
on one rank. Reading at another TP degree takes exactly the rows a rank needs from
whichever files overlap them (safetensors slices are lazy), and zero-fills rows
past the logical length (the padding of the new layout).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.runtime.errors import agree

FORMAT = "mpisplit-checkpoint"
FORMAT_VERSION = 1
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
    """One rank's slab of a tensor.

    `array` holds global indices [start, start + array.shape[split_axis]) along
    `split_axis` (the padded layout; rows >= global_shape[split_axis] are padding
    and are not saved). `global_shape` is the logical, unpadded shape. With
    `split_axis=None` the tensor is replicated and `array.shape == global_shape`.
    """

    array: np.ndarray
    global_shape: tuple[int, ...]
    split_axis: int | None = None
    start: int = 0




def _mpi(comm: Any) -> Any:
    """The mpi4py communicator behind a Communicator (or the mpi4py comm itself)."""
    return getattr(comm, "mpi", comm)


def _agree(comm: Any) -> contextlib.AbstractContextManager[None]:
    """errors.agree over comm (raise on every rank if any raised); comm=None: this process alone."""
    return contextlib.nullcontext() if comm is None else agree(comm)


# ------------------------------------------------------------------- file helpers



def _shard_file_name(tp_rank: int, tp: int) -> str:
    return f"tp{tp_rank:02d}-of-{tp:02d}.safetensors"


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"
