"""Stand-ins for sbatch, srun, scontrol, qsub and qstat that run batch scripts on this machine.

    PATH=tests/_fake_scheduler:$PATH FAKE_SCHEDULER_DIR=/tmp/fake sbatch jobs/slurm_cpu.sbatch

Each command is a two-line shell file calling `fake_scheduler.py COMMAND ARGS`. The job runs at
once, in the foreground, as one "node" with FAKE_NTASKS ranks (default 2); srun becomes
`mpiexec -n FAKE_NTASKS` (FAKE_MPIEXEC, default mpiexec on PATH). State and logs go to
FAKE_SCHEDULER_DIR:

    jobs.jsonl          one line per job run: scheduler, id, restart, exit status
    srun.jsonl          one line per srun: its options and command
    slurm-ID.out        a Slurm job's output (appended over requeues)
    pbs-ID.out          a PBS job's output

Slurm: `#SBATCH --signal=[B:]SIG@SECONDS` is honoured when FAKE_TIME_LIMIT_WHEN (a shell command)
first succeeds during a job's first run: SIG goes to the batch shell (B:) or to the job's
process group, as if the time limit were SECONDS away. `scontrol requeue ID` makes the job run
again after it ends, with SLURM_RESTART_COUNT one higher (at most 5 times).

PBS: a job runs in FAKE_SCHEDULER_DIR (scripts must cd to PBS_O_WORKDIR) with PBS_NODEFILE
listing this host FAKE_NTASKS times. `qstat -f ID` reports the walltime of `#PBS -l walltime=`,
or FAKE_WALLTIME for the first job of a chain. qsub inside a job queues the new job; it runs
after the current one ends (as with `-W depend=afterany:...`).

FAKE_JOB_TIMEOUT (seconds, default 300) ends a job that runs too long: SIGTERM to its process
group, SIGKILL 10 s later.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MAX_REQUEUES = 5


def state_dir() -> Path:
    path = Path(os.environ.get("FAKE_SCHEDULER_DIR", "fake-scheduler"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def next_job_id() -> int:
    counter = state_dir() / "next_id"
    n = int(counter.read_text()) if counter.exists() else 1001
    counter.write_text(str(n + 1))
    return n


def append_json(name: str, record: dict) -> None:
    with open(state_dir() / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def directives(script: Path, prefix: str) -> list[str]:
    """The option words of the `#SBATCH` / `#PBS` lines of a script."""
    words: list[str] = []
    for line in script.read_text(encoding="utf-8").splitlines():
        if line.startswith(prefix + " "):
            words += shlex.split(line[len(prefix) :], comments=True)
    return words


def condition_holds(condition: str, cwd: str, env: dict[str, str]) -> bool:
    done = subprocess.run(
        ["sh", "-c", condition],
        cwd=cwd,
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return done.returncode == 0


def run_job(
    cmd: list[str], env: dict[str, str], cwd: str, log: Path, warn: tuple[str, int] | None
) -> int:
    """Run a batch script; `warn` = (target, signal): send it once FAKE_TIME_LIMIT_WHEN succeeds."""
    condition = os.environ.get("FAKE_TIME_LIMIT_WHEN")
    limit = float(os.environ.get("FAKE_JOB_TIMEOUT", "300"))
    with open(log, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        start = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.1)
            if warn is not None and condition and condition_holds(condition, cwd, env):
                target, sig = warn
                out.write(
                    f"[fake scheduler] time limit near: {signal.Signals(sig).name} to {target}\n"
                )
                out.flush()
                if target == "batch":
                    os.kill(proc.pid, sig)
                else:
                    os.killpg(proc.pid, sig)
                warn = None
            if time.monotonic() - start > limit:
                out.write(f"[fake scheduler] job ran past {limit} s: terminating it\n")
                out.flush()
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
        return proc.wait()


# --------------------------------------------------------------------------------- Slurm


def parse_signal(spec: str) -> tuple[str, int]:
    m = re.fullmatch(r"(B:)?(?:SIG)?([A-Z0-9]+)(?:@\d+)?", spec)
    if m is None:
        raise SystemExit(f"sbatch: bad --signal {spec!r}")
    name = m.group(2)
    sig = int(name) if name.isdigit() else getattr(signal, "SIG" + name)
    return ("batch" if m.group(1) else "job"), sig


def sbatch(argv: list[str]) -> int:
    options = [a for a in argv if a.startswith("-")]
    rest = [a for a in argv if not a.startswith("-")]
    if not rest:
        raise SystemExit("sbatch: no script given")
    script, script_args = Path(rest[0]), rest[1:]
    words = directives(script, "#SBATCH") + options  # the command line wins
    opts = dict(
        w[2:].split("=", 1) if "=" in w else (w[2:], "") for w in words if w.startswith("--")
    )
    ntasks = int(os.environ.get("FAKE_NTASKS", "2"))
    job_id = next_job_id()
    name = opts.get("job-name", script.name)
    log = state_dir() / f"slurm-{job_id}.out"
    requeue_flag = state_dir() / f"requeue-{job_id}"
    print(f"Submitted batch job {job_id}", flush=True)
    for restart in range(MAX_REQUEUES + 1):
        env = dict(os.environ)
        env.update(
            SLURM_JOB_ID=str(job_id),
            SLURM_JOBID=str(job_id),
            SLURM_JOB_NAME=name,
            SLURM_SUBMIT_DIR=os.getcwd(),
            SLURM_JOB_NUM_NODES="1",
            SLURM_NNODES="1",
            SLURM_NTASKS=str(ntasks),
            SLURM_NTASKS_PER_NODE=str(ntasks),
            SLURM_CPUS_PER_TASK="1",
            SLURM_JOB_NODELIST=socket.gethostname(),
            SLURM_RESTART_COUNT=str(restart),
            FAKE_SCHEDULER_JOB=str(job_id),
        )
        if "gpus-per-node" in opts:
            env["SLURM_GPUS_ON_NODE"] = str(ntasks)
        warn = parse_signal(opts["signal"]) if "signal" in opts and restart == 0 else None
        status = run_job(["bash", str(script), *script_args], env, os.getcwd(), log, warn)
        append_json(
            "jobs.jsonl",
            {"scheduler": "slurm", "job": job_id, "restart": restart, "status": status},
        )
        if not requeue_flag.exists():
            break
        requeue_flag.unlink()
    return 0


def scontrol(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "requeue":
        (state_dir() / f"requeue-{argv[1]}").touch()
        return 0
    print(f"scontrol (fake): unsupported: {argv}", file=sys.stderr)
    return 1


def srun(argv: list[str]) -> int:
    i = 0
    options: list[str] = []
    while i < len(argv) and argv[i].startswith("-"):
        if "=" not in argv[i]:
            raise SystemExit(f"srun (fake): write options as --name=value, got {argv[i]!r}")
        options.append(argv[i])
        i += 1
    command = argv[i:]
    if not command:
        raise SystemExit("srun (fake): no command")
    opts = dict(o.lstrip("-").split("=", 1) for o in options)
    if "ntasks" in opts:
        ntasks = int(opts["ntasks"])
    elif "ntasks-per-node" in opts:
        ntasks = int(opts["ntasks-per-node"]) * int(opts.get("nodes", "1"))
    else:
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    append_json("srun.jsonl", {"options": options, "command": command, "ntasks": ntasks})
    mpiexec = os.environ.get("FAKE_MPIEXEC", "mpiexec")
    os.execvp(mpiexec, [mpiexec, "-n", str(ntasks), *command])
    return 1  # not reached


# ----------------------------------------------------------------------------------- PBS

_QSUB_VALUE_OPTIONS = {"-v", "-W", "-N", "-l", "-j", "-r", "-o", "-e", "-q", "-A", "-m", "-M"}


def qsub(argv: list[str]) -> int:
    values: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _QSUB_VALUE_OPTIONS:
            values.setdefault(a, []).append(argv[i + 1])
            i += 2
        elif a.startswith("-"):
            values.setdefault(a, []).append("")
            i += 1
        else:
            rest.append(a)
            i += 1
    if len(rest) != 1:
        raise SystemExit(f"qsub (fake): expected one script, got {rest}")
    env = dict(os.environ)
    for item in ",".join(values.get("-v", [])).split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            env[k] = v
    job_id = next_job_id()
    job = {"id": job_id, "script": str(Path(rest[0]).resolve()), "cwd": os.getcwd(), "env": env}
    print(f"{job_id}.fake", flush=True)
    if "FAKE_SCHEDULER_JOB" in os.environ:  # submitted from inside a job: runs after it
        (state_dir() / f"queue-{job_id}.json").write_text(json.dumps(job))
        return 0
    first = True
    while True:
        run_pbs_job(job, first)
        first = False
        queued = sorted(state_dir().glob("queue-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        if not queued:
            return 0
        job = json.loads(queued[0].read_text())
        queued[0].unlink()


def run_pbs_job(job: dict, first: bool) -> None:
    script = Path(job["script"])
    words = directives(script, "#PBS")
    name = words[words.index("-N") + 1] if "-N" in words else script.name
    walltime = next((w.split("=", 1)[1] for w in words if w.startswith("walltime=")), "01:00:00")
    if first and os.environ.get("FAKE_WALLTIME"):
        walltime = os.environ["FAKE_WALLTIME"]
    ntasks = int(os.environ.get("FAKE_NTASKS", "2"))
    nodefile = state_dir() / f"nodefile-{job['id']}"
    nodefile.write_text(f"{socket.gethostname()}\n" * ntasks)
    (state_dir() / f"job-{job['id']}.json").write_text(json.dumps({"walltime": walltime}))
    env = dict(job["env"])
    env.update(
        PBS_JOBID=f"{job['id']}.fake",
        PBS_JOBNAME=name,
        PBS_O_WORKDIR=job["cwd"],
        PBS_NODEFILE=str(nodefile),
        PBS_ENVIRONMENT="PBS_BATCH",
        FAKE_SCHEDULER_JOB=str(job["id"]),
    )
    log = state_dir() / f"pbs-{job['id']}.out"
    status = run_job(["bash", str(script)], env, str(state_dir()), log, None)
    append_json("jobs.jsonl", {"scheduler": "pbs", "job": job["id"], "status": status})


def qstat(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "-f":
        print(f"qstat (fake): unsupported: {argv}", file=sys.stderr)
        return 1
    job_id = argv[1].split(".")[0]
    info = state_dir() / f"job-{job_id}.json"
    if not info.exists():
        print(f"qstat: Unknown Job Id {argv[1]}", file=sys.stderr)
        return 1
    print(
        f"Job Id: {argv[1]}\n    Resource_List.walltime = {json.loads(info.read_text())['walltime']}"
    )
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "qsub": qsub, "qstat": qstat}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
