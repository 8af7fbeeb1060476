"""Failure handling: no hangs, no lost work (mpisplit.runtime.faults and train.py).

Unit tests of the pieces, then train.py launched with `mpiexec -n 2` / `-n 4` and failures
injected through MPISPLIT_FAULT: an exception on one rank, a rank killed with SIGKILL, SIGTERM
on one rank or on the launcher, ranks that disagree, a NaN, a hang. Each launch has a
wall-clock limit; the tests launch their own jobs, so they run in the world-size-1 pass only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from _corpus import docs_text_file
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

from mpisplit.runtime import faults
from mpisplit.runtime.faults import (
    ConsistencyError,
    Fault,
    FaultInjector,
    JobGuard,
    StopRequest,
    Watchdog,
    check_consistent,
    format_ranks,
    parse_faults,
)
from mpisplit.training.checkpoint import CheckpointReader, latest_checkpoint

pytestmark = pytest.mark.skipif(
    MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs; runs at world size 1"
)

TRAIN = str(Path(REPO_ROOT) / "train.py")
TINY = [
    "--layers",
    "1",
    "--hidden",
    "16",
    "--heads",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-every",
    "0",
    "--sample-len",
    "0",
    "--no-progress",
    "--log-every",
    "1",
]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docs_text_file(tmp_path_factory.mktemp("data"))


def _descendants_by_marker(marker: str) -> list[int]:
    """Processes whose environment carries MPISPLIT_TEST_RUN=marker (ranks, proxies, launcher)."""
    found = []
    needle = f"MPISPLIT_TEST_RUN={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class Job:
    """One mpiexec launch; `finish()` returns (returncode, stdout, stderr, seconds)."""

    def __init__(
        self, cmd: list[str], env_extra: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self.marker = uuid.uuid4().hex
        env = clean_mpi_env()
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["MPISPLIT_TEST_RUN"] = self.marker
        env.pop(faults.FAULT_ENV, None)
        env.update(env_extra or {})
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def finish(self, timeout: float) -> tuple[int, str, str, float]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = self.proc.communicate()
            pytest.fail(f"job did not end within {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
        return self.proc.returncode, out, err, time.monotonic() - self.start

    def kill_all(self) -> None:
        for pid in _descendants_by_marker(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()

    def leftovers(self, grace: float = 5.0) -> list[int]:
        """Processes of this job still alive `grace` s after the launcher ended (then killed)."""
        deadline = time.monotonic() + grace
        while (alive := _descendants_by_marker(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive:
            self.kill_all()
        return alive


def train_cmd(n: int, out: Path, corpus: Path, *extra: str, steps: int = 10) -> list[str]:
    return [
        mpiexec_path(),
        "-n",
        str(n),
        sys.executable,
        TRAIN,
        *TINY,
        "--data",
        str(corpus),
        "--steps",
        str(steps),
        "--out",
        str(out),
        *extra,
    ]


def run_train(
    n: int,
    out: Path,
    corpus: Path,
    *extra: str,
    fault: str = "",
    steps: int = 10,
    timeout: float = 60,
) -> tuple[int, str, str, float]:
    env = {faults.FAULT_ENV: fault} if fault else {}
    job = Job(train_cmd(n, out, corpus, *extra, steps=steps), env)
    try:
        return job.finish(timeout)
    finally:
        assert not job.leftovers(), "processes of the job outlived the launcher"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def verify_checkpoint(out: Path, step: int) -> None:
    """`latest` names step-{step}, complete and with matching checksums (CheckpointReader.verify)."""
    path = latest_checkpoint(out)
    assert path is not None and path.name == f"step-{step:08d}", path
    with CheckpointReader(path) as reader:
        assert reader.step == step
        reader.verify()


# --------------------------------------------------------------------------- unit tests


def test_parse_faults_reads_every_kind_and_key() -> None:
    spec = (
        "raise@rank=1,step=3; hang@rank=0,step=2; sleep@seconds=0.5; kill@rank=2,step=5;"
        "signal@step=4,sig=SIGUSR1; nan@step=4; inf@rank=1,step=2,target=loss; raise@error=value"
    )
    assert parse_faults(spec) == [
        Fault("raise", rank=1, step=3),
        Fault("hang", rank=0, step=2),
        Fault("sleep", seconds=0.5),
        Fault("kill", rank=2, step=5),
        Fault("signal", step=4, sig="USR1"),
        Fault("nan", step=4),
        Fault("inf", rank=1, step=2, target="loss"),
        Fault("raise", error="value"),
    ]
    assert parse_faults("") == [] and parse_faults(" ; ") == []


@pytest.mark.parametrize(
    "spec, words",
    [
        ("explode@step=1", "unknown fault 'explode'"),
        ("raise@rank=-1", "rank must be an integer >= 0"),
        ("raise@step=0", "step must be an integer >= 1"),
        ("raise@step=x", "step must be an integer >= 1, got 'x'"),
        ("raise@when=3", "unknown key 'when'"),
        ("raise@step=1,step=2", "distinct key=value"),
        ("sleep@step=2", "sleep needs seconds > 0"),
        ("signal@sig=KILL", "sig must be one of"),
        ("nan@target=weights", "target must be one of"),
    ],
)
def test_parse_faults_rejects_bad_specs(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match="MPISPLIT_FAULT") as info:
        parse_faults(spec)
    assert words in str(info.value) and spec.split(";")[0] in str(info.value)


def test_injector_filters_by_rank_and_step() -> None:
    inj = FaultInjector(parse_faults("raise@rank=1,step=3;inf@step=2,target=loss"), rank=1)
    inj.before_step(2)  # nothing due
    with pytest.raises(RuntimeError, match="rank 1 raises before step 3"):
        inj.before_step(3)
    assert inj.poison_loss(1, 2.5) == 2.5 and inj.poison_loss(2, 2.5) == math.inf
    other = FaultInjector(parse_faults("raise@rank=1,step=3"), rank=0)
    assert not other
    other.before_step(3)
    assert not FaultInjector.from_env(0, environ={})


def test_format_ranks() -> None:
    assert format_ranks([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert format_ranks([3]) == "3" and format_ranks([]) == ""


class FakeComm:
    """allgather returns preset per-rank values: first the digests, then the parts."""

    def __init__(self, parts_per_rank: list[dict]) -> None:
        self.parts = parts_per_rank
        self.calls = 0

    def Get_size(self) -> int:
        return len(self.parts)

    def allgather(self, value: object) -> list:
        import hashlib

        self.calls += 1
        if self.calls == 1:
            return [
                hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()
                for p in self.parts
            ]
        return [json.loads(json.dumps(p)) for p in self.parts]


def test_check_consistent_names_keys_and_ranks() -> None:
    base = {"configuration": {"--seed": 1, "--tp": 2}, "code": {"mpisplit/ops.py": "a" * 64}}
    ranks = [json.loads(json.dumps(base)) for _ in range(4)]
    ranks[2]["configuration"]["--seed"] = 7
    ranks[3]["code"]["mpisplit/ops.py"] = "b" * 64
    comm = FakeComm(ranks)
    with pytest.raises(ConsistencyError) as info:
        check_consistent(comm, **ranks[0])
    text = str(info.value)
    assert "configuration --seed: 1 on ranks 0-1,3; 7 on rank 2" in text
    assert "code mpisplit/ops.py: aaaaaaaaaaaa on ranks 0-2; bbbbbbbbbbbb on rank 3" in text
    assert "--tp" not in text  # keys that agree are not mentioned
    same = FakeComm([base, base])
    check_consistent(same, **base)
    assert same.calls == 1  # agreement costs one small all-gather


def test_check_consistent_at_one_rank_is_silent() -> None:
    check_consistent(MPI.COMM_SELF, anything={"x": 1})


def test_stop_request_records_the_first_signal_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(("SIGUSR1", "SIGTERM"))
    try:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # handlers run between bytecodes
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_job_guard_on_one_rank() -> None:
    guard = JobGuard(MPI.COMM_SELF, save_every_seconds=0.05, signals=())
    try:
        first = guard.agree(1, finite=True)
        assert not first.stop and not first.nonfinite and not first.save_due
        time.sleep(0.06)
        due = guard.agree(2, finite=False)
        assert due.save_due and due.nonfinite
        guard.saved()
        assert not guard.agree(3).save_due
        assert guard.failed_everywhere()
    finally:
        guard.close()


def test_watchdog_report_when_every_rank_waits(tmp_path: Path) -> None:
    """No rank missing: the same call and step on every rank (messages stopped: the network) is
    told apart from different calls (mismatched collectives); the ranks are grouped by host."""
    dog = Watchdog(tmp_path, rank=0, size=3, timeout=60.0, run_id="run1", abort=lambda: None)
    where = "mpisplit/parallel/comm.py:189 (_allreduce_flat)"
    try:
        dog.beat(7)
        texts = []
        for other in (where, "mpisplit/parallel/comm.py:201 (bcast)"):
            for r, host in ((1, "h1"), (2, "h2")):
                rec = {"run": "run1", "rank": r, "host": host, "pid": r, "step": 7, "in_mpi": True,
                       "where": where if r == 1 else other, "time": time.time()}
                (tmp_path / f"rank-{r:05d}.json").write_text(json.dumps(rec))
            texts.append(dog.report(61.0, where)[0])
    finally:
        dog.stop()
    assert "every rank waits in the same MPI call after step 7" in texts[0] and "lost network link" in texts[0]
    assert "at different steps or calls (mismatched collectives?)" in texts[1]
    assert f"waiting ranks: 0 on {socket.gethostname()}, 1 on h1, 2 on h2" in texts[0]


def test_watchdog_report_names_missing_ranks(tmp_path: Path) -> None:
    aborted = []
    dog = Watchdog(
        tmp_path, rank=0, size=4, timeout=60.0, run_id="run1", abort=lambda: aborted.append(1)
    )
    try:
        now = time.time()
        records = {
            1: {
                "step": 7,
                "in_mpi": True,
                "where": "mpisplit/comm.py:164 (_allreduce_flat)",
                "time": now,
            },
            2: {
                "step": 7,
                "in_mpi": False,
                "where": "train.py:300 (_train)",
                "idle": 61.0,
                "time": now,
            },
            3: {"step": 6, "in_mpi": True, "where": "x", "time": now - 3600},  # silent for an hour
        }
        for r, rec in records.items():
            rec.update(run="run1", rank=r, host="node7", pid=100 + r)
            (tmp_path / f"rank-{r:05d}.json").write_text(json.dumps(rec))
        text, lowest = dog.report(61.0, "mpisplit/comm.py:164 (_allreduce_flat)")
    finally:
        dog.stop()
    assert lowest  # rank 0 is the lowest of the waiting ranks 0 and 1
    assert "missing ranks: 2-3" in text and f"waiting ranks: 0 on {socket.gethostname()}, 1 on node7" in text
    assert (
        "rank 2 (host node7, pid 102): after step 7, outside MPI at train.py:300 (_train)" in text
    )
    assert "rank 3 (host node7, pid 103): after step 6, silent for 3600" in text
    assert not aborted and not (tmp_path / "rank-00000.json").exists()  # stop() removes its file


def test_watchdog_rejects_bad_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive number of seconds, got 0"):
        Watchdog(tmp_path, rank=0, size=1, timeout=0, run_id="x")


def test_thread_location_of_a_frame_without_a_line(monkeypatch) -> None:
    """CPython 3.11+ gives f_lineno None between instructions that have no line: the location is
    then the function's first line (it was a TypeError inside linecache that stopped the
    watchdog, and the job's hang went unreported)."""
    import types

    code = test_thread_location_of_a_frame_without_a_line.__code__
    frame = types.SimpleNamespace(f_code=code, f_lineno=None)
    monkeypatch.setattr(sys, "_current_frames", lambda: {123: frame})
    where, in_mpi = faults.thread_location(123)
    assert where.endswith(f"test_faults.py:{code.co_firstlineno} (test_thread_location_of_a_frame_without_a_line)")
    assert not in_mpi


