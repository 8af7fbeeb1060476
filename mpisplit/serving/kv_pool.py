"""The paged KV cache's memory: one pool of blocks per layer, sized once at start.

Per layer, v is a (num_blocks, kv_local, block_size, head_size) array in the model's dtype (or
16-bit patterns, `--kv-cache-dtype`: kv_format.py) on its device (NumPy or CuPy), kv_local being the key/value heads this rank holds, and k the same
with each block transposed, (num_blocks, kv_local, head_size, block_size): the attention
kernel computes a block's scores side by side. How
many blocks: `--kv-cache-memory` bytes per rank (or a fraction of the memory available to
each rank), else enough for max_batch full contexts, capped at half the memory available per
rank. blocks.py decides which block holds what.

    PagedKV(model, num_blocks, block_size, fmt=None)
    kv_blocks(model, block_size, memory, max_batch, max_len, fmt=None)   # collective: the same on every rank
"""

from __future__ import annotations

import mmap
import re
import sys
from typing import Any

import numpy as np
from mpi4py import MPI

from mpisplit.runtime.backend import get_array_module
from mpisplit.serving.kv_format import KVFormat, kv_format

DEFAULT_FRACTION = 0.5  # of the memory available per rank, when no size is given
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_memory(text: str) -> int | float:
    """'2GiB', '512MiB', '1.5GB', '800000000' -> bytes (int); '0.3' (below 1) -> a fraction (float)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"a memory size is a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), "
                         f"or a fraction below 1 of the available memory; got {text!r}")
    value = float(m.group(1))
    if unit == "" and 0 < value < 1:
        return value
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


class PagedKV:
    """Keys and values of every layer's local key/value heads, in blocks."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, fmt: KVFormat | None = None) -> None:
        attn = model.h[0].attn
        xp = get_array_module(attn.out_proj.weight.data)
        kv, hs = attn.local_kv_heads, attn.head_size
        zeros = _untouched_zeros if xp is np else xp.zeros
        self.fmt = kv_format(None, model.dtype) if fmt is None else fmt
        self.k = [zeros((num_blocks, kv, hs, block_size), dtype=self.fmt.storage) for _ in model.h]
        self.v = [zeros((num_blocks, kv, block_size, hs), dtype=self.fmt.storage) for _ in model.h]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def block_bytes(model: Any, block_size: int, fmt: KVFormat | None = None) -> int:
        attn = model.h[0].attn
        item = (kv_format(None, model.dtype) if fmt is None else fmt).storage.itemsize
        return 2 * len(model.h) * attn.local_kv_heads * block_size * attn.head_size * item

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v)


def _untouched_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero array on fresh anonymous pages: resident only once written. (np.zeros is calloc,
    which memsets a block reused from the heap: after loading a model, whose freed temporaries
    stay in the heap, it made 3.8 of a 10 GB pool resident before any request.)"""
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def available_bytes(model: Any) -> int:
    """Memory one rank may use: free device memory on a GPU; on the host MemAvailable divided
    among the ranks of this node (sys.maxsize where it cannot be read)."""
    xp = get_array_module(model.h[0].attn.out_proj.weight.data)
    if xp.__name__ == "cupy":
        return int(xp.cuda.runtime.memGetInfo()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return sys.maxsize
    node = model.grid.world.mpi.Split_type(MPI.COMM_TYPE_SHARED)
    ranks = node.Get_size()
    node.Free()
    return free // ranks


def kv_blocks(model: Any, block_size: int, memory: float | None, max_batch: int, max_len: int,
              fmt: KVFormat | None = None) -> int:
    """How many blocks the pool holds (the smallest over the ranks, so every rank agrees).
    Collective over the model's world."""
    if block_size < 1:
        raise ValueError(f"--kv-block-size must be >= 1, got {block_size}")
    per_block = PagedKV.block_bytes(model, block_size, fmt)
    if isinstance(memory, int):
        budget = memory
    else:
        fraction = DEFAULT_FRACTION if memory is None else memory
        budget = int(fraction * available_bytes(model))
        if memory is None:
            budget = min(budget, max_batch * -(-max_len // block_size) * per_block)
    blocks = model.grid.world.mpi.allreduce(budget // per_block, op=MPI.MIN)
    if blocks < 1:
        raise ValueError(f"the KV cache memory ({budget} bytes per rank) holds no block of {block_size} "
                         f"positions ({per_block} bytes): give more with --kv-cache-memory")
    return int(blocks)
