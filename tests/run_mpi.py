"""Run the test suite under MPI at several world sizes.

    python tests/run_mpi.py                       # sizes 1, 2 and 4
    python tests/run_mpi.py --sizes 1 2 3 4 -x -k comm

Size 1 runs every test (`pytest --with-mpi`), in pytest-xdist's workers (one per core, each
file whole in one worker, each worker MPI's singleton) where pytest-xdist is installed and
`--workers 1` does not ask for one `mpiexec -n 1 pytest`; larger sizes run the MPI-marked tests
(`pytest --only-mpi`). Arguments this script does not know go to pytest; test paths among them
replace the default `tests`. Each size has a wall-clock limit: on expiry the whole process
group is killed and the size fails. Exit status 0 only when every size passed.

Then the GPU tests (marker `gpu`) run under the CuPy stand-in (tests/standin on PYTHONPATH):
at 1 rank, at 2 ranks once per collective path (MPISPLIT_TEST_COMM staged, mpi, nccl) and at 4
ranks; the passes above leave them out. `--no-standin` skips this (on a GPU node, run the GPU
tests with real CuPy instead: benchmarks/device_check.sh).

Each pass's full output, per rank, is kept in out/test-logs/; the summary lists every failing
test with its first error line and each skip reason once. With CI=true a skip for something CI
installs (a package of the test or ref extras, the real model) fails (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# pytest's closing line, e.g. "136 passed, 2 skipped, 36 deselected in 1.65s".
SUMMARY = re.compile(r"((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s")
COUNT = re.compile(r"(\d+) ([a-z]+)")

# MPICH settings when there are more ranks than cores (a laptop or a 2-core CI box). A rank
# waiting in a collective polls; by default it calls sched_yield every 1000 polls, which on a
# busy Linux box barely gives its core away, so waiting ranks slow down the one that works.
# Heavy yield sleeps (nanosleep) instead. Measured on 2 cores, 4 ranks, under load: the MPI
# tests ran in 20-44 s instead of 33-51 s and burnt 28-31 instead of 37-53 CPU seconds; a
# waiting rank burnt 0.09-0.14 instead of 0.33-0.39 CPU s per s. The price is latency: a
# 16-element Allreduce takes ~0.55 ms instead of 0.04-0.18 ms, so it is for tests only.
MPICH_OVERSUBSCRIBED_ENV = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# The size-1 passes in parallel: pytest-xdist's workers, each test file whole in one worker (its
# module-scoped fixtures, a served model or a Slurm cluster, start once). Many tests wait (a
# server starting, a launcher, a timeout) more than they compute. Two tests that need the same
# machine-wide thing take turns through a lock (tests/_hosts.py's network namespaces).
MAX_WORKERS = 4


def default_workers() -> int:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 1
    return max(1, min(MAX_WORKERS, usable_cores()))


def find_mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        sys.exit("run_mpi.py: no mpiexec (pip install -e '.[mpich]' brings one)")
    return found


def is_hydra(mpiexec: str) -> bool:
    """MPICH's Hydra launcher can write each rank's output to its own file."""
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "HYDRA" in out.stdout


def rank_env(size: int, workers: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    threads = max(1, usable_cores() // (size * workers))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if size * workers > 1:
            env.setdefault(var, str(threads))
    if size > usable_cores():
        for key, value in MPICH_OVERSUBSCRIBED_ENV.items():
            env.setdefault(key, value)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class SizeResult:
    size: int
    returncode: int | None  # None: timed out
    seconds: float
    counts: list[dict[str, int] | None] = field(default_factory=list)  # per rank
    label: str = ""  # the pass, e.g. " (GPU stand-in, nccl)"
    failures: list[str] = field(default_factory=list)  # "FAILED test - first line", any rank
    skips: list[str] = field(default_factory=list)  # "SKIPPED [n] where: reason" of rank 0
    logs: list[str] = field(default_factory=list)  # where each rank's full output was kept

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_counts(text: str) -> dict[str, int] | None:
    found = None
    for line in text.splitlines():
        m = SUMMARY.search(line)
        if m:
            found = {kind: int(n) for n, kind in COUNT.findall(m.group(1))}
    if found is not None and "error" in found:
        found["errors"] = found.pop("error")
    return found


def without_mpi_information(text: str) -> str:
    """The output less pytest-mpi's "MPI Information" section (library build details), which
    stands between the test report and pytest's closing line."""
    lines = text.rstrip("\n").splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if "MPI Information" in line and line.startswith("="):
            skipping = True
            continue
        if skipping and SUMMARY.search(line):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


STANDIN = REPO / "tests" / "standin"
# (world size, MPISPLIT_TEST_COMM) of the stand-in passes.
STANDIN_PASSES = ((1, "auto"), (2, "staged"), (2, "mpi"), (2, "nccl"), (4, "auto"))


