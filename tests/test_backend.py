"""mpisplit.runtime.backend: dtypes, host copies, namespace choice, BLAS thread counts."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
from conftest import clean_mpi_env
from mpi4py import MPI
from threadpoolctl import threadpool_info

from mpisplit.runtime import backend
from mpisplit.runtime.backend import (
    get_array_module,
    is_cupy_array,
    limit_blas_threads,
    local_rank_and_size,
    resolve_dtype,
    to_numpy,
)


class FakeCupyArray:
    """Looks like a CuPy array to the type-module check, without CuPy."""

    __module__ = "cupy._core.core"
    __cuda_array_interface__: ClassVar[dict] = {"shape": (2,), "typestr": "<f8", "data": (0, False)}

    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def get(self) -> np.ndarray:
        return self._values.copy()


class TensorLike:
    def __init__(self, data: object) -> None:
        self.data = data


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("float32", np.float32),
        ("float64", np.float64),
        (np.float32, np.float32),
        (np.dtype("float64"), np.float64),
        ("f4", np.float32),
    ],
)
def test_resolve_dtype_accepts(spec: object, expected: type) -> None:
    assert resolve_dtype(spec) == np.dtype(expected)


@pytest.mark.parametrize("spec", ["int32", "float16", None, "banana", np.int64, "complex128"])
def test_resolve_dtype_rejects(spec: object) -> None:
    with pytest.raises(ValueError, match="unsupported dtype") as info:
        resolve_dtype(spec)
    assert "float32" in str(info.value) and repr(spec) in str(info.value)


def test_to_numpy_numpy_is_identity() -> None:
    x = np.arange(6.0).reshape(2, 3)
    assert to_numpy(x) is x


def test_to_numpy_tensor_like_scalar_list_and_cupy_like() -> None:
    x = np.arange(4, dtype=np.float32)
    assert to_numpy(TensorLike(x)) is x
    np.testing.assert_array_equal(to_numpy(TensorLike(FakeCupyArray(x))), x)
    got = to_numpy(FakeCupyArray(x))
    assert isinstance(got, np.ndarray) and got is not x
    np.testing.assert_array_equal(got, x)
    assert to_numpy(2.5) == np.float64(2.5) and to_numpy(2.5).shape == ()
    np.testing.assert_array_equal(to_numpy([1, 2]), np.array([1, 2]))


def test_is_cupy_array_by_type_module() -> None:
    assert is_cupy_array(FakeCupyArray(np.zeros(2)))
    assert not is_cupy_array(np.zeros(2))
    assert not is_cupy_array(TensorLike(np.zeros(2)))


def test_get_array_module_numpy() -> None:
    x = np.ones(3)
    assert get_array_module(x) is np
    assert get_array_module(x, np.float32(1.0), 2.0, None, TensorLike(x)) is np
    assert get_array_module() is np


def test_get_array_module_mixing_is_type_error() -> None:
    with pytest.raises(TypeError, match="cannot mix NumPy and CuPy") as info:
        get_array_module(np.ones(2), TensorLike(FakeCupyArray(np.ones(2))))
    assert "numpy.ndarray" in str(info.value) and "FakeCupyArray" in str(info.value)


def test_backend_import_does_not_import_cupy() -> None:
    code = (
        "import sys, numpy as np, mpisplit.runtime.backend as b\n"
        "assert b.get_array_module(np.ones(2)) is np\n"
        "b.to_numpy(np.ones(2))\n"
        "assert 'cupy' not in sys.modules, 'cupy imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=clean_mpi_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _blas_thread_counts() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_limit_blas_threads_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BLAS_THREADS_ENV, "2")  # the argument wins over the variable
    assert limit_blas_threads(threads=1) == 1
    counts = _blas_thread_counts()
    assert counts, "NumPy's BLAS not visible to threadpoolctl"
    assert all(n == 1 for n in counts)


def test_limit_blas_threads_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BLAS_THREADS_ENV, "1")
    assert limit_blas_threads(MPI.COMM_SELF) == 1
    assert all(n == 1 for n in _blas_thread_counts())


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_limit_blas_threads_bad_env(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(backend.BLAS_THREADS_ENV, bad)
    with pytest.raises(ValueError, match=backend.BLAS_THREADS_ENV) as info:
        limit_blas_threads(MPI.COMM_SELF)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_limit_blas_threads_bad_argument(bad: object) -> None:
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        limit_blas_threads(MPI.COMM_SELF, threads=bad)  # type: ignore[arg-type]


class _FakeNode:
    def __init__(self, sets: list[list[int]]) -> None:
        self.sets = sets
        self.freed = False

    def allgather(self, mine: list[int]) -> list[list[int]]:
        return self.sets

    def Free(self) -> None:
        self.freed = True


class _FakeComm:
    def __init__(self, node: _FakeNode) -> None:
        self.node = node

    def Get_size(self) -> int:
        return len(self.node.sets)

    def Get_rank(self) -> int:
        return 0

    def Split_type(self, split_type: int, key: int = 0) -> _FakeNode:
        return self.node


@pytest.mark.parametrize(
    "mine, node_sets, expected",
    [
        # No binding: every rank sees all 8 cores; 4 ranks share them -> 8 // 4.
        (range(8), [range(8)] * 4, 2),
        # 3 ranks on 8 cores -> floor(8 / 3).
        (range(8), [range(8)] * 3, 2),
        # More ranks than cores -> at least 1.
        (range(2), [range(2)] * 4, 1),
        # Each rank bound to its own 2 cores: nobody shares -> 2.
        ([0, 1], [[0, 1], [2, 3], [4, 5], [6, 7]], 2),
        # Two ranks bound to the same 4 cores, two elsewhere -> 4 // 2.
        ([0, 1, 2, 3], [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5], [6, 7]], 2),
    ],
)
def test_threads_per_rank_formula(
    monkeypatch: pytest.MonkeyPatch, mine: object, node_sets: list, expected: int
) -> None:
    monkeypatch.delenv(backend.BLAS_THREADS_ENV, raising=False)
    monkeypatch.setattr(backend, "_usable_cores", lambda: set(mine))
    node = _FakeNode([list(s) for s in node_sets])
    assert backend._threads_per_rank(_FakeComm(node)) == expected
    assert node.freed


def test_threads_single_rank_uses_all_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.BLAS_THREADS_ENV, raising=False)
    assert limit_blas_threads(MPI.COMM_SELF) == len(os.sched_getaffinity(0))


@pytest.mark.mpi
def test_local_rank_and_size_on_one_node() -> None:
    world = MPI.COMM_WORLD
    hosts = world.allgather(MPI.Get_processor_name())
    if len(set(hosts)) != 1:
        pytest.skip("ranks on several nodes")
    assert local_rank_and_size(world) == (world.rank, world.size)


@pytest.mark.mpi
def test_limit_blas_threads_default_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.BLAS_THREADS_ENV, raising=False)
    world = MPI.COMM_WORLD
    mine = sorted(os.sched_getaffinity(0))
    same = world.allgather((MPI.Get_processor_name(), mine))
    if len({(h, tuple(c)) for h, c in same}) != 1:
        pytest.skip("needs unbound ranks on one node")
    n = limit_blas_threads(world)
    assert n == max(1, len(mine) // world.size)
    assert all(k == n for k in _blas_thread_counts())


@pytest.mark.gpu
def test_real_cupy_arrays() -> None:
    import cupy

    d = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
    assert is_cupy_array(d) and not is_cupy_array(np.zeros(2))
    assert get_array_module(d) is cupy and get_array_module(TensorLike(d), 1.0) is cupy
    host = to_numpy(d)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(to_numpy(TensorLike(d)), host)
    with pytest.raises(TypeError, match="cannot mix NumPy and CuPy"):
        get_array_module(d, np.zeros(2))
