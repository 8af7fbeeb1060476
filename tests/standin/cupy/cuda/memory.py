"""Device memory of the stand-in: the out-of-memory error and the pool's counters."""

from __future__ import annotations

from cupy import _state


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, free: int) -> None:
        super().__init__(f"Out of memory allocating {size:,} bytes ({free:,} bytes free on the stand-in device).")


class MemoryPool:
    def used_bytes(self) -> int:
        return _state.settings.used

    def free_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return _state.settings.used

    def free_all_blocks(self, stream: object = None) -> None:
        pass

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        if size is not None:
            _state.settings.memory = int(size)

    def get_limit(self) -> int:
        return _state.settings.memory


class PinnedMemoryPool:
    def free_all_blocks(self) -> None:
        pass

    def n_free_blocks(self) -> int:
        return 0