def test_a_wait_for_a_helper_threads_mpi_calls_counts_as_in_mpi(monkeypatch) -> None:
    """A frame inside a function marked waits_for_mpi (the overlapped gradient reduction waiting
    for its helper thread), however deep the innermost frame, is inside MPI, located there."""
    import types

    from mpisplit.runtime.faults.watchdog import waits_for_mpi

    @waits_for_mpi
    def waiting() -> None:
        pass

    marked = types.SimpleNamespace(f_code=waiting.__code__, f_lineno=waiting.__code__.co_firstlineno + 1, f_back=None)
    inner = types.SimpleNamespace(f_code=test_thread_location_of_a_frame_without_a_line.__code__, f_lineno=None,
                                  f_back=marked)
    monkeypatch.setattr(sys, "_current_frames", lambda: {7: inner})
    where, in_mpi = faults.thread_location(7)
    assert in_mpi and "(waiting)" in where
    monkeypatch.setattr(sys, "_current_frames", lambda: {7: types.SimpleNamespace(**{**vars(inner), "f_back": None})})
    assert not faults.thread_location(7)[1]


def test_thread_location_tells_mpi_waits_from_other_work() -> None:
    # The main thread stands in for a rank: a second thread samples it while it sleeps (outside
    # MPI), then until it is seen waiting in Request.Wait, then sends the awaited message.
    import numpy as np

    ident = threading.main_thread().ident
    seen: list[tuple[str, bool]] = []

    def sample() -> None:
        time.sleep(0.05)
        seen.append(faults.thread_location(ident))  # main: in the sleep loop below
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            where, in_mpi = faults.thread_location(ident)
            if in_mpi:
                seen.append((where, in_mpi))
                break
            time.sleep(0.01)
        MPI.COMM_SELF.Send(np.ones(1), dest=0, tag=7)

    buf = np.zeros(1)
    t = threading.Thread(target=sample)
    t.start()
    while not seen:
        time.sleep(0.01)
    request = MPI.COMM_SELF.Irecv(buf, source=0, tag=7)
    request.Wait()
    t.join()
    assert len(seen) == 2, seen
    (sleeping, sleep_in_mpi), (waiting, wait_in_mpi) = seen
    assert "test_thread_location_tells_mpi_waits_from_other_work" in sleeping and not sleep_in_mpi
    assert "test_thread_location_tells_mpi_waits_from_other_work" in waiting and wait_in_mpi
    assert buf[0] == 1.0


