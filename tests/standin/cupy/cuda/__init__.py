"""cupy.cuda of the stand-in: devices, streams, events, runtime, memory pools, NCCL over MPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cupy import _state
from cupy.cuda import curand, memory, pinned, runtime  # noqa: F401
from cupy.cuda.memory import MemoryPool, OutOfMemoryError, PinnedMemoryPool  # noqa: F401
from cupy.cuda.runtime import CUDARuntimeError  # noqa: F401
from cupy.cuda.stream import Event, Stream, get_current_stream  # noqa: F401

if TYPE_CHECKING:
    from typing_extensions import Self

_pool = MemoryPool()
_pinned_pool = PinnedMemoryPool()


class Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = _state.settings.device if device is None else int(device)
        self._previous: list[int] = []

    def use(self) -> None:
        runtime.setDevice(self.id)

    def synchronize(self) -> None:
        _state.synchronize_all()

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        return runtime.memGetInfo()

    def __enter__(self) -> Self:
        self._previous.append(_state.settings.device)
        self.use()
        return self

    def __exit__(self, *exc: object) -> None:
        runtime.setDevice(self._previous.pop())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (stand-in)>"


def get_device_id() -> int:
    return _state.settings.device


def is_available() -> bool:
    return _state.settings.devices > 0


def get_default_memory_pool() -> MemoryPool:
    return _pool


def get_default_pinned_memory_pool() -> PinnedMemoryPool:
    return _pinned_pool
