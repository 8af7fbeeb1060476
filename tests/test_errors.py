"""errors.agree: a failure on some ranks raises the same exception on all; abort hook."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import clean_mpi_env, mpiexec_command
from mpi4py import MPI

from mpisplit.parallel.comm import Communicator
from mpisplit.runtime import errors
from mpisplit.runtime.errors import agree, install_abort_on_exception


class CustomError(Exception):
    pass


@pytest.mark.mpi
def test_no_failure_is_silent() -> None:
    with agree(MPI.COMM_WORLD):
        value = 1
    assert value == 1


@pytest.mark.mpi
@pytest.mark.parametrize(
    "raised, expected",
    [
        (ValueError("bad shape (3, 4)"), ValueError),
        (TypeError("not an array"), TypeError),
        (FileNotFoundError("no such shard: x.safetensors"), FileNotFoundError),
        (PermissionError("denied"), OSError),
        (KeyError("wte"), KeyError),
        (CustomError("custom"), RuntimeError),
        (ZeroDivisionError("division by zero"), RuntimeError),
    ],
)
def test_one_rank_fails_all_raise(raised: Exception, expected: type) -> None:
    world = MPI.COMM_WORLD
    culprit = world.size - 1
    with pytest.raises(expected) as info, agree(world):
        if world.rank == culprit:
            raise raised
    assert type(info.value) is expected
    assert str(info.value) == str(expected(f"rank {culprit}: {raised}"))
    if world.rank == culprit:
        assert info.value.__cause__ is raised
    else:
        assert info.value.__cause__ is None
    world.Barrier()


@pytest.mark.mpi
def test_first_failing_rank_wins_and_others_are_counted() -> None:
    world = MPI.COMM_WORLD
    c = Communicator(world)
    if c.size < 3:
        failing = list(range(c.size))
    else:
        failing = [1, 2]  # rank 0 succeeds
    types = {1: TypeError, 2: ValueError, 0: KeyError}
    with pytest.raises(types[failing[0]]) as info, agree(c):
        if c.rank in failing:
            raise types[c.rank % 3](f"problem {c.rank}")
    first = failing[0]
    others = len(failing) - 1
    text = f"rank {first}: " + str(types[first](f"problem {first}"))
    if others:
        text += f", and {others} other rank{'s' if others > 1 else ''}"
    assert str(info.value) == str(types[first](text))
    c.free()


@pytest.mark.mpi
def test_every_rank_fails() -> None:
    world = MPI.COMM_WORLD
    with pytest.raises(ValueError) as info, agree(world):
        raise ValueError(f"bad on {world.rank}")
    suffix = "" if world.size == 1 else f", and {world.size - 1} other rank"
    suffix += "s" if world.size > 2 else ""
    assert str(info.value) == f"rank 0: bad on 0{suffix}"


def test_portable_name_walks_the_mro() -> None:
    assert errors._portable_name(IsADirectoryError()) == "OSError"
    assert errors._portable_name(FileNotFoundError()) == "FileNotFoundError"
    assert errors._portable_name(UnicodeDecodeError("utf-8", b"", 0, 1, "x")) == "ValueError"
    assert errors._portable_name(CustomError()) == "RuntimeError"


def test_excepthook_prints_once_with_rank_and_aborts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    aborted: list[int] = []

    class FakeWorld:
        def Get_rank(self) -> int:
            return 3

        def Abort(self, code: int) -> None:
            aborted.append(code)

    class FakeMPI:
        COMM_WORLD = FakeWorld()

    monkeypatch.setattr(errors, "MPI", FakeMPI)
    original = sys.excepthook
    try:
        previous = install_abort_on_exception()
        assert previous is original and sys.excepthook is not original
        try:
            raise RuntimeError("exploded")
        except RuntimeError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
            sys.excepthook(type(exc), exc, exc.__traceback__)
    finally:
        sys.excepthook = original
    err = capsys.readouterr().err
    assert aborted == [1]
    assert err.count("[rank 3] Traceback (most recent call last):") == 1
    assert "[rank 3] RuntimeError: exploded" in err
    assert all(line.startswith("[rank 3] ") for line in err.splitlines())


ABORT_SCRIPT = textwrap.dedent(
    """
    from mpi4py import MPI
    from mpisplit.runtime.errors import install_abort_on_exception

    install_abort_on_exception()
    world = MPI.COMM_WORLD
    if world.rank == 1:
        raise ValueError("rank one failed")
    world.Barrier()  # rank 0 would wait here forever without the abort
    """
)


def test_uncaught_exception_aborts_the_job_instead_of_hanging(tmp_path) -> None:
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("launches its own 2-rank job; runs at world size 1")
    script = tmp_path / "abort_job.py"
    script.write_text(ABORT_SCRIPT)
    result = subprocess.run(
        [*mpiexec_command(2), sys.executable, str(script)],
        check=False,
        env=clean_mpi_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode != 0
    assert "[rank 1] Traceback (most recent call last):" in result.stderr
    assert "[rank 1] ValueError: rank one failed" in result.stderr
    assert result.stderr.count("[rank 1] Traceback") == 1


@pytest.mark.mpi
def test_the_same_error_on_every_rank_has_a_plain_form() -> None:
    world = MPI.COMM_WORLD
    with pytest.raises(FileNotFoundError) as info, agree(world):
        raise FileNotFoundError("no such folder 'x'")
    assert str(info.value).startswith("rank 0: no such folder 'x'")
    assert info.value.plain == "no such folder 'x'"
    with pytest.raises(ValueError) as info, agree(world):
        raise ValueError(f"bad on {world.rank}")
    assert info.value.plain == (None if world.size > 1 else "bad on 0")


def test_abort_waits_until_the_pipe_reader_took_the_traceback() -> None:
    import os
    import threading
    import time

    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as stream:
        stream.write("[rank 0] Traceback ...\n")
        stream.flush()
        # Nobody reads: the wait gives up after its limit.
        start = time.monotonic()
        errors.wait_for_reader(stream, limit=0.3)
        assert time.monotonic() - start >= 0.3
        # A reader that takes the bytes after 0.2 s ends the wait long before the limit.
        taken: list[bytes] = []
        reader = threading.Timer(0.2, lambda: taken.append(os.read(read_fd, 1024)))
        reader.start()
        start = time.monotonic()
        errors.wait_for_reader(stream, limit=10.0)
        waited = time.monotonic() - start
        reader.join()
    os.close(read_fd)
    assert taken == [b"[rank 0] Traceback ...\n"]
    assert 0.2 <= waited < 5.0


def test_wait_for_reader_returns_at_once_when_not_a_pipe(tmp_path) -> None:
    import time

    with open(tmp_path / "log", "w") as stream:
        stream.write("x")
        start = time.monotonic()
        errors.wait_for_reader(stream, limit=5.0)
        assert time.monotonic() - start < 1.0
