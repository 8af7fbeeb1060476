"""Ranks on separate network hosts: network namespaces on a bridge (tests/_hosts.py), so that ranks
of different hosts reach one another over TCP through veth links, never through shared memory.

    python -m pytest -q tests/test_hosts.py      # as root

Reference: the same job on one host (mpiexec -n N, shared memory). Every communicator here has
two ranks, and a sum of two numbers does not depend on its order, so training is equal bit for
bit in float64 whatever algorithm MPI picks for the network (at three ranks or more a
collective's algorithm may change the order of a sum: the host all-reduce ring of
parallel/comm.py keeps one order from 1 MiB up, MPI's own below that may not). Checked too:
the bytes on the links (the traffic really crosses them), MPI's own view of the nodes, and the
placement warning for a tensor-parallel group split over hosts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _corpus import docs_text_file
from _hosts import PREFIX, NetHosts, missing
from _procs import processes_with
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own jobs; world size 1"),
              pytest.mark.timeout(300)]

TINY = ("--layers 2 --hidden 16 --heads 2 --seq-len 16 --batch-size 4 --eval-every 3 --eval-iters 2 --sample-len 0 "
        "--log-every 1 --dtype float64 --steps 6 --no-progress")
PROBE = """
import sys, numpy as np
from mpi4py import MPI
from mpisplit.parallel.placement import node_names
w = MPI.COMM_WORLD
x = np.full(1 << 20, float(w.rank))  # 8 MiB
w.Allreduce(MPI.IN_PLACE, x)
assert (x == sum(range(w.size))).all()
names = node_names(w)
from mpisplit.parallel.comm import Communicator
whole, node = Communicator(w), Communicator(w.Split_type(MPI.COMM_TYPE_SHARED))
choice = (whole.spans_nodes(), whole._ring_allreduces(), node.spans_nodes(), node._ring_allreduces())
if w.rank == 0:
    print("NODES", " ".join(n.split()[0] for n in names))
    print("CHOICE", *choice)