def standin_env(comm: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join([str(STANDIN), *([path] if path else [])]),
            "MPISPLIT_TEST_COMM": comm}


def run_size(
    size: int, mpiexec: str, hydra: bool, pytest_args: list[str], timeout: float,
    extra_env: dict[str, str] | None = None, label: str = "", workers: int = 1,
) -> SizeResult:
    mode = ["--with-mpi"] if size == 1 else ["--only-mpi"]
    workers = workers if size == 1 else 1
    with tempfile.TemporaryDirectory(prefix=f"run_mpi_{size}_") as logdir:
        redirect = []
        if hydra and workers == 1:
            redirect = [
                "-outfile-pattern",
                os.path.join(logdir, "rank%r.out"),
                "-errfile-pattern",
                os.path.join(logdir, "rank%r.out"),
            ]
        if workers > 1:  # pytest-xdist's workers, each MPI's singleton (one rank, no launcher)
            cmd = [sys.executable, "-m", "pytest", *mode, "-n", str(workers), "--dist", "loadfile"]
        else:
            cmd = [mpiexec, *redirect, "-n", str(size), sys.executable, "-m", "pytest", *mode]
        # -v: every test's outcome on its own line in the kept log, so that a size killed at its
        # time limit (no closing summary) still names its failed tests; the console shows the rest.
        cmd += ["-v", "-rfEs", "-p", "no:cacheprovider", *pytest_args]
        if size == 1 and not label:
            cmd.append("--durations=25")  # the slowest tests, at the end of the kept log (CI's time budget)
        shown = " ".join(f"{k}={v}" for k, v in (extra_env or {}).items())
        print(f"--- size {size}{label}: {shown + ' ' if shown else ''}{' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        env = {**rank_env(size, workers), **(extra_env or {})}
        logged = hydra or workers > 1
        out = open(os.path.join(logdir, "rank0.out"), "w") if workers > 1 else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out,
                                    stderr=None if out is None else subprocess.STDOUT)
        finally:
            if out is not None:
                out.close()
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = None
        except BaseException:
            kill_group(proc)
            raise
        seconds = time.perf_counter() - start
        result = SizeResult(size, returncode, seconds, label=label)
        if logged:
            for rank in range(size):
                path = Path(logdir) / f"rank{rank}.out"
                text = path.read_text(errors="replace") if path.exists() else ""
                result.logs.append(keep_log(text, size, label, rank))
                counts = parse_counts(text)
                result.counts.append(counts)
                result.failures += [line for line in short_summary(text, ("FAILED ", "ERROR "))
                                    if line not in result.failures]
                if returncode is None:  # killed: no summary, but -v named each failure as it came
                    result.failures += [f"FAILED {nodeid_of(m)} (seen before the time limit)"
                                        for m in map(VERBOSE_FAIL.match, text.splitlines()) if m]
                if rank == 0:
                    result.skips = short_summary(text, ("SKIPPED ",))
                failed = counts is None or counts.get("failed", 0) or counts.get("errors", 0)
                # Rank 0 always; another rank only when it tells something rank 0 may not.
                if rank == 0 or (failed and not result.ok):
                    print(f"--- size {size}{label}, rank {rank} output (passed tests left out):")
                    print(without_passed(without_mpi_information(text)), flush=True)
    return result


LOG_DIR = REPO / "out" / "test-logs"  # each pass's full output per rank, kept after the run


def keep_log(text: str, size: int, label: str, rank: int) -> str:
    name = f"size{size}{re.sub(r'[^a-z0-9]+', '-', label.lower()).rstrip('-')}-rank{rank}.log"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / name).write_text(text)
    return str(LOG_DIR / name)



def _verbose_line(outcomes: str) -> re.Pattern[str]:
    """pytest -v's line of one test with one of these outcomes: "tests/x.py::name PASSED [ 12%]",
    or under pytest-xdist "[gw1] [ 12%] PASSED tests/x.py::name" (the test's id: `nodeid_of`)."""
    return re.compile(rf"^(?:(?P<id>\S+::\S.*) ({outcomes})\b.*\[\s*\d+%\]"
                      rf"|\[gw\d+\] \[\s*\d+%\] ({outcomes}) (?P<xdist_id>\S+::\S.*))\s*$")


VERBOSE_PASS = _verbose_line("PASSED|SKIPPED|XFAIL|XPASS|DESELECTED")
VERBOSE_FAIL = _verbose_line("FAILED|ERROR")


def nodeid_of(match: re.Match[str]) -> str:
    return match.group("id") or match.group("xdist_id")


