"""The GPU doors end to end: train.py and `mpisplit serve` with --device gpu on every collective
path, against the same commands with --device cpu.

Runs where `cupy` imports (tests/run_mpi.py's stand-in pass puts tests/standin on PYTHONPATH;
on a GPU node, real CuPy). References: the CPU run of the same layout with the NumPy kernels
(MPISPLIT_KERNELS=numpy: the formulas the device runs), its losses and gradient norms from
metrics.jsonl - bit for bit under the stand-in in float64 and float32; on a real GPU within
1e-10 relative in float64 and 1e-5 in float32 (gradient norms ten times that); 1e-5 (1e-4)
under --amp, whose device sums float16 embedding-gradient rows in float32 where the host rounds
at every addition; the CPU
server's greedy text and logprobs through the openai client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _serving import Server, serve_env
from conftest import clean_mpi_env, mpiexec_command
from test_serve import client

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
BASE = ["--steps", "3", "--layers", "2", "--hidden", "64", "--heads", "4", "--seq-len", "32",
        "--batch-size", "4", "--eval-every", "1000", "--log-every", "1", "--no-progress", "--no-plot",
        "--sample-len", "0"]
LAYOUTS = {  # name: (ranks, arguments)
    "float64 tp2": (2, ["--tp", "2", "--dtype", "float64"]),
    "float32 tp2": (2, ["--tp", "2", "--dtype", "float32"]),
    "amp float16": (2, ["--tp", "2", "--dtype", "float32", "--amp", "float16"]),
    "pp2 tp2": (4, ["--pp", "2", "--tp", "2", "--micro-batches", "2", "--dtype", "float64"]),
    "tp2 sequence parallel": (2, ["--tp", "2", "--sequence-parallel", "--dtype", "float64"]),
    "llama, one kv head": (2, ["--tp", "2", "--arch", "llama", "--kv-heads", "1", "--dtype", "float64"]),
    "dp2 sharded optimizer": (2, ["--tp", "1", "--dp", "2", "--shard-optimizer", "--dtype", "float64"]),
}
PATHS = ["staged", "mpi", "nccl"]


def standin() -> bool:
    import cupy

    return bool(getattr(cupy, "standin", False))


def env() -> dict[str, str]:
    e = clean_mpi_env()
    e["MPISPLIT_KERNELS"] = "numpy"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = "1"
    return e


def train(ranks: int, out: Path, device: str, *args: str) -> list[tuple[float, float]]:
    cmd = [*mpiexec_command(ranks), sys.executable, str(REPO / "train.py"), "--device", device,
           *BASE, *args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "stream-order violation" not in done.stderr, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def assert_same(got: list, want: list, exact: bool, rtol: float = 1e-6) -> None:
    assert len(got) == len(want)
    if exact:
        assert got == want
    else:
        for (lg, ng), (lw, nw) in zip(got, want):
            assert abs(lg - lw) <= rtol * abs(lw) and abs(ng - nw) <= 10 * rtol * abs(nw), (got, want)


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """The CPU reference of each layout, run once."""
    root = tmp_path_factory.mktemp("cpu")
    cache: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in cache:
            ranks, args = LAYOUTS[name]
            cache[name] = train(ranks, root / name.replace(" ", "_").replace(",", ""), "cpu", *args)
        return cache[name]

    return get


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_on_the_gpu_gives_the_cpu_losses(tmp_path, cpu_runs, layout, path) -> None:
    ranks, args = LAYOUTS[layout]
    got = train(ranks, tmp_path / "gpu", "gpu", "--comm", path, *args)
    # --amp: the device adds float16 embedding-gradient rows in float32 (scatter_add), the host's
    # np.add.at rounds at every addition: losses part in the sixth digit, gradient norms in the fifth.
    # On a real GPU cuBLAS sums in another order: float64 parts in the last digits, float32 in the sixth.
    amp = "--amp" in args
    rtol = 1e-5 if amp else (1e-10 if "float64" in args else 1e-5)
    assert_same(got, cpu_runs(layout), exact=standin() and not amp, rtol=rtol if amp or not standin() else 0.0)


def test_checkpoints_move_between_gpu_and_cpu(tmp_path) -> None:
    """3 steps on one device, resumed to 6 on the other (both ways): the 6 losses of one run."""
    args = ["--tp", "2", "--dtype", "float64", "--save-every", "3"]
    six = ["--steps", "6"]
    want = train(2, tmp_path / "cpu", "cpu", *args, *six)
    for first, second in (("gpu", "cpu"), ("cpu", "gpu")):
        out = tmp_path / f"{first}-{second}"
        train(2, out, first, *args)
        got = train(2, out, second, *args, *six, "--resume")
        assert_same(got, want, exact=standin())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "run"
    train(2, out, "cpu", "--tp", "2", "--dtype", "float64")
    return out


def _answers(url: str) -> list[tuple]:
    c = client(url)
    name = c.models.list().data[0].id
    out = []
    for prompt in ("The ", "def main(", "import os\n"):
        r = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
        out.append((r.choices[0].text, list(r.choices[0].logprobs.token_logprobs)))
    return out


@pytest.mark.parametrize(("ranks", "path"), [(1, "auto"), (2, "staged"), (2, "mpi"), (2, "nccl")])
def test_serving_on_the_gpu_answers_as_the_cpu_server(trained, ranks, path) -> None:
    common = ["--ckpt", str(trained), "--dtype", "float64", "--batch-invariant"]
    e = serve_env()
    e["MPISPLIT_KERNELS"] = "numpy"
    with Server(ranks, common, env=e) as cpu:
        want = _answers(cpu.url)
    with Server(ranks, [*common, "--device", "gpu", "--comm", path], env=e) as gpu:
        got = _answers(gpu.url)
        assert any("GPU 0" in line for line in gpu.log), "".join(gpu.log)
    for (tg, lg), (tw, lw) in zip(got, want):
        assert tg == tw
        assert max(abs(a - b) for a, b in zip(lg, lw)) <= 1e-9, (lg, lw)
    assert all(len(lw) == 10 for _, lw in want)


def test_the_standin_is_on_the_path_of_the_children() -> None:
    """The child processes import the same cupy as this one (PYTHONPATH is inherited)."""
    import cupy

    code = "import cupy; print(getattr(cupy, 'standin', False))"
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == str(bool(getattr(cupy, "standin", False)))
    assert os.environ.get("PYTHONPATH", "") or not standin()