# -------------------------------------------------------------------- launched jobs


@pytest.mark.parametrize("n, layout", [(2, []), (4, ["--tp", "2", "--dp", "2"])])
def test_exception_on_one_rank_aborts_every_rank(
    tmp_path: Path, corpus: Path, n: int, layout: list[str]
) -> None:
    # The failing rank raises before step 3's forward pass; the others are then inside the
    # forward's collectives waiting for it. The uncaught-exception hook must abort the job.
    culprit = n - 1
    rc, _, err, seconds = run_train(
        n, tmp_path / "run", corpus, *layout, fault=f"raise@rank={culprit},step=3", timeout=60
    )
    assert rc != 0 and seconds < 30, (rc, seconds)
    assert err.count(f"[rank {culprit}] Traceback (most recent call last):") == 1
    assert (
        f"[rank {culprit}] RuntimeError: injected fault (MPISPLIT_FAULT): rank {culprit} raises before step 3"
        in err
    )
    assert "Traceback" not in err.replace(f"[rank {culprit}] Traceback", "")  # no other rank's
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_value_error_on_one_rank_aborts_instead_of_exiting_alone(
    tmp_path: Path, corpus: Path
) -> None:
    # A ValueError is a "user error" that train.py reports in one line and exits 2 - when every
    # rank raised it. Raised on one rank only, exiting would leave the others in a collective
    # (MPI_Finalize waits for them): the rank must abort the job instead.
    rc, _, err, seconds = run_train(
        2, tmp_path / "run", corpus, fault="raise@rank=1,step=3,error=value"
    )
    assert rc not in (0, 2) and seconds < 30, (rc, seconds)
    assert (
        "[rank 1] ValueError: injected fault (MPISPLIT_FAULT): rank 1 raises before step 3" in err
    )


