"""The batch jobs under a real Slurm: jobs/slurm_cpu.sbatch and jobs/slurm_serve.sbatch submitted
with sbatch to a single-host cluster (tests/_slurm.py: munged, slurmctld, slurmd on this machine,
installed with apt when missing), watched through Slurm's own squeue, scontrol and sacct.

    python -m pytest -q tests/test_slurm.py     # as root (installs Slurm when missing)

Reference: train.py run directly under mpiexec with the same flags, uninterrupted (float64
losses bit for bit). Checked: a job trains and checkpoints; `scontrol requeue` and the time
limit's warning signal (sent to the batch shell as Slurm sends it) make it save, requeue and
resume exactly; `scancel` leaves the last checkpoint complete and loadable; a dependency chain
continues one run over several jobs; the server job answers, and `scancel` ends it.
`MPISPLIT_SLURM_TIME_LIMIT=1` adds the warning sent by Slurm's own timer (minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _corpus import docs_text_file
from _procs import processes_with
from _slurm import SlurmCluster, missing
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

from mpisplit.training.checkpoint import CheckpointReader, latest_checkpoint

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="submits its own jobs; world size 1"),
              pytest.mark.timeout(300)]

JOBS = Path(REPO_ROOT) / "jobs"
TINY = ("--layers 1 --hidden 16 --heads 2 --seq-len 16 --batch-size 4 --eval-every 0 --sample-len 0 --log-every 1 "
        "--dtype float64")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docs_text_file(tmp_path_factory.mktemp("data"))


def _env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    env = {**clean_mpi_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "PYTHON": sys.executable,
           "MPISPLIT_DIR": REPO_ROOT, "SAVE_MINUTES": "0", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.path.dirname(mpiexec_path()),
                                    os.environ.get("PATH", "")])}
    env.pop("MPISPLIT_FAULT", None)
    return {**env, **extra}


def submit(cluster: SlurmCluster, cwd: Path, script: str, *options: str, **env: str) -> int:
    done = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--time=10", *options, str(JOBS / script)], cwd=cwd, env=_env(cluster, **env),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0])


def job(cluster: SlurmCluster, job_id: int) -> dict[str, str]:
    """scontrol's record of the job: {"JobState": ..., "Restarts": ..., ...}."""
    text = cluster.run("scontrol", "show", "job", "-o", str(job_id)).stdout
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def wait_for(cluster: SlurmCluster, job_id: int, states: tuple[str, ...] = ENDED, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job(cluster, job_id)
        if record.get("JobState") in states:
            return record
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not in {states} after {timeout} s: {job(cluster, job_id)}\n{cluster.logs()}")


def accounted(cluster: SlurmCluster, job_id: int) -> list[str]:
    """sacct's states of the job's runs (from the job-completion record: one line per run)."""
    out = cluster.run("sacct", "--completion", "-n", "-P", "-j", str(job_id), "-o", "jobid,state").stdout
    return [line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == str(job_id)]


def release_requeued(cluster: SlurmCluster, job_id: int, timeout: float = 120) -> None:
    """Slurm holds a requeued job for about two minutes (Reason=BeginTime): start it now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job(cluster, job_id)
        if record.get("JobState") == "PENDING" and record.get("Restarts", "0") != "0":
            assert record.get("Reason") in ("BeginTime", "None", "Priority", "Resources"), record
            # slurmd launches a requeued job only with a credential made after (in whole seconds)
            # the one of its last run was revoked; a release within that second is refused ("Job
            # already killed, do not launch batch job") and the job fails. Slurm's own hold of two
            # minutes never meets it; two seconds are enough.
            time.sleep(2)
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return
        time.sleep(0.3)
    pytest.fail(f"job {job_id} was not requeued within {timeout} s: {job(cluster, job_id)}")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def reference(tmp: Path, corpus: Path, steps: int) -> list[tuple[int, float]]:
    """The same run, uninterrupted, under mpiexec."""
    out = tmp / f"reference-{steps}"
    subprocess.run([mpiexec_path(), "-n", "2", sys.executable, str(Path(REPO_ROOT) / "train.py"), *TINY.split(),
                    "--data", str(corpus), "--steps", str(steps), "--tp", "2", "--dp", "1", "--no-progress",
                    "--out", str(out)], env=_env_plain(), check=True, capture_output=True, timeout=120)
    return losses(out)


def _env_plain() -> dict[str, str]:
    env = {**clean_mpi_env(), "OPENBLAS_NUM_THREADS": "1"}
    env.pop("MPISPLIT_FAULT", None)
    return env


def _train_env(out: Path, corpus: Path, steps: int, **extra: str) -> dict[str, str]:
    return {"OUT": str(out), "STEPS": str(steps), "TRAIN_ARGS": f"{TINY} --data {corpus}", **extra}


def wait_for_steps(out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"{out} did not log {n} steps within {timeout} s")


def test_job_trains_and_checkpoints(cluster, corpus, tmp_path):
    job_id = submit(cluster, tmp_path, "slurm_cpu.sbatch", **_train_env(tmp_path / "run", corpus, 6))
    record = wait_for(cluster, job_id)
    assert record["JobState"] == "COMPLETED" and record["NumTasks"] == "2", (record, cluster.logs())
    assert accounted(cluster, job_id) == ["COMPLETED"]
    assert losses(tmp_path / "run") == reference(tmp_path, corpus, 6)
    with CheckpointReader(latest_checkpoint(tmp_path / "run")) as reader:
        reader.verify()


def _slow(**extra: str) -> dict[str, str]:
    """Steps slowed to 0.1 s, so that a signal lands mid-training."""
    return {"MPISPLIT_FAULT": "sleep@seconds=0.1", **extra}


def _check_resumed(out: Path, tmp: Path, corpus: Path, steps: int, stopped_at: int) -> None:
    """Every step logged once, with the uninterrupted run's losses; the final checkpoint verified."""
    assert 0 < stopped_at < steps
    assert losses(out) == reference(tmp, corpus, steps)
    path = latest_checkpoint(out)
    assert path is not None and path.name == f"step-{steps:08d}"
    with CheckpointReader(path) as reader:
        reader.verify()


def _stopped_at(log: str, what: str) -> int:
    return int(log.split(f"SIG{what}: stopped after step ")[1].split(",")[0])


def test_scontrol_requeue_saves_and_resumes_exactly(cluster, corpus, tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "slurm_cpu.sbatch", **_train_env(out, corpus, 40, **_slow()))
    wait_for_steps(out, 4)
    cluster.run("scontrol", "requeue", str(job_id))
    release_requeued(cluster, job_id)
    record = wait_for(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (tmp_path / f"mpisplit-cpu-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log, cluster.logs())
    assert accounted(cluster, job_id)[-1] == "COMPLETED" and len(accounted(cluster, job_id)) == 2
    _check_resumed(out, tmp_path, corpus, 40, _stopped_at(log, "TERM"))


def test_time_limit_warning_saves_requeues_and_resumes(cluster, corpus, tmp_path):
    """The warning of `#SBATCH --signal=B:USR1@120`, sent to the batch shell by Slurm (`scancel
    --batch --signal USR1`, as slurmctld does at the limit): the script's own requeue."""
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "slurm_cpu.sbatch", **_train_env(out, corpus, 40, **_slow()))
    wait_for_steps(out, 4)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    release_requeued(cluster, job_id)
    record = wait_for(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (tmp_path / f"mpisplit-cpu-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log, cluster.logs())
    stopped = _stopped_at(log, "USR1")
    assert f"requeueing job {job_id}: it continues from step {stopped}" in log
    _check_resumed(out, tmp_path, corpus, 40, stopped)


@pytest.mark.skipif(os.environ.get("MPISPLIT_SLURM_TIME_LIMIT") != "1",
                    reason="Slurm's own timer takes minutes: MPISPLIT_SLURM_TIME_LIMIT=1 runs it")
@pytest.mark.timeout(900)
def test_time_limit_by_slurms_timer(cluster, corpus, tmp_path):
    """--time=2 with the warning 90 s before: slurmctld itself signals (30 s in, give or take its
    timer's period), the job requeues itself, waits out Slurm's hold of a requeued job (about two
    minutes), and finishes with the uninterrupted run's losses: about 4 minutes."""
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "slurm_cpu.sbatch", "--time=2", "--signal=B:USR1@90",
                    **_train_env(out, corpus, 200, **_slow(MPISPLIT_FAULT="sleep@seconds=0.2")))
    record = wait_for(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=840)
    log = (tmp_path / f"mpisplit-cpu-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1, (record, log)
    _check_resumed(out, tmp_path, corpus, 200, _stopped_at(log, "USR1"))




def test_scancel_leaves_the_last_checkpoint_loadable(cluster, corpus, tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, tmp_path, "slurm_cpu.sbatch", **_train_env(out, corpus, 400, **_slow()))
    wait_for_steps(out, 4)
    cluster.run("scancel", str(job_id))
    record = wait_for(cluster, job_id)
    assert record["JobState"] == "CANCELLED", record
    assert accounted(cluster, job_id) == ["CANCELLED"]
    assert "SIGTERM: stopped after step" in (tmp_path / f"mpisplit-cpu-{job_id}.out").read_text()
    assert not processes_with(str(out))
    path = latest_checkpoint(out)
    assert path is not None and int(path.name.split("-")[1]) >= 4
    with CheckpointReader(path) as reader:
        reader.verify()


def test_dependency_chain_continues_one_run(cluster, corpus, tmp_path):
    """The README's long-run recipe: jobs chained with --dependency=afterok, each going further."""
    out = tmp_path / "run"
    first = submit(cluster, tmp_path, "slurm_cpu.sbatch", **_train_env(out, corpus, 4))
    second = submit(cluster, tmp_path, "slurm_cpu.sbatch", f"--dependency=afterok:{first}",
                    **_train_env(out, corpus, 8))
    assert wait_for(cluster, second)["JobState"] == "COMPLETED"
    assert accounted(cluster, first) == ["COMPLETED"] and accounted(cluster, second) == ["COMPLETED"]
    log = (tmp_path / f"mpisplit-cpu-{second}.out").read_text()
    assert "--resume" in log
    assert losses(out) == reference(tmp_path, corpus, 8)


def test_server_job_answers_and_scancel_ends_it(cluster, corpus, tmp_path):
    openai = pytest.importorskip("openai")
    run = tmp_path / "model"
    subprocess.run([sys.executable, str(Path(REPO_ROOT) / "train.py"), *TINY.split(), "--data", str(corpus),
                    "--steps", "2", "--no-progress", "--out", str(run)], env=_env_plain(), check=True,
                   capture_output=True, timeout=120)
    job_id = submit(cluster, tmp_path, "slurm_serve.sbatch", HOST="127.0.0.1", PORT="0",
                    SERVE_ARGS=f"--ckpt {run} --model-name tiny")
    wait_for(cluster, job_id, ("RUNNING",) + ENDED)
    output = tmp_path / f"mpisplit-serve-{job_id}.out"
    deadline = time.monotonic() + 120
    while "serving 'tiny' on http://" not in (output.read_text() if output.exists() else ""):
        assert time.monotonic() < deadline and job(cluster, job_id)["JobState"] == "RUNNING", (
            output.read_text() if output.exists() else "", cluster.logs())
        time.sleep(0.3)
    url = output.read_text().split("serving 'tiny' on ")[1].split()[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60)
    answer = client.completions.create(model="tiny", prompt="The ", max_tokens=5, temperature=0)
    assert answer.choices[0].text and answer.usage.completion_tokens == 5
    cluster.run("scancel", str(job_id))
    record = wait_for(cluster, job_id)
    assert record["JobState"] == "CANCELLED", record
    assert "server stopped" in output.read_text() and not processes_with(str(run))
