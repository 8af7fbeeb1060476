"""The batch scripts in jobs/: syntax, and each one run for real on this machine.

Stand-in sbatch/srun/scontrol/qsub/qstat (tests/_fake_scheduler) come first on PATH; a job runs
at once as one node with 2 ranks (srun becomes `mpiexec -n 2`) and trains the tiny model. The
time-limit tests send the warning signal mid-training and check that the job saves, is requeued
(Slurm) or resubmits itself (PBS), and that the next job continues to the last step with every
step logged exactly once. The tests launch their own jobs: world-size-1 pass only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _corpus import docs_text_file
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

from mpisplit.training.checkpoint import CheckpointReader, latest_checkpoint

pytestmark = pytest.mark.skipif(
    MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs; runs at world size 1"
)

JOBS = Path(REPO_ROOT) / "jobs"
FAKE = Path(REPO_ROOT) / "tests" / "_fake_scheduler"
SCRIPTS = [
    "slurm_cpu.sbatch", "slurm_gpu.sbatch", "slurm_serve.sbatch", "pbs_cpu.pbs", "pbs_gpu.pbs", "workstation.sh"
]  # slurm_serve.sbatch runs under a real Slurm: tests/test_slurm.py
TINY = (
    "--layers 1 --hidden 16 --heads 2 --seq-len 16 --batch-size 4 --eval-every 0 --sample-len 0 "
    "--log-every 1"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docs_text_file(tmp_path_factory.mktemp("data"))


def _processes_with(marker: str) -> list[int]:
    needle = f"MPISPLIT_TEST_RUN={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _gpu_available() -> bool:
    from conftest import gpu_available

    return gpu_available()


class Scheduler:
    """Environment and helpers for one test's jobs."""

    def __init__(self, tmp_path: Path, corpus: Path, steps: int) -> None:
        self.tmp, self.steps = tmp_path, steps
        self.out = tmp_path / "run"
        self.state = tmp_path / "fake"
        self.marker = uuid.uuid4().hex
        env = clean_mpi_env()
        venv_bin = os.path.dirname(sys.executable)
        env.update(
            PATH=os.pathsep.join(
                [str(FAKE), os.path.dirname(mpiexec_path()), venv_bin, env.get("PATH", "")]
            ),
            FAKE_SCHEDULER_DIR=str(self.state),
            FAKE_SCHEDULER_PYTHON=sys.executable,
            FAKE_MPIEXEC=mpiexec_path(),
            FAKE_NTASKS="2",
            FAKE_JOB_TIMEOUT="100",
            PYTHON=sys.executable,
            MPISPLIT_DIR=REPO_ROOT,
            OUT=str(self.out),
            STEPS=str(steps),
            SAVE_MINUTES="0",
            TRAIN_ARGS=f"{TINY} --data {corpus}",
            RANKS_PER_NODE="2",
            CORES_PER_RANK="1",
            OPENBLAS_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            MPISPLIT_TEST_RUN=self.marker,
        )
        env.pop("MPISPLIT_FAULT", None)
        self.env = env

    def run(
        self, cmd: list[str], timeout: float = 100, **extra: str
    ) -> subprocess.CompletedProcess:
        env = {**self.env, **extra}
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_leftovers()
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(
                f"{cmd} did not end within {timeout} s:\n{out[-3000:]}\n{self.logs()[-3000:]}"
            )
        finally:
            deadline = time.monotonic() + 5
            while _processes_with(self.marker) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = self.kill_leftovers()
        assert not left, f"processes outlived the job: {left}"
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")

    def kill_leftovers(self) -> list[int]:
        pids = _processes_with(self.marker)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def records(self, name: str) -> list[dict]:
        path = self.state / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def logs(self) -> str:
        return (
            "".join(p.read_text() for p in sorted(self.state.glob("*.out")))
            if self.state.exists()
            else ""
        )

    def check_finished(self) -> None:
        """Every step logged once, in order; the final checkpoint complete and verified."""
        steps = [
            json.loads(x)["step"] for x in (self.out / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == list(range(1, self.steps + 1)), (steps, self.logs())
        path = latest_checkpoint(self.out)
        assert path is not None and path.name == f"step-{self.steps:08d}"
        with CheckpointReader(path) as reader:
            reader.verify()


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax(name: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(JOBS / name)], check=False, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_every_script_is_tested() -> None:
    assert sorted(p.name for p in JOBS.iterdir() if p.is_file()) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", ["slurm_cpu.sbatch", "slurm_gpu.sbatch"])
def test_slurm_job_trains_and_checkpoints(tmp_path: Path, corpus: Path, name: str) -> None:
    sched = Scheduler(tmp_path, corpus, steps=6)
    gpu_script = name == "slurm_gpu.sbatch"
    device = "gpu" if gpu_script and _gpu_available() else "cpu"
    extra = (
        {"DEVICE": "cpu"} if gpu_script and device == "cpu" else {}
    )  # no GPU here: same layout on CPU
    result = sched.run(["sbatch", str(JOBS / name)], **extra)
    assert result.returncode == 0 and "Submitted batch job 1001" in result.stdout, result.stdout
    assert sched.records("jobs.jsonl") == [
        {"scheduler": "slurm", "job": 1001, "restart": 0, "status": 0}
    ], sched.logs()
    (srun,) = sched.records("srun.jsonl")
    assert {
        "--cpu-bind=cores",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
    } <= set(srun["options"])
    if gpu_script:
        assert {"--gpus-per-node=2", "--gpu-bind=single:1"} <= set(srun["options"])
    cmd = srun["command"]
    assert cmd[:2] == [sys.executable, str(Path(REPO_ROOT) / "train.py")]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert (flags["--tp"], flags["--dp"], flags["--device"]) == ("2", "1", device)
    assert "--save-every-minutes" in cmd and "--collective-timeout" in cmd and "--resume" not in cmd
    sched.check_finished()


def test_slurm_time_limit_saves_requeues_and_resumes(tmp_path: Path, corpus: Path) -> None:
    sched = Scheduler(tmp_path, corpus, steps=30)
    metrics = sched.out / "metrics.jsonl"
    result = sched.run(
        ["sbatch", str(JOBS / "slurm_cpu.sbatch")],
        MPISPLIT_FAULT="sleep@seconds=0.05",  # slow steps, so that the warning lands mid-training
        FAKE_TIME_LIMIT_WHEN=f'test "$(wc -l < {metrics})" -ge 4',
    )
    assert result.returncode == 0
    runs = sched.records("jobs.jsonl")
    assert [(r["restart"], r["status"]) for r in runs] == [(0, 0), (1, 0)], sched.logs()
    first, second = sched.records("srun.jsonl")
    assert "--resume" not in first["command"] and "--resume" in second["command"]
    log = sched.logs()
    assert "SIGUSR1: the ranks save at the next step and stop" in log
    stopped = int(log.split("SIGUSR1: stopped after step ")[1].split(",")[0])
    assert 4 <= stopped < 30
    assert f"requeueing job 1001: it continues from step {stopped}" in log
    assert f"resumed from {sched.out / f'step-{stopped:08d}'} at step {stopped}" in log
    sched.check_finished()


@pytest.mark.parametrize("name", ["pbs_cpu.pbs", "pbs_gpu.pbs"])
def test_pbs_job_trains_and_checkpoints(tmp_path: Path, corpus: Path, name: str) -> None:
    sched = Scheduler(tmp_path, corpus, steps=6)
    extra = {} if name == "pbs_cpu.pbs" or _gpu_available() else {"DEVICE": "cpu"}
    result = sched.run(["qsub", str(JOBS / name)], **extra)
    assert result.returncode == 0 and "1001.fake" in result.stdout
    assert sched.records("jobs.jsonl") == [{"scheduler": "pbs", "job": 1001, "status": 0}], (
        sched.logs()
    )
    assert "tp 2 x dp 1" in sched.logs()
    sched.check_finished()


def test_pbs_walltime_warning_saves_resubmits_and_resumes(tmp_path: Path, corpus: Path) -> None:
    sched = Scheduler(tmp_path, corpus, steps=60)
    result = sched.run(
        ["qsub", str(JOBS / "pbs_cpu.pbs")],
        MPISPLIT_FAULT="sleep@seconds=0.1",
        FAKE_WALLTIME="00:00:08",
        WARN_SECONDS="4",
    )
    assert result.returncode == 0
    runs = sched.records("jobs.jsonl")
    assert [(r["job"], r["status"]) for r in runs] == [(1001, 0), (1002, 0)], sched.logs()
    log = sched.logs()
    stopped = int(log.split("SIGUSR1: stopped after step ")[1].split(",")[0])
    assert 1 <= stopped < 60
    assert f"submitting the next job: it continues from step {stopped}" in log
    assert "job 1002.fake (restart 1)" in log and f"at step {stopped}" in log
    sched.check_finished()


def test_workstation_script_trains_and_continues(tmp_path: Path, corpus: Path) -> None:
    sched = Scheduler(tmp_path, corpus, steps=4)
    script = str(JOBS / "workstation.sh")
    args = [*TINY.split(), "--data", str(corpus), "--no-progress"]
    first = sched.run([script, *args], NP="2", STEPS="4")
    assert first.returncode == 0, first.stdout
    assert "2 rank(s) on" in first.stdout and "tp 2 x dp 1" in first.stdout
    # Run again with more steps: it resumes from the checkpoint of step 4.
    sched.steps = 6
    again = sched.run([script, *args], NP="2", STEPS="6")
    assert again.returncode == 0 and "--resume" in again.stdout.splitlines()[0], again.stdout
    assert f"resumed from {sched.out / 'step-00000004'} at step 4" in again.stdout
    sched.check_finished()