def test_value_error_on_every_rank_is_one_clean_line(tmp_path: Path, corpus: Path) -> None:
    rc, _, err, _ = run_train(2, tmp_path / "run", corpus, fault="raise@step=3,error=value")
    assert rc == 2, (rc, err)
    assert err.strip() == "error: injected fault (MPISPLIT_FAULT): rank 0 raises before step 3"


@pytest.mark.parametrize("layout", [[], ["--pp", "2", "--layers", "2", "--micro-batches", "2"]], ids=["tp2", "pp2"])
def test_sigkill_of_one_rank_ends_the_job_and_keeps_the_checkpoint(
    tmp_path: Path, corpus: Path, layout: list[str]
) -> None:
    out = tmp_path / "run"
    rc, _, err, seconds = run_train(2, out, corpus, "--save-every", "2", *layout, fault="kill@rank=1,step=5")
    assert rc != 0 and seconds < 60, (rc, seconds, err)
    verify_checkpoint(out, 4)  # the save of step 4 is intact; step 5 never completed
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def _reference(tmp_path: Path, corpus: Path) -> list[dict]:
    rc, _, err, _ = run_train(2, tmp_path / "reference", corpus)
    assert rc == 0, err
    return metrics(tmp_path / "reference")


def _same_numbers(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):  # bitwise: JSON floats round-trip exactly
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"]), x[
            "step"
        ]


