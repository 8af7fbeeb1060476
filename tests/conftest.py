"""Shared test setup: per-test timeout defaults, the `gpu` marker, helpers for MPI subprocesses.

Run the suite at several world sizes with `python tests/run_mpi.py`; one size by hand with
`mpiexec -n N python -m pytest --with-mpi tests` (add --only-mpi for N > 1).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import pytest

# Environment variables with which a launcher (Hydra/PMI) tells a process it is an MPI rank.
# A test that starts its own mpiexec removes them, or the child would join the parent's job.
_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device (skipped otherwise)")


@functools.cache
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


# Used when neither setup.cfg's [tool:pytest] nor --timeout sets one: a rank stuck in a
# collective must end the job (the "thread" method dumps stacks and exits the process).
DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getini("timeout") and config.getoption("timeout", None) is None:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S, method="thread"))
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not gpu_available():
        skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def mpiexec_path() -> str:
    """The mpiexec beside this Python (a venv with the MPICH wheel), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.access(local, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec found")
    return found


def clean_mpi_env() -> dict[str, str]:
    """os.environ without the launcher's per-rank variables, for a nested mpiexec."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
