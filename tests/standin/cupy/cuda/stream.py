"""Streams and events of the stand-in (what they track: cupy._state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cupy import _state

if TYPE_CHECKING:
    from typing_extensions import Self


class Stream:
    """A CUDA stream: work issued on it is numbered; synchronize() completes it."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self._state = _state.NULL if null else _state.StreamState()

    @classmethod
    def _wrap(cls, state: _state.StreamState) -> Stream:
        self = cls.__new__(cls)
        self._state = state
        return self

    @property
    def ptr(self) -> int:
        return self._state.ptr

    def synchronize(self) -> None:
        _state.host_waits("Stream.synchronize()")
        self._state.complete()

    @property
    def done(self) -> bool:
        self._state.complete()  # the stand-in's work is finished: a query tells the host so
        return True

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        pass  # ordering between streams: work runs at once, nothing to wait for

    def use(self) -> Stream:
        _state.push(self._state)
        return self

    def __enter__(self) -> Self:
        _state.push(self._state)
        return self

    def __exit__(self, *exc: object) -> None:
        _state.pop()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other._state is self._state

    def __hash__(self) -> int:
        return hash(self._state.ptr)

    def __repr__(self) -> str:
        return f"<stand-in {self._state}>"


Stream.null = Stream(null=True)


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self._stream: _state.StreamState | None = None
        self._seq = 0

    def record(self, stream: Any = None) -> None:
        self._stream = _state.current() if stream is None else stream._state
        self._seq = self._stream.issued

    def synchronize(self) -> None:
        _state.host_waits("Event.synchronize()")
        if self._stream is not None:
            self._stream.complete(self._seq)

    @property
    def done(self) -> bool:
        self.synchronize()
        return True


def get_current_stream(device_id: int | None = None) -> Stream:
    return Stream._wrap(_state.current())