def test_sigterm_saves_at_that_step_and_resume_is_exact(tmp_path: Path, corpus: Path) -> None:
    reference = _reference(tmp_path, corpus)

    # SIGTERM reaches one rank only (it sends itself the signal before step 3): every rank
    # stops after step 3, the checkpoint is step 3, the exit status 0.
    out = tmp_path / "one-rank"
    rc, stdout, err, _ = run_train(2, out, corpus, fault="signal@rank=1,step=3,sig=TERM")
    assert rc == 0, err
    assert f"SIGTERM: stopped after step 3, saved {out / 'step-00000003'}" in stdout
    verify_checkpoint(out, 3)
    rc, _, err, _ = run_train(2, out, corpus, "--resume")
    assert rc == 0, err
    _same_numbers(metrics(out), reference)

    # SIGTERM to the launcher mid-training (it passes it to every rank).
    out = tmp_path / "launcher"
    job = Job(train_cmd(2, out, corpus), {faults.FAULT_ENV: "sleep@seconds=0.1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = (
                (out / "metrics.jsonl").read_text().count("\n")
                if (out / "metrics.jsonl").exists()
                else 0
            )
            if lines >= 3:
                break
            time.sleep(0.02)
        job.proc.send_signal(signal.SIGTERM)
        rc, stdout, err, _ = job.finish(60)
    finally:
        assert not job.leftovers()
    assert rc == 0, err
    stopped = metrics(out)[-1]["step"]
    assert 3 <= stopped < 10 and f"SIGTERM: stopped after step {stopped}" in stdout
    verify_checkpoint(out, stopped)
    rc, _, err, _ = run_train(2, out, corpus, "--resume")
    assert rc == 0, err
    _same_numbers(metrics(out), reference)


def test_sigterm_at_pp2_saves_at_that_step_and_resume_is_exact(tmp_path: Path, corpus: Path) -> None:
    """Two pipeline stages: SIGTERM on the last stage's rank stops both after step 3; the
    resumed run repeats the uninterrupted pp = 2 run bitwise."""
    pp2 = ("--pp", "2", "--layers", "2", "--micro-batches", "2")  # one block per stage
    rc, _, err, _ = run_train(2, tmp_path / "reference", corpus, *pp2)
    assert rc == 0, err
    out = tmp_path / "stopped"
    rc, stdout, err, _ = run_train(2, out, corpus, *pp2, fault="signal@rank=1,step=3,sig=TERM")
    assert rc == 0, err
    assert f"SIGTERM: stopped after step 3, saved {out / 'step-00000003'}" in stdout
    verify_checkpoint(out, 3)
    rc, _, err, _ = run_train(2, out, corpus, *pp2, "--resume")
    assert rc == 0, err
    _same_numbers(metrics(out), metrics(tmp_path / "reference"))


def _mpmd(
    first: list[str], second: list[str], cwd: Path | None = None
) -> tuple[int, str, str, float]:
    cmd = [mpiexec_path(), "-n", "1", *first, ":", "-n", "1", *second]
    job = Job(cmd, cwd=str(cwd) if cwd else None)
    try:
        return job.finish(60)
    finally:
        assert not job.leftovers()


def test_ranks_with_different_configuration_code_or_data_refuse_to_train(
    tmp_path: Path, corpus: Path
) -> None:
    base = [sys.executable, TRAIN, *TINY, "--steps", "3"]
    expect = "error: ranks of this job disagree (every rank must run the same configuration, code and data): "

    # configuration: an MPMD launch with two seeds
    out = str(tmp_path / "cfg")
    rc, _, err, seconds = _mpmd(
        [*base, "--data", str(corpus), "--out", out, "--seed", "1"],
        [*base, "--data", str(corpus), "--out", out, "--seed", "2"],
    )
    assert rc == 2 and seconds < 30, (rc, err)
    for r in (0, 1):
        assert f"[rank {r}] {expect}configuration --seed: 1 on rank 0; 2 on rank 1" in err

    # data: the same relative --data path names different files in the ranks' folders
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tiny.txt").write_text(corpus.read_text())
    (b / "tiny.txt").write_text(corpus.read_text()[::-1])
    args = [*base, "--data", "tiny.txt", "--out", str(tmp_path / "data")]
    cmd = [
        mpiexec_path(),
        "-n",
        "1",
        "-wdir",
        str(a),
        *args,
        ":",
        "-n",
        "1",
        "-wdir",
        str(b),
        *args,
    ]
    job = Job(cmd)
    try:
        rc, _, err, _ = job.finish(60)
    finally:
        assert not job.leftovers()
    assert rc == 2, err
    assert f"[rank 1] {expect}data sha256: " in err and "on rank 0; " in err and "on rank 1" in err

    # code: rank 1 runs an edited copy of train.py
    edited = tmp_path / "edited" / "train.py"
    edited.parent.mkdir()
    edited.write_text(Path(TRAIN).read_text() + "\n# edited\n")
    args = [*TINY, "--steps", "3", "--data", str(corpus), "--out", str(tmp_path / "code")]
    rc, _, err, _ = _mpmd([sys.executable, TRAIN, *args], [sys.executable, str(edited), *args])
    assert rc == 2, err
    assert f"[rank 0] {expect}code train.py: " in err
    assert "mpisplit/" not in err  # the package files agree


@pytest.mark.parametrize(
    "fault, layout",
    [("nan@step=5", []), ("inf@rank=1,step=5,target=loss", ["--tp", "1", "--dp", "2"])],
    ids=["nan-gradient-everywhere", "inf-loss-on-one-dp-rank"],
)
def test_nonfinite_values_stop_every_rank_without_saving(
    tmp_path: Path, corpus: Path, fault: str, layout: list[str]
) -> None:
    out = tmp_path / "run"
    rc, _, err, _ = run_train(2, out, corpus, "--save-every", "2", *layout, fault=fault)
    assert rc == faults.EXIT_NONFINITE, (rc, err)
    for r in (0, 1):  # every rank says why, including a rank whose own values were finite
        assert f"[rank {r}] error: non-finite loss or gradient norm at step 5" in err
    assert f"Last good checkpoint: {out / 'step-00000004'}" in err
    verify_checkpoint(out, 4)
    assert not (out / "step-00000005").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_hang_on_one_rank_is_named_and_aborted(tmp_path: Path, corpus: Path) -> None:
    timeout = 3.0
    rc, _, err, seconds = run_train(
        2,
        tmp_path / "run",
        corpus,
        "--collective-timeout",
        str(timeout),
        fault="hang@rank=1,step=3",
    )
    assert rc == faults.EXIT_WATCHDOG and seconds < 30, (rc, seconds, err)
    assert "[rank 0] collective timeout: no progress for" in err
    waited = float(err.split("no progress for ")[1].split(" s")[0])
    assert timeout <= waited < timeout + 2.0  # the watchdog ticks every timeout / 10
    assert (
        "missing ranks: 1\n" in err
        and "outside MPI at mpisplit/runtime/faults/injection.py" in err
        and "(_hang)" in err
    )
    assert f"waiting ranks: 0 on {socket.gethostname()}\n" in err
