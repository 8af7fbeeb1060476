"""One split of a prepared corpus as a token stream: its shards memory-mapped read-only.

`windows(starts, length)` copies the (n, length) windows that begin at the given offsets of
the stream (a window may cross from one shard into the next) and then tells the kernel the
mapped pages it touched are not needed (MADV_DONTNEED; they stay in the page cache), so a
rank's resident memory holds one batch of windows, not the part of the corpus it has read.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

_PAGE = mmap.PAGESIZE


class ShardedTokens:
    def __init__(self, paths: list[Path], dtype: str) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._maps: list[mmap.mmap | None] = []
        self._arrays: list[np.ndarray] = []
        for path in paths:
            with open(path, "rb") as f:
                size = path.stat().st_size
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            if mm is not None and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)  # windows are drawn at random: no read-ahead
            self._maps.append(mm)
            self._arrays.append(np.frombuffer(mm, dtype=self.dtype) if mm is not None else np.empty(0, self.dtype))
        # starts[k]: the stream offset of shard k's first token; starts[-1]: the total
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self._arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64: tokens[s : s + length] for each s."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(np.asarray(starts, dtype=np.int64)):
            if start < 0 or start + length > len(self):
                raise IndexError(f"window [{start}, {start + length}) outside the stream of {len(self)} tokens")
            self._copy(out[row], int(start))
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, step = key.indices(len(self))
        if step != 1:
            raise IndexError("only contiguous slices of a token stream")
        out = np.empty(max(hi - lo, 0), dtype=np.int64)
        if len(out):
            self._copy(out, lo)
        return out

    def _copy(self, dst: np.ndarray, start: int) -> None:
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < len(dst):
            lo = start + done - int(self.starts[k])
            take = min(len(dst) - done, len(self._arrays[k]) - lo)
            dst[done: done + take] = self._arrays[k][lo: lo + take]
            self._release(k, lo, take)
            done += take
            k += 1

    def _release(self, k: int, lo: int, n: int) -> None:
        mm = self._maps[k]
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = (lo * self.dtype.itemsize) // _PAGE * _PAGE
        last = (lo + n) * self.dtype.itemsize
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._arrays = []
        for mm in self._maps:
            if mm is not None:
                mm.close()
        self._maps = []