def without_passed(text: str) -> str:
    """pytest -v output less the lines of tests that passed or were skipped (the short summary
    still lists the skips); the kept log has them all."""
    return "\n".join(line for line in text.splitlines() if not VERBOSE_PASS.match(line))


def short_summary(text: str, kinds: tuple[str, ...]) -> list[str]:
    """pytest's short summary lines (-rfEs) of these kinds, e.g. "FAILED tests/x.py::t - msg"."""
    return [line.strip() for line in text.splitlines() if line.startswith(kinds)]


def report_problems(results: list[SizeResult]) -> None:
    """Every failing test with its first error line, then each skip reason once with its count."""
    failures = [(r, line) for r in results for line in r.failures]
    if failures:
        print("=== failing tests (full output per rank: " + str(LOG_DIR) + ")")
        for r, line in failures:
            print(f"size {r.size}{r.label}: {line[:300]}")
    reasons: dict[str, int] = {}
    for r in results:
        for line in r.skips:
            m = re.match(r"SKIPPED \[(\d+)\] [^:]+:\d+: (.*)", line)
            n, why = (int(m.group(1)), m.group(2)) if m else (1, line)
            reasons[why] = reasons.get(why, 0) + n
    if reasons:
        print(f"=== skipped (rank 0, all passes): {sum(reasons.values())}, by reason")
        for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"{n:5d}  {why}")


def describe(result: SizeResult) -> str:
    if result.returncode is None:
        state = "TIMEOUT"
    else:
        state = "passed" if result.ok else f"FAILED (exit {result.returncode})"
    rank0 = result.counts[0] if result.counts else None
    detail = ", ".join(f"{n} {k}" for k, n in rank0.items()) if rank0 else "no summary"
    return f"size {result.size}{result.label}: {state}, rank 0: {detail}, {result.seconds:.1f}s"


def take_sizes(argv: list[str]) -> tuple[list[int] | None, list[str]]:
    """Pull `--sizes N [N ...]` out of argv (only the integers after it), so that pytest
    arguments may follow it directly."""
    sizes: list[int] | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--sizes":
            sizes = []
            i += 1
            while i < len(argv) and argv[i].isdigit():
                sizes.append(int(argv[i]))
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    return sizes, rest


def main(argv: list[str] | None = None) -> int:
    sizes, argv = take_sizes(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        usage="run_mpi.py [--sizes N [N ...]] [--size-timeout S] [pytest arguments]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--size-timeout",
        type=float,
        default=2400.0,
        help="seconds per world size (default 2400: size 1 takes ~10 minutes on 2 idle cores, more "
             "under load); --timeout goes to pytest-timeout",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pytest-xdist workers for the size-1 passes (default: one per usable core, at most "
             f"{MAX_WORKERS}, where pytest-xdist is installed; 1: one pytest under mpiexec -n 1)",
    )
    parser.add_argument("--no-standin", action="store_true",
                        help="skip the GPU tests under the CuPy stand-in (tests/standin)")
    args, pytest_args = parser.parse_known_args(argv)
    if sizes is None:
        sizes = [1, 2, 4]
    if not sizes or any(n < 1 for n in sizes):
        parser.error(f"--sizes needs world sizes >= 1, got {sizes}")
    # Test paths are made absolute (pytest runs in the repository root); none given -> tests.
    has_path = False
    for i, arg in enumerate(pytest_args):
        head, sep, rest = arg.partition("::")
        if not arg.startswith("-") and Path(head).exists():
            pytest_args[i] = str(Path(head).resolve()) + sep + rest
            has_path = True
    if not has_path:
        pytest_args.append("tests")
    mpiexec = find_mpiexec()
    hydra = is_hydra(mpiexec)
    plain = pytest_args if args.no_standin else ["-m", "not gpu", *pytest_args]
    workers = default_workers() if args.workers is None else max(1, args.workers)
    results = [run_size(n, mpiexec, hydra, plain, args.size_timeout, workers=workers) for n in sizes]
    if not args.no_standin:
        for n, comm in STANDIN_PASSES:
            results.append(run_size(n, mpiexec, hydra, ["-m", "gpu", *pytest_args], args.size_timeout,
                                    standin_env(comm), f" (GPU stand-in, {comm})", workers=workers))

    report_problems(results)
    print("=== run_mpi summary")
    for r in results:
        print(describe(r))
    # One closing line over all sizes, counting rank 0's tests; a size that failed or timed out
    # without a failed test on record still counts one failure.
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results:
        rank0 = (r.counts[0] if r.counts else None) or {}
        totals["passed"] += rank0.get("passed", 0)
        totals["skipped"] += rank0.get("skipped", 0)
        worst = max(
            ((c or {}).get("failed", 0) + (c or {}).get("errors", 0) for c in r.counts), default=0
        )
        totals["failed"] += worst if worst or r.ok else 1
    print(
        f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
