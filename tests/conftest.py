"""Shared test setup: per-test timeout defaults, the `gpu` marker, helpers for MPI subprocesses.

Run the suite at several world sizes with `python tests/run_mpi.py`; by hand:
`mpiexec -n 1 python -m pytest --with-mpi tests` (every test) and, for N > 1,
`mpiexec -n N python -m pytest --only-mpi tests` (the MPI tests; pytest-mpi ignores
--only-mpi when --with-mpi is also given).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest

# Environment variables with which a launcher (Hydra/PMI, Open MPI/PMIx) tells a process that
# it is a rank of a job. A test that starts a Python or an mpiexec of its own removes them, or
# the child would try to join the parent's job; user settings (OMPI_MCA_*, PMIX_MCA_*) stay.
_LAUNCHER_ENV_PREFIXES = (
    "PMI_",
    "HYDI_",
    "HYDRA_",
    "MPI_LOCALNRANKS",
    "MPI_LOCALRANKID",
    "PMIX_",
    "OMPI_COMM_WORLD_",
    "OMPI_MCA_orte_",
    "OMPI_MCA_ess",
    "OMPI_MCA_pmix",
    "OMPI_MCA_initial_wdir",
    "OMPI_MCA_shmem_RUNTIME_QUERY_hint",
    "OMPI_UNIVERSE_SIZE",
    "OMPI_FIRST_RANKS",
    "OMPI_APP_CTX_NUM_PROCS",
    "OMPI_NUM_APP_CTX",
    "OMPI_COMMAND",
    "OMPI_ARGV",
    "OMPI_FILE_LOCATION",
)
_KEPT_ENV_PREFIXES = ("PMIX_MCA_",)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA device (skipped otherwise)")
    config.addinivalue_line(
        "markers", "world(sizes=None, divisible_by=1, min_size=1): the world sizes a test applies "
        "to; at other sizes it is deselected (not collected as a skip)")


# ---- layouts: a test runs only at the world sizes it applies to ----------------------------------
# A test that needs, say, tp=3 to divide the world is not run at size 2 or 4, and that is not a
# skip: the collection leaves it out (pytest reports it as deselected), so that the skips CI
# reports are only what could not be checked here.


def world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def world(sizes: tuple[int, ...] | None = None, divisible_by: int = 1,
          min_size: int = 1) -> pytest.MarkDecorator:
    """Mark a test (or a parameter) as applying to these world sizes only."""
    return pytest.mark.world(sizes=sizes, divisible_by=divisible_by, min_size=min_size)


def tp_params(*tps: int) -> list:
    """Parameters tp=... of a test, each applying where tp divides the world size."""
    return [pytest.param(tp, marks=world(divisible_by=tp), id=f"tp{tp}") for tp in tps]


def _applies(item: pytest.Item, size: int) -> bool:
    for mark in item.iter_markers("world"):
        sizes = mark.kwargs.get("sizes")
        if sizes is not None and size not in sizes:
            return False
        if size % mark.kwargs.get("divisible_by", 1) or size < mark.kwargs.get("min_size", 1):
            return False
    mpi = item.get_closest_marker("mpi")  # pytest-mpi's own minimum, e.g. mpi(min_size=2)
    return mpi is None or size >= mpi.kwargs.get("min_size", 1)


def _deselect(config: pytest.Config, items: list[pytest.Item], keep) -> None:
    dropped = [item for item in items if not keep(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if keep(item)]


@functools.cache
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except (ImportError, RuntimeError, OSError):  # no CuPy, no driver, no device
        return False


# ---- no silent skip in CI ------------------------------------------------------------------------
# A skip because something CI installs is missing (a package of the `test` or `ref` extras, the
# real model) would leave a check unrun while CI stays green: with CI=true it is a failure.
# Skips for a layout (a world size a test does not apply to) or a real GPU stay skips.

_MISSING = re.compile(
    r"could not import|no module named|not installed|cannot fetch|need(s)? (the )?"
    r"(torch|transformers|numba|gguf|tokenizers|jinja2|openai|httpx|starlette|uvicorn|matplotlib|accelerate|"
    r"prometheus|lm-eval|hypothesis|the compiled kernels)",
    re.IGNORECASE,
)


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_missing(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and ci_strict() and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if _MISSING.search(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true, and a test was skipped for something CI installs: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_missing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield  # a module-level importorskip skips at collection
    _fail_missing(outcome.get_result())


# Used when neither setup.cfg's [tool:pytest] nor --timeout sets one.
DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--only-mpi", False) and not config.getoption("--with-mpi", False):
        # Under --only-mpi (world sizes > 1 in run_mpi.py) the non-MPI tests already ran at
        # size 1: deselect them rather than report them as skipped on every rank.
        _deselect(config, items, lambda item: item.get_closest_marker("mpi") is not None)
    size = world_size()
    _deselect(config, items, lambda item: _applies(item, size))
    # pytest-timeout's "signal" method (its default) cannot interrupt a rank blocked inside an
    # MPI call, so a hung collective would hang the job: every test uses the "thread" method,
    # which dumps the stacks and exits the process (the launcher then ends the other ranks).
    has_timeout = bool(config.getini("timeout")) or config.getoption("timeout", None) is not None
    for item in items:
        if item.get_closest_marker("timeout") is None:
            if has_timeout:
                item.add_marker(pytest.mark.timeout(method="thread"))
            else:
                item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S, method="thread"))
    _slow_modules_first(items)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not gpu_available():
        skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Test files ordered by the longest per-test timeout they declare, longest first (otherwise
    as collected; a file's tests stay together, in their order): under pytest-xdist's workers
    (tests/run_mpi.py), the long files (a real model served, trained, scored) start first instead
    of leaving one worker busy at the end while the other waits."""

    def declared(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        return float(marker.args[0]) if marker is not None and marker.args else 0.0

    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    longest: dict[str, float] = {}  # in collection order
    for item in items:
        longest[file_of(item)] = max(longest.get(file_of(item), 0.0), declared(item))
    order = {path: i for i, path in enumerate(longest)}
    items.sort(key=lambda item: (-longest[file_of(item)], order[file_of(item)]))


def mpiexec_path() -> str:
    """The mpiexec beside this Python (a venv with the MPICH wheel), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.access(local, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec found")
    return found


def mpiexec_command(n: int) -> list[str]:
    """[mpiexec, options..., -n, n] for a job of n ranks on this machine. Open MPI's launcher
    refuses root and more ranks than cores unless told; MPICH's needs nothing."""
    mpiexec = mpiexec_path()
    version = subprocess.run(
        [mpiexec, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    options = []
    if "Open MPI" in version or "OpenRTE" in version:
        options.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            options.append("--allow-run-as-root")
    return [mpiexec, *options, "-n", str(n)]


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_mpi_env() -> dict[str, str]:
    """os.environ for a child Python or a nested mpiexec: without the launcher's per-rank
    variables, and with this checkout first on PYTHONPATH so the child imports this mpisplit."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(_KEPT_ENV_PREFIXES) or not k.startswith(_LAUNCHER_ENV_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env
