"""Which KV-cache block holds what: block tables, reference counts and the prefix cache.

The pool (kv_pool.py) holds `num_blocks` blocks of `block_size` positions each. A sequence
owns a block table: its block i holds its positions i*bs .. i*bs + bs - 1. This state is
replicated: every rank makes the same calls in the same order, so the tables agree everywhere
without a message.

Prefix caching: a full block is known by a digest of its tokens chained with the digest of the
block before it (so it names the whole prefix, not only its own tokens). A new sequence whose
first full blocks match cached digests takes those blocks (shared, reference-counted) and
computes only the rest. Only full blocks are shared, and a sequence writes only into its own
last, partial block, so a shared block is never written. A block that no sequence holds stays
cached (its keys and values intact) until a block is needed and none is free: then the least
recently used one is reused and forgotten.

Free blocks are reused last-freed-first, so the blocks a server touches, and so its resident
memory, grow with the tokens it holds at once, not with the pool's size.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

ROOT = b""  # the digest "before" a sequence's first block


def block_digests(tokens: Sequence[int], block_size: int, parent: bytes = ROOT, start: int = 0) -> list[bytes]:
    """The chained digests of the full blocks of `tokens` from block index `start` on
    (`parent`: the digest of block start - 1, ROOT for the first)."""
    out = []
    for lo in range(start * block_size, len(tokens) - block_size + 1, block_size):
        ids = np.asarray(tokens[lo: lo + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
        out.append(parent)
    return out


class BlockManager:
    """Blocks 0 .. num_blocks-1: free, held (by one or more sequences) or cached (held by none,
    content kept for reuse)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs >= 1 block of >= 1 position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._refs = [0] * num_blocks
        self._digest: dict[int, bytes] = {}  # block -> digest, for blocks whose content is known
        self._block: dict[bytes, int] = {}  # digest -> block
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, held by none; least recent first
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, found

    # ------------------------------------------------------------------ counts
    @property
    def available(self) -> int:
        """Blocks a sequence can get now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        return len(self._digest)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def cached_prefix(self, digests: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached run of `digests` from the first (not taken)."""
        if not self.prefix_cache:
            return []
        out = []
        for d in digests:
            block = self._block.get(d)
            if block is None:
                break
            out.append(block)
        return out

    def idle_among(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` nobody holds (taking them makes them unavailable to others)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def count_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def take(self, blocks: Sequence[int]) -> None:
        """Hold cached `blocks` (from cached_prefix) for one more sequence."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1

    def register(self, block: int, digest: bytes) -> None:
        """`block` (held, now full) holds the content `digest` names. When another block already
        holds that content, this one stays unnamed (it is freed, not cached, when released)."""
        if self.prefix_cache and digest not in self._block and block not in self._digest:
            self._block[digest] = block
            self._digest[block] = digest

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks held once each, or None (and nothing taken) when fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # the least recently used cached block: forget its content
                b, _ = self._idle.popitem(last=False)
                del self._block[self._digest.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """One sequence lets go of `blocks` (its table, first block first). Cached blocks nobody
        holds become the most recently used, the table's first block most recent of all: a
        block is useless once the one before it is gone, so the tail goes first."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than held")
            if self._refs[b] == 0:
                if b in self._digest:
                    self._idle[b] = None
                    self._idle.move_to_end(b)
                else:
                    self._free.append(b)

    def check(self) -> None:
        """Every block is exactly one of free, held, idle-cached (a test's leak check)."""
        free, idle = set(self._free), set(self._idle)
        held = {b for b in range(self.num_blocks) if self._refs[b] > 0}
        if free & idle or free & held or idle & held or len(free | idle | held) != self.num_blocks:
            raise AssertionError(f"KV blocks inconsistent: {len(free)} free, {len(idle)} idle, {len(held)} held "
                                 f"of {self.num_blocks}")