"""


@pytest.fixture(scope="module")
def hosts():
    reason = missing()
    if reason:
        pytest.skip(reason)
    with NetHosts(2) as h:
        yield h


def _env() -> dict[str, str]:
    env = {**clean_mpi_env(), "OPENBLAS_NUM_THREADS": "1", "MPISPLIT_BLAS_THREADS": "1",
           "PYTHONPATH": REPO_ROOT}
    env.pop("MPISPLIT_FAULT", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def on_hosts(hosts: NetHosts, n: int, ppn: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run([mpiexec_path(), *hosts.mpiexec_args(n, ppn), sys.executable, *args], cwd, **NetHosts.ENV)


def on_one_host(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run([mpiexec_path(), "-n", str(n), sys.executable, *args], cwd)


def test_ranks_of_two_hosts_talk_over_the_links(hosts, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    before = [hosts.link_bytes(i) for i in (1, 2)]
    out = on_hosts(hosts, 4, 2, ["probe.py"], tmp_path).stdout
    moved = [hosts.link_bytes(i) - b for i, b in zip((1, 2), before)]
    nodes = out.split("NODES ")[1].split("\n")[0].split()
    assert nodes == ["mpisplit-h1", "mpisplit-h1", "mpisplit-h2", "mpisplit-h2"], out  # MPI sees two nodes
    assert all(m > 8 << 20 for m in moved), moved  # the 8 MiB all-reduce crossed each link
    # large all-reduces: MPI's own over the hosts (it knows the nodes), the ring inside one
    assert out.split("CHOICE ")[1].split()[:4] == ["True", "False", "False", "True"], out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docs_text_file(tmp_path_factory.mktemp("data"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [["--tp", "2", "--dp", "2"], ["--tp", "2", "--dp", "2", "--shard-optimizer"],
                                    ["--tp", "2", "--pp", "2", "--micro-batches", "2"]],
                         ids=["tp-in-host-dp-across", "tp-in-host-dp-across-sharded", "tp-in-host-pp-across"])
def test_training_across_hosts_equals_one_host(hosts, corpus, tmp_path, layout):
    """TP inside each host, DP (or the pipeline's stages) across: the losses, gradient norms and
    validation losses of the one-host run, bit for bit; no placement warning. DP across hosts
    reduces the gradients during backward (--overlap-grads auto), on one host after it."""
    args = [str(Path(REPO_ROOT) / "train.py"), *TINY.split(), "--data", str(corpus), *layout]
    alone = on_one_host(4, [*args, "--out", "one"], tmp_path)
    before = [hosts.link_bytes(i) for i in (1, 2)]
    done = on_hosts(hosts, 4, 2, [*args, "--out", "two"], tmp_path)
    assert all(hosts.link_bytes(i) - b > 64 << 10 for i, b in zip((1, 2), before))  # gradients or activations
    assert "span nodes" not in done.stderr
    overlapped = "DP gradients reduced during backward"
    assert (overlapped in done.stdout) == ("--dp" in layout) and overlapped not in alone.stdout, done.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == 6 and [{k: m[k] for k in m if k not in ("time", "tokens_per_s", "elapsed")} for m in one] == [
        {k: m[k] for k in m if k not in ("time", "tokens_per_s", "elapsed")} for m in two]


def test_a_tp_group_split_over_hosts_is_warned_about(hosts, corpus, tmp_path):
    """One rank per host with --tp 2: the run is right (equal to one host), and rank 0 says that
    each layer's all-reduce crosses the network."""
    args = [str(Path(REPO_ROOT) / "train.py"), *TINY.split(), "--data", str(corpus), "--tp", "2"]
    on_one_host(2, [*args, "--out", "one"], tmp_path)
    done = on_hosts(hosts, 2, 1, [*args, "--out", "two"], tmp_path)
    assert "1 tensor-parallel group(s) span nodes, e.g. ranks [0, 1] on mpisplit-h1 (rank 0), mpisplit-h2 (rank 1)" \
        in done.stderr, done.stderr
    assert [m["loss"] for m in metrics(tmp_path / "one")] == [m["loss"] for m in metrics(tmp_path / "two")]




def _train_until(hosts: NetHosts, corpus: Path, tmp: Path, steps: int) -> tuple[subprocess.Popen, Path]:
    """A 2-host dp 2 x tp 2 run of slow steps (saving every 10), once it has logged `steps` steps."""
    out = tmp / "run"
    env = {**_env(), **NetHosts.ENV, "MPISPLIT_FAULT": "sleep@seconds=0.1"}
    cmd = [mpiexec_path(), *hosts.mpiexec_args(4, 2), sys.executable, str(Path(REPO_ROOT) / "train.py"),
           *TINY.replace("--steps 6", "--steps 5000").split(), "--data", str(corpus), "--tp", "2", "--dp", "2",
           "--save-every", "10", "--collective-timeout", "15", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < steps:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, out


def _ends_within(proc: subprocess.Popen, out: Path, seconds: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job still runs {seconds} s after losing a host")
    deadline = time.monotonic() + max(1.0, seconds - (time.monotonic() - start))
    while processes_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_with(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks outlived the job by {seconds} s: {left}\n{err[-2000:]}"
    return proc.returncode, err, time.monotonic() - start


def _last_checkpoint_loads(out: Path) -> None:
    from mpisplit.training.checkpoint import CheckpointReader, latest_checkpoint

    path = latest_checkpoint(out)
    assert path is not None and int(path.name.split("-")[1]) >= 10
    with CheckpointReader(path) as reader:
        reader.verify()


def test_a_lost_link_ends_the_job(hosts, corpus, tmp_path):
    """Host 2's link goes down mid-training: no message reaches anyone, every rank stalls in the
    same all-reduce; the collective timeout (15 s) ends the job on both hosts within 60 s (the
    ranks of the cut-off host, whose MPI_Abort cannot reach the launcher, exit by themselves),
    naming the stalled call and the ranks of each host; the last checkpoint loads."""
    proc, out = _train_until(hosts, corpus, tmp_path, 15)
    subprocess.run(["ip", "link", "set", f"{PREFIX}v2", "down"], check=True)
    try:
        code, err, _ = _ends_within(proc, out, 60)
    finally:
        subprocess.run(["ip", "link", "set", f"{PREFIX}v2", "up"], check=True)
    assert code != 0, err
    assert "collective timeout" in err and "every rank waits in the same MPI call" in err, err[-3000:]
    assert "on mpisplit-h1" in err and "on mpisplit-h2" in err, err[-3000:]
    _last_checkpoint_loads(out)


def test_a_lost_host_ends_the_job(hosts, corpus, tmp_path):
    """Every rank of host 2 killed mid-training: the launcher ends the job at once (non-zero), no
    rank is left behind, and the last checkpoint loads."""
    proc, out = _train_until(hosts, corpus, tmp_path, 15)
    pids = subprocess.run(["ip", "netns", "pids", f"{PREFIX}2"], capture_output=True, text=True, check=True)
    for pid in pids.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    code, err, seconds = _ends_within(proc, out, 60)
    assert code != 0 and seconds < 60, err
    _last_checkpoint_loads(out)


def test_serving_across_hosts_equals_one_host(hosts, tmp_path):
    """A float64 model served at tp 2 with one rank on each host (the front end on host 1's
    address) answers the openai client with the one-host server's text and logprobs, bit for bit."""
    openai = pytest.importorskip("openai")
    from _serving import Server, serve_env, write_char_checkpoint

    ckpt = write_char_checkpoint(tmp_path / "ckpt")
    answers = []
    for across in (False, True):
        host = hosts.hosts[0] if across else "127.0.0.1"
        server = Server(2, ["--ckpt", str(ckpt), "--dtype", "float64", "--host", host],
                        env={**serve_env(), **(NetHosts.ENV if across else {})})
        if across:
            server.cmd = [mpiexec_path(), *hosts.mpiexec_args(2, 1), *server.cmd[server.cmd.index(sys.executable):]]
        before = hosts.link_bytes(2)
        with server:
            assert server.url.startswith(f"http://{host}:")
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60)
            model = client.models.list().data[0].id
            got = client.completions.create(model=model, prompt="hello ", max_tokens=12, temperature=0, logprobs=3)
            choice = got.choices[0]
            answers.append((choice.text, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
            assert server.stop() == 0
        assert (hosts.link_bytes(2) - before > 16 << 10) == across  # each layer's all-reduce crossed the link
    assert answers[0] == answers[1] and len(answers[0][1]) == 12


@pytest.mark.parametrize("when", ["idle", "mid-stream"])
def test_a_lost_link_ends_the_serving_job(hosts, tmp_path, when):
    """Host 2's link goes down under a tp 2 server (one rank per host), while it waits for
    requests or while it streams a completion: with --collective-timeout 10 the job ends on both
    hosts within 60 s, non-zero, naming what it lost (idle: the keep-alive's silent rank and its
    host; mid-stream: the stalled collective); the client's stream ends instead of hanging."""
    openai = pytest.importorskip("openai")
    from _serving import Server, serve_env, write_char_checkpoint

    ckpt = write_char_checkpoint(tmp_path / "ckpt")
    server = Server(2, ["--ckpt", str(ckpt), "--dtype", "float64", "--host", hosts.hosts[0],
                        "--collective-timeout", "10"],
                    env={**serve_env(), **NetHosts.ENV, "MPISPLIT_FAULT": "sleep@seconds=0.1"})  # 60 tokens: 6 s
    server.cmd = [mpiexec_path(), *hosts.mpiexec_args(2, 1), *server.cmd[server.cmd.index(sys.executable):]]
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="hello ", max_tokens=4, temperature=0).choices[0].text
        stream = None
        if when == "mid-stream":
            stream = client.completions.create(model=model, prompt="h", max_tokens=60, temperature=0, stream=True)
            next(iter(stream))
        subprocess.run(["ip", "link", "set", f"{PREFIX}v2", "down"], check=True)
        try:
            start = time.monotonic()
            if stream is not None:
                with pytest.raises(Exception):  # noqa: B017 - a cut stream: whatever the transport says
                    for _ in stream:
                        pass
            try:
                code = server.proc.wait(timeout=60 - (time.monotonic() - start))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the server still runs 60 s after losing a host\n{''.join(server.log)[-3000:]}")
            deadline = time.monotonic() + 20
            while processes_with(str(ckpt)) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = processes_with(str(ckpt))
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        finally:
            subprocess.run(["ip", "link", "set", f"{PREFIX}v2", "up"], check=True)
    log = "".join(server.log)
    assert code != 0 and not left, (code, left, log[-3000:])
    assert "collective timeout" in log, log[-3000:]
    if when == "idle":
        assert "no answer for 10 s from rank 1 on mpisplit-h2" in log, log[-3000:]
