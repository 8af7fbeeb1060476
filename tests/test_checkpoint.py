"""Sharded checkpoints: bitwise round trips across TP layouts, atomicity under SIGKILL, and
corrupt checkpoints that raise on every rank without touching the disk.

    mpiexec -n N python -m pytest --with-mpi -q tests/test_checkpoint.py     (N = 1, 2, 3, 4)

References: dense arrays built from a seed per tensor name, sliced and zero-padded by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import tp_params, world
from mpi4py import MPI

from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.checkpoint import (
    CheckpointReader,
    ShardInfo,
    latest_checkpoint,
    load_shard,
    save_checkpoint,
)
from mpisplit.training.checkpoint import writer as ckpt

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
HELPER = Path(__file__).with_name("_ckpt_kill_helper.py")

# name -> (logical global shape, split axis, dtype). Lengths 65, 10 and 2 are padded at
# tp = 2, 3, 4 (e.g. 65 -> 68 at tp=4: rank 3 holds rows [51, 68), of which [51, 65) are real;
# "tiny" at tp=4 leaves ranks 2 and 3 with padding only).
SPECS: dict[str, tuple[tuple[int, ...], int | None, type]] = {
    "embed/weight": ((65, 6), 0, np.float32),
    "blocks.0.attn.qkv.weight": ((7, 65), 1, np.float64),
    "blocks.0.mlp.fc.weight": ((8, 12), 1, np.float32),
    "blocks.0.ln.weight": ((6,), None, np.float64),
    "token_count": ((10, 3), 0, np.int64),
    "tiny": ((2,), 0, np.int64),
    "scale": ((), None, np.float64),
    "mask": ((5,), None, np.bool_),
}


def reference(name: str, step: int = 0) -> np.ndarray:
    """Dense logical tensor `name`, a function of (name, step) only."""
    shape, _, dtype = SPECS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), step])
    if dtype is np.int64:
        return rng.integers(-(2**62), 2**62, size=shape, dtype=np.int64)
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    return rng.standard_normal(shape).astype(dtype)


def bounds(length: int, tp: int, r: int) -> tuple[int, int]:
    """Rank r's rows in the padded layout: length rounded up to a multiple of tp."""
    per = -(-length // tp)
    return r * per, (r + 1) * per


def rows(ref: np.ndarray, axis: int, start: int, stop: int, fill: object = 0) -> np.ndarray:
    """Rows [start, stop) of ref along axis; rows past its length hold `fill`."""
    shape = list(ref.shape)
    shape[axis] = stop - start
    out = np.full(shape, fill, dtype=ref.dtype)
    hi = min(stop, ref.shape[axis])
    if hi > start:
        dst, src = [slice(None)] * ref.ndim, [slice(None)] * ref.ndim
        dst[axis], src[axis] = slice(0, hi - start), slice(start, hi)
        out[tuple(dst)] = ref[tuple(src)]
    return out


def make_shards(grid: ProcessGrid, step: int = 0) -> dict[str, ShardInfo]:
    """This rank's slabs; the padding rows hold garbage, which must never be saved."""
    out = {}
    for name, (shape, axis, dtype) in SPECS.items():
        ref = reference(name, step)
        if axis is None:
            out[name] = ShardInfo(ref, shape, None)
            continue
        lo, hi = bounds(shape[axis], grid.tp, grid.tp_rank)
        garbage = True if dtype is np.bool_ else (-7 if dtype is np.int64 else np.nan)
        out[name] = ShardInfo(rows(ref, axis, lo, hi, fill=garbage), shape, axis, lo)
    return out


def assert_bitwise(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert got.tobytes() == want.tobytes()


def assert_holds_step(reader: CheckpointReader, step: int) -> None:
    for name in SPECS:
        assert_bitwise(reader.read(name), reference(name, step))


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime, bytes) of every file under root, symlinks as their target text."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_symlink():
                out[str(p.relative_to(root))] = (0, os.readlink(p).encode())
            else:
                out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


@contextmanager
def grid_of(tp: int) -> Iterator[ProcessGrid]:
    with ProcessGrid(tp=tp, comm=COMM) as grid:
        yield grid


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary folder all ranks see (rank 0 creates it, bcasts the path)."""
    path = tempfile.mkdtemp(prefix="mpisplit-ckpt-") if COMM.rank == 0 else None
    path = Path(COMM.bcast(path, root=0))
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def saved(shared_dir: Path) -> Path:
    """step 1 saved at tp = world size."""
    with grid_of(COMM.size) as g:
        return save_checkpoint(shared_dir, 1, make_shards(g, 1), grid=g, meta={"step": 1})


def on_rank0(fn: Callable[[], None]) -> None:
    """Mutate the disk on rank 0 only, once every rank is done looking, then let all see it."""
    COMM.Barrier()
    if COMM.rank == 0:
        fn()
    COMM.Barrier()


def raises_everywhere(exc: type[Exception], match: str, root: Path, fn: Callable[[], object]):
    """fn raises `exc` (agreed across ranks: "rank r: ...") and leaves every file unchanged."""
    before = snapshot(root)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert re.match(r"rank \d+: ", str(info.value)), str(info.value)
    assert snapshot(root) == before
    return info


def edit_index(path: Path, edit: Callable[[dict], None]) -> None:
    def run() -> None:
        index = json.loads((path / "index.json").read_text())
        edit(index)
        (path / "index.json").write_text(json.dumps(index))

    on_rank0(run)


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("tp", tp_params(1, 2, 3, 4))
def test_round_trip_every_layout(shared_dir: Path, tp: int) -> None:
    with grid_of(tp) as g:
        path = save_checkpoint(shared_dir, 7, make_shards(g), grid=g, meta={})
        with CheckpointReader(path, g.world) as reader:  # a Communicator works as comm too
            check_round_trip(shared_dir, path, tp, reader)


def check_round_trip(shared_dir: Path, path: Path, tp: int, reader: CheckpointReader) -> None:
    assert path == shared_dir / "step-00000007"
    assert (shared_dir / "latest").read_text() == "step-00000007\n"
    assert latest_checkpoint(shared_dir) == path
    # One file per TP rank (DP replicas > 0 write nothing), and the index.
    files = [f"tp{r:02d}-of-{tp:02d}.safetensors" for r in range(tp)]
    assert sorted(os.listdir(path)) == sorted(["index.json", *files])

    # Only logical rows are stored: each shard is the rank's slab clipped to the length.
    index = json.loads((path / "index.json").read_text())
    assert (index["tp"], index["dp"], index["step"]) == (tp, COMM.size // tp, 7)
    for name, (shape, axis, dtype) in SPECS.items():
        entry = index["tensors"][name]
        assert entry["global_shape"] == list(shape) and entry["split_axis"] == axis
        assert entry["dtype"] == np.dtype(dtype).name
        if axis is None:
            assert entry["shards"] == [{"file": files[0], "start": None, "stop": None}]
            continue
        want = []
        for r in range(tp):
            lo, hi = bounds(shape[axis], tp, r)
            if lo < shape[axis]:
                want.append({"file": files[r], "start": lo, "stop": min(hi, shape[axis])})
        assert entry["shards"] == want

    reader.verify()
    assert reader.names() == list(SPECS)
    for name, (shape, axis, dtype) in SPECS.items():
        ref = reference(name)
        assert reader.global_shape(name) == shape and reader.split_axis(name) == axis
        assert reader.dtype(name) == np.dtype(dtype)
        assert_bitwise(reader.read(name), ref)
        # Every slab of every layout tp2 = 1..5, along every axis (the stored split axis or
        # another one); padding rows of the new layout come back as zeros.
        for read_axis in range(len(shape)):
            for tp2 in range(1, 6):
                for r2 in range(tp2):
                    lo, hi = bounds(shape[read_axis], tp2, r2)
                    got = load_shard(
                        reader, name, global_shape=shape, split_axis=read_axis, start=lo, stop=hi
                    )
                    assert_bitwise(got, rows(ref, read_axis, lo, hi))
            # Entirely past the end, and an empty range.
            n = shape[read_axis]
            assert_bitwise(
                reader.read(name, read_axis, n + 2, n + 5), rows(ref, read_axis, n + 2, n + 5)
            )
            assert_bitwise(reader.read(name, read_axis, 1, 1), rows(ref, read_axis, 1, 1))


def test_read_with_mpi4py_comm_and_alone(saved: Path) -> None:
    before = snapshot(saved)
    with CheckpointReader(saved, COMM) as reader:
        assert_holds_step(reader, 1)
        reader.verify()
    with CheckpointReader(saved) as reader:  # no communicator: this process alone
        assert_holds_step(reader, 1)
        reader.verify(["embed/weight"])
    assert snapshot(saved) == before  # loading never writes


def test_meta_and_rank_meta(shared_dir: Path) -> None:
    meta = {"lr": 3e-4, "config": {"n_layer": 2, "vocab": 65}, "losses": [1.5, 1.25], "id": "ü"}
    with grid_of(COMM.size) as g:
        rank_meta = {"world_rank": COMM.rank, "tp_rank": g.tp_rank, "rng": [COMM.rank, 42]}
        path = save_checkpoint(
            shared_dir, 3, make_shards(g), grid=g, meta=meta, rank_meta=rank_meta
        )
    reader = CheckpointReader(path, COMM)
    assert reader.meta == meta
    assert (reader.step, reader.tp, reader.dp) == (3, COMM.size, 1)
    for r in range(COMM.size):
        assert reader.rank_meta(r) == {"world_rank": r, "tp_rank": r, "rng": [r, 42]}
    with pytest.raises(ValueError, match=rf"world_rank {COMM.size} is not in \[0, {COMM.size}\)"):
        reader.rank_meta(COMM.size)
    # rank_meta omitted: None for every rank.
    with grid_of(COMM.size) as g:
        path = save_checkpoint(shared_dir, 4, make_shards(g), grid=g, meta={})
    reader = CheckpointReader(path, COMM)
    assert reader.meta == {} and reader.rank_meta(COMM.size - 1) is None


def test_keep_last_and_resave(shared_dir: Path) -> None:
    assert latest_checkpoint(shared_dir) is None
    assert latest_checkpoint(shared_dir / "absent") is None
    with grid_of(COMM.size) as g:
        for step in range(1, 6):
            save_checkpoint(shared_dir, step, make_shards(g, step), grid=g, meta={}, keep_last=2)
        assert sorted(os.listdir(shared_dir)) == ["latest", "step-00000004", "step-00000005"]
        assert latest_checkpoint(shared_dir) == shared_dir / "step-00000005"

        # Saving an existing step replaces it (content of step 50 under the name step 5).
        save_checkpoint(shared_dir, 5, make_shards(g, 50), grid=g, meta={"v": 2}, keep_last=2)
        assert sorted(os.listdir(shared_dir)) == ["latest", "step-00000004", "step-00000005"]
        reader = CheckpointReader(latest_checkpoint(shared_dir), COMM)
        assert reader.meta == {"v": 2}
        assert_holds_step(reader, 50)

        # The step just saved is always kept, plus the keep_last - 1 highest others.
        save_checkpoint(shared_dir, 3, make_shards(g, 3), grid=g, meta={}, keep_last=2)
        assert sorted(os.listdir(shared_dir)) == ["latest", "step-00000003", "step-00000005"]
        assert latest_checkpoint(shared_dir) == shared_dir / "step-00000003"
        save_checkpoint(shared_dir, 6, make_shards(g, 6), grid=g, meta={}, keep_last=1)
        assert sorted(os.listdir(shared_dir)) == ["latest", "step-00000006"]
        assert_holds_step(CheckpointReader(shared_dir / "step-00000006", COMM), 6)


def test_resave_without_atomic_swap(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filesystems without renameat2(RENAME_EXCHANGE) (NFS, macOS) take the two-rename path."""
    monkeypatch.setattr(ckpt, "exchange", lambda a, b: False)
    with grid_of(COMM.size) as g:
        save_checkpoint(shared_dir, 5, make_shards(g, 5), grid=g, meta={})
        path = save_checkpoint(shared_dir, 5, make_shards(g, 55), grid=g, meta={})
    assert sorted(os.listdir(shared_dir)) == ["latest", "step-00000005"]
    assert latest_checkpoint(shared_dir) == path
    assert_holds_step(CheckpointReader(path, COMM), 55)


# ------------------------------------------------------------------------- atomicity


def _run_and_kill(root: Path, step: int, stage: str, marker: Path) -> tuple[int | None, str]:
    """Start the helper (rank 0 only), wait for its stall point, SIGKILL it."""
    # Strip the launcher's variables so that the helper starts as its own MPI singleton.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI", "MPI_", "HYDRA", "MPIR", "PMIX", "OMPI"))
    }
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    log = root.parent / f"{root.name}-helper.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(root), str(step), stage, str(marker)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if stage == "asap":
                    if any(n.startswith(".tmp-step") for n in os.listdir(root)):
                        break
                elif marker.exists():
                    break
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    log.unlink()
    return rc, text


