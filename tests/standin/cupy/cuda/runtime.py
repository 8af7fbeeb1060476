"""cupy.cuda.runtime of the stand-in: device count and properties, memory, synchronisation."""

from __future__ import annotations

from cupy import _state


class CUDARuntimeError(RuntimeError):
    pass


def getDeviceCount() -> int:
    return _state.settings.devices


def _check(device: int) -> None:
    if not 0 <= device < _state.settings.devices:
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: device {device} of {_state.settings.devices}")


def getDeviceProperties(device: int) -> dict:
    _check(device)
    return {"name": b"Stand-in GPU (NumPy)", "totalGlobalMem": _state.settings.memory,
            "pciDomainID": 0, "pciBusID": 0x10 + device, "pciDeviceID": 0,
            "multiProcessorCount": 1, "major": 9, "minor": 0}


def getDevice() -> int:
    return _state.settings.device


def setDevice(device: int) -> None:
    _check(device)
    _state.settings.device = device


def memGetInfo() -> tuple[int, int]:
    s = _state.settings
    return max(0, s.memory - s.used), s.memory


def deviceSynchronize() -> None:
    _state.synchronize_all()


def runtimeGetVersion() -> int:
    return 12040


def driverGetVersion() -> int:
    return 12040