@pytest.mark.parametrize("stage", ["write", "rename", "latest", "resave", "asap"])
def test_killed_save_leaves_previous_checkpoint(shared_dir: Path, stage: str) -> None:
    root = shared_dir / "ckpt"
    with grid_of(COMM.size) as g:
        prev = save_checkpoint(root, 1, make_shards(g, 1), grid=g, meta={"step": 1})
    helper_step = 1 if stage == "resave" else 2
    result = None
    if COMM.rank == 0:
        result = _run_and_kill(root, helper_step, stage, shared_dir / "stalled")
    rc, log = COMM.bcast(result, root=0)
    completed = stage == "asap" and rc == 0  # the whole save finished before the kill
    assert rc == -signal.SIGKILL or completed, log

    found = latest_checkpoint(root)
    if completed:
        assert found == root / "step-00000002"
        reader = CheckpointReader(found, COMM)
        reader.verify()
        assert reader.meta == {"by": "helper"}
    else:
        assert (root / "latest").read_text() == "step-00000001\n"
        if stage == "resave":
            # Between the two renames of the fallback: the previous copy is set aside.
            assert not prev.exists() and re.match(r"\.old-step-00000001-", found.name)
        else:
            assert found == prev
        reader = CheckpointReader(found, COMM)
        reader.verify()
        assert reader.meta == {"step": 1}
        assert_holds_step(reader, 1)
    if stage == "latest":
        # The new folder was complete, only `latest` had not moved yet.
        new = CheckpointReader(root / "step-00000002", COMM)
        new.verify()
        assert new.meta == {"by": "helper"}

    # The next save succeeds and removes what the killed one left behind.
    with grid_of(COMM.size) as g:
        path = save_checkpoint(root, 3, make_shards(g, 3), grid=g, meta={})
    assert latest_checkpoint(root) == path
    assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".old-"))]
    assert_holds_step(CheckpointReader(path, COMM), 3)


# -------------------------------------------------------------------- corrupt input


def test_flipped_byte_fails_verify(saved: Path) -> None:
    last = saved / f"tp{COMM.size - 1:02d}-of-{COMM.size:02d}.safetensors"

    def flip() -> None:
        data = bytearray(last.read_bytes())
        data[-1] ^= 0x40  # inside the last tensor's data: the header stays valid
        last.write_bytes(bytes(data))

    on_rank0(flip)
    reader = CheckpointReader(saved, COMM)
    raises_everywhere(
        ValueError, rf"{re.escape(last.name)} is corrupt: sha256 [0-9a-f]{{64}}, the index records [0-9a-f]{{64}}", saved, reader.verify
    )
    if COMM.size > 1:
        reader.verify(["blocks.0.ln.weight"])  # replicated: only tp00 is hashed


def test_reads_hash_each_file_before_using_it(saved: Path) -> None:
    """No verify() call: a rank's first read from a file hashes it. A flipped byte in the last
    rank's file fails that rank's read, and so every rank's (only that rank hashes it);
    verify=False reads it silently, as every load did before."""
    last = saved / f"tp{COMM.size - 1:02d}-of-{COMM.size:02d}.safetensors"

    def flip() -> None:
        data = bytearray(last.read_bytes())
        data[len(data) // 2 + 4] ^= 0x01
        last.write_bytes(bytes(data))

    on_rank0(flip)
    reader = CheckpointReader(saved, COMM)
    mine = next(s for s in reader._entry("embed/weight")["shards"] if s["file"].startswith(f"tp{COMM.rank:02d}-"))
    read_mine = lambda r: r.read("embed/weight", 0, mine["start"], mine["stop"])
    where = f"rank {COMM.size - 1}: "
    raises_everywhere(
        ValueError, rf"^{where}checkpoint file .*{re.escape(last.name)} is corrupt: sha256 [0-9a-f]{{64}}, "
        r"the index records [0-9a-f]{64}$", saved, lambda: read_mine(reader),
    )
    read_mine(CheckpointReader(saved, COMM, verify=False))


def test_truncated_file(saved: Path) -> None:
    f = saved / f"tp00-of-{COMM.size:02d}.safetensors"
    on_rank0(lambda: f.write_bytes(f.read_bytes()[:-3]))
    raises_everywhere(
        ValueError,
        rf"{re.escape(f.name)} is corrupt or truncated",
        saved,
        lambda: CheckpointReader(saved, COMM),
    )


def test_missing_file(saved: Path) -> None:
    f = saved / f"tp{COMM.size - 1:02d}-of-{COMM.size:02d}.safetensors"
    on_rank0(f.unlink)
    raises_everywhere(
        FileNotFoundError,
        rf"{re.escape(str(f))} is missing",
        saved,
        lambda: CheckpointReader(saved, COMM),
    )


def test_missing_folder_and_index(shared_dir: Path, saved: Path) -> None:
    absent = shared_dir / "step-99999999"
    raises_everywhere(
        FileNotFoundError,
        rf"{re.escape(str(absent))} does not exist",
        shared_dir,
        lambda: CheckpointReader(absent, COMM),
    )
    on_rank0((saved / "index.json").unlink)
    raises_everywhere(
        FileNotFoundError,
        r"index.json is missing",
        shared_dir,
        lambda: CheckpointReader(saved, COMM),
    )


def test_missing_tensor(saved: Path) -> None:
    reader = CheckpointReader(saved, COMM)
    raises_everywhere(
        ValueError, r"tensor 'nope' is not in checkpoint", saved, lambda: reader.read("nope")
    )
    raises_everywhere(
        ValueError,
        r"tensor 'nope' is not in",
        saved,
        lambda: load_shard(
            reader, "nope", global_shape=(1,), split_axis=None, start=None, stop=None
        ),
    )
    raises_everywhere(
        ValueError, r"tensor 'nope' is not in", saved, lambda: reader.verify(["nope"])
    )

    # The index lists a tensor that its file does not hold.
    def ghost(index: dict) -> None:
        entry = dict(index["tensors"]["blocks.0.ln.weight"])
        index["tensors"]["ghost"] = entry

    edit_index(saved, ghost)
    raises_everywhere(
        ValueError,
        r"tp00-of-\d\d.safetensors lacks tensor 'ghost'",
        saved,
        lambda: CheckpointReader(saved, COMM),
    )


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "sub/x.safetensors", "..", "a\\b"])
def test_index_path_escaping_folder(saved: Path, bad: str) -> None:
    good = f"tp00-of-{COMM.size:02d}.safetensors"

    def redirect(index: dict) -> None:
        index["files"][bad] = index["files"].pop(good)
        for entry in index["tensors"].values():
            for s in entry["shards"]:
                if s["file"] == good:
                    s["file"] = bad

    edit_index(saved, redirect)
    raises_everywhere(
        ValueError,
        re.escape(f"index names file {bad!r}, which is not a plain"),
        saved,
        lambda: CheckpointReader(saved, COMM),
    )


def test_symlink_out_of_folder(saved: Path) -> None:
    good = f"tp00-of-{COMM.size:02d}.safetensors"

    def link() -> None:
        os.symlink(saved / good, saved / "link.safetensors")
        index = json.loads((saved / "index.json").read_text())
        index["files"]["link.safetensors"] = index["files"].pop(good)
        for entry in index["tensors"].values():
            for s in entry["shards"]:
                s["file"] = "link.safetensors" if s["file"] == good else s["file"]
        (saved / "index.json").write_text(json.dumps(index))

    on_rank0(link)
    raises_everywhere(
        ValueError,
        r"link.safetensors is not a regular file",
        saved,
        lambda: CheckpointReader(saved, COMM),
    )


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda i: i.update(version=99), r"format version 99, this reader knows 1"),
        (lambda i: i["tensors"]["scale"].update(dtype="bfloat16"), r"unknown dtype 'bfloat16'"),
        (
            lambda i: i["tensors"]["embed/weight"]["shards"].append(
                dict(i["tensors"]["embed/weight"]["shards"][0])
            ),
            r"do not cover rows \[0, 65\)",
        ),
        (lambda i: i["tensors"]["embed/weight"]["shards"].pop(), r"'embed/weight'.* cover"),
        (lambda i: i["tensors"]["embed/weight"].update(split_axis=2), r"invalid split_axis 2"),
        (
            lambda i: i["files"].update({f"tp00-of-{COMM.size:02d}.safetensors": "x"}),
            r"no valid sha256",
        ),
    ],
)
def test_malformed_index(saved: Path, edit: Callable[[dict], None], match: str) -> None:
    edit_index(saved, edit)
    raises_everywhere(ValueError, match, saved, lambda: CheckpointReader(saved, COMM))


def test_index_not_json(saved: Path) -> None:
    on_rank0(lambda: (saved / "index.json").write_text('{"format": "mpisplit-checkpoint", '))
    raises_everywhere(
        ValueError, r"index.json is not valid JSON", saved, lambda: CheckpointReader(saved, COMM)
    )


def test_wrong_global_shape(saved: Path) -> None:
    reader = CheckpointReader(saved, COMM)
    raises_everywhere(
        ValueError,
        re.escape("'embed/weight': checkpoint global shape (65, 6) != expected (64, 6)"),
        saved,
        lambda: load_shard(
            reader, "embed/weight", global_shape=(64, 6), split_axis=0, start=0, stop=16
        ),
    )


@world(min_size=2)
def test_error_on_one_rank_raises_on_all(saved: Path) -> None:
    reader = CheckpointReader(saved, COMM)
    last = COMM.size - 1
    start, stop = (5, 2) if COMM.rank == last else (0, 2)
    raises_everywhere(
        ValueError,
        rf"rank {last}: tensor 'embed/weight': rows \[5, 2\)",
        saved,
        lambda: reader.read("embed/weight", 0, start, stop),
    )
    name = "nope" if COMM.rank == last else "embed/weight"
    raises_everywhere(ValueError, rf"rank {last}: tensor 'nope'", saved, lambda: reader.read(name))
    assert_holds_step(reader, 1)  # still usable afterwards


# ------------------------------------------------------------------------- bad saves


def test_bad_save_raises_everywhere_and_writes_nothing(saved: Path) -> None:
    root = saved.parent
    last = COMM.size - 1

    def attempt(shards: dict[str, ShardInfo], **kw: object) -> Callable[[], object]:
        kw.setdefault("meta", {})
        return lambda: save_checkpoint(root, 2, shards, grid=g, **kw)

    with grid_of(COMM.size) as g:
        good = make_shards(g, 2)
        if COMM.size > 1:
            # Shapes differ on one rank.
            bad = dict(good)
            if COMM.rank == last:
                bad["scale"] = ShardInfo(np.zeros(2), (2,), None)
            raises_everywhere(
                ValueError,
                rf"rank {last}: tensor 'scale': names, global shapes",
                root,
                attempt(bad),
            )
        # A device (non-numpy) array on one rank.
        bad = dict(good)
        if COMM.rank == last:
            bad["scale"] = ShardInfo([1.0], (), None)
        raises_everywhere(
            TypeError, r"array must be a numpy.ndarray, got builtins.list", root, attempt(bad)
        )
        raises_everywhere(
            TypeError, r"meta is not JSON-serialisable", root, attempt(good, meta={"x": object()})
        )
        raises_everywhere(
            ValueError, r"keep_last must be an int >= 1, got 0", root, attempt(good, keep_last=0)
        )
        raises_everywhere(
            ValueError,
            r"split_axis 2 is not an axis of shape \(65, 6\)",
            root,
            attempt({**good, "embed/weight": ShardInfo(np.zeros((65, 6)), (65, 6), 2)}),
        )
        if COMM.size > 1:
            # The last TP rank claims rows one too low: they overlap its neighbour's.
            bad = dict(good)
            info = good["embed/weight"]
            if COMM.rank == last:
                bad["embed/weight"] = ShardInfo(info.array, info.global_shape, 0, info.start - 1)
            raises_everywhere(
                ValueError, r"'embed/weight': TP rank \d's rows .* overlap", root, attempt(bad)
            )
    assert latest_checkpoint(root) == saved
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]
