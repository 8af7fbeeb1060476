"""Checkpoint pieces (element ranges of a slab, written by every DP rank: checkpoint/layout.py)
against dense references: whole tensors, rows at every TP degree and element ranges read back,
from pieces and from plain slabs alike; what each DP rank writes; broken piece maps.

    mpiexec -n N python -m pytest --with-mpi -q tests/test_checkpoint_pieces.py   (N = 1, 2, 3, 4)

References: dense arrays from a seed per tensor name, cut into slabs and zero-padded by hand, and
each slab's flattening cut into dp ranges as a sharded optimizer cuts its block.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.checkpoint import CheckpointReader, ShardInfo, save_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD

# name -> (logical global shape, split axis): padded at tp = 2 (7, 5), axis 2 behind two outer
# axes (a fused qkv weight's view), replicated, a 0-d scalar
SPECS = {
    "optim/a": ((5, 7), 1),
    "optim/b": ((7, 3), 0),
    "optim/qkv": ((3, 2, 5), 2),
    "optim/ln": ((11,), None),
    "optim/scale": ((), None),
}


def reference(name: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(name.encode())).standard_normal(SPECS[name][0])


def slab(name: str, tp: int, r: int) -> tuple[np.ndarray, int]:
    """TP rank r's padded slab of `name` and its first row (the whole tensor if replicated)."""
    full, (shape, axis) = reference(name), SPECS[name]
    if axis is None:
        return full, 0
    per = -(-shape[axis] // tp)
    padded_shape = list(shape)
    padded_shape[axis] = per * tp
    padded = np.zeros(padded_shape)
    padded[tuple(slice(0, g) for g in shape)] = full
    return np.take(padded, range(r * per, (r + 1) * per), axis=axis), r * per


def dp_range(size: int, dp: int, d: int) -> tuple[int, int]:
    m = -(-size // dp)
    return min(size, d * m), min(size, (d + 1) * m)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(COMM.bcast(tempfile.mkdtemp(prefix="mpisplit-pieces-") if COMM.rank == 0 else None, root=0))
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def grid() -> Iterator[ProcessGrid]:
    with ProcessGrid(tp=2 if COMM.size % 2 == 0 else 1, comm=COMM) as g:
        yield g


def _shards(grid: ProcessGrid, pieces: bool) -> dict[str, ShardInfo]:
    out = {}
    for name, (shape, axis) in SPECS.items():
        data, start = slab(name, grid.tp, grid.tp_rank)
        if not pieces:
            out[name] = ShardInfo(data, shape, axis, start)
            continue
        lo, hi = dp_range(data.size, grid.dp, grid.dp_rank)
        out[name] = ShardInfo(data.reshape(-1)[lo:hi].copy(), shape, axis, start, elements=(lo, hi),
                              rows=data.shape[axis] if axis is not None else None)
    return out


@pytest.fixture(params=["pieces", "plain"])
def saved(request: pytest.FixtureRequest, shared_dir: Path, grid: ProcessGrid) -> Path:
    return save_checkpoint(shared_dir, 1, _shards(grid, request.param == "pieces"), grid=grid, meta={})


def test_whole_tensors_rows_and_ranges_at_every_layout(saved: Path) -> None:
    with CheckpointReader(saved, COMM) as reader:
        for name, (shape, axis) in SPECS.items():
            assert np.array_equal(reader.read(name), reference(name)), name
            for tp in (1, 2, 3, 4):  # every rank reads every TP rank's slab of every degree
                for r in range(tp):
                    want, start = slab(name, tp, r)
                    stop = start + want.shape[axis] if axis is not None else None
                    got = reader.read(name, axis, start if axis is not None else None, stop)
                    assert np.array_equal(got, want), (name, tp, r)
                    for dp in (1, 2, 3, 5):  # a sharded optimizer's ranges of that slab
                        for d in range(dp):
                            lo, hi = dp_range(want.size, dp, d)
                            got = reader.read_range(name, axis, start if axis is not None else None, stop, lo, hi)
                            assert np.array_equal(got, want.reshape(-1)[lo:hi]), (name, tp, r, dp, d)


def test_each_dp_rank_writes_its_range_only(shared_dir: Path, grid: ProcessGrid) -> None:
    path = save_checkpoint(shared_dir, 1, _shards(grid, True), grid=grid, meta={})
    index = json.loads((path / "index.json").read_text())
    assert index["version"] == 2
    mine = f"dp{grid.dp_rank:02d}-of-{grid.dp:02d}-" if grid.dp_rank else ""
    mine += f"tp{grid.tp_rank:02d}-of-{grid.tp:02d}.safetensors"
    for name, (shape, axis) in SPECS.items():
        data, start = slab(name, grid.tp, grid.tp_rank)
        lo, hi = dp_range(data.size, grid.dp, grid.dp_rank)
        held = [s for s in index["tensors"][name]["shards"] if s["file"] == mine]
        if hi > lo and (axis is not None or grid.tp_rank == 0):  # replicated: TP rank 0's pieces
            assert held == [{"file": mine, "start": start if axis is not None else None,
                             "stop": min(start + data.shape[axis], shape[axis]) if axis is not None else None,
                             **({"rows": data.shape[axis]} if axis is not None else {}), "elements": [lo, hi]}]
        else:
            assert held == []
    # the file holds those elements and a header: about 1/dp of the rank's slabs, not more
    elements = sum(s["elements"][1] - s["elements"][0] for t in index["tensors"].values()
                   for s in t["shards"] if s["file"] == mine)
    assert elements * 8 < (path / mine).stat().st_size < elements * 8 + 1024


def _edit(path: Path, edit) -> None:
    COMM.Barrier()
    if COMM.rank == 0:
        index = json.loads((path / "index.json").read_text())
        edit(index)
        (path / "index.json").write_text(json.dumps(index))
    COMM.Barrier()


def _pieces_of(index: dict, name: str) -> list[dict]:
    return index["tensors"][name]["shards"]


@pytest.mark.parametrize("edit, match", [
    (lambda i: _pieces_of(i, "optim/ln")[-1]["elements"].__setitem__(1, 10),
     r"'optim/ln'.*cover elements \[0, 10\) of 11"),
    (lambda i: _pieces_of(i, "optim/ln").append(dict(_pieces_of(i, "optim/ln")[0])),
     r"'optim/ln'.*do not cover its elements once"),
    (lambda i: _pieces_of(i, "optim/a")[0].pop("elements"), r"'optim/a' mixes pieces and plain slabs"
     if COMM.size > 1 else r"tensor 'optim/a' is F64 \[35\], index says F64 \[5, 7\]"),
    (lambda i: i.update(version=1), r"pieces, which format version 1 does not have"),
])
def test_broken_piece_maps_raise_on_every_rank(shared_dir: Path, grid: ProcessGrid, edit, match: str) -> None:
    path = save_checkpoint(shared_dir, 1, _shards(grid, True), grid=grid, meta={})
    _edit(path, edit)
    with pytest.raises(ValueError, match=match) as info:
        CheckpointReader(path, COMM)
    assert re.match(r"rank \d+: ", str(info.value)), str(info.value)


def test_a_corrupt_piece_file_fails_its_sha256(shared_dir: Path, grid: ProcessGrid) -> None:
    path = save_checkpoint(shared_dir, 1, _shards(grid, True), grid=grid, meta={})
    files = sorted(json.loads((path / "index.json").read_text())["files"])
    last = next((f for f in files if f.startswith("dp")), files[-1])  # a DP rank > 0's, at dp > 1
    COMM.Barrier()
    if COMM.rank == 0:
        raw = bytearray((path / last).read_bytes())
        raw[-1] ^= 0xFF  # the last byte: data, not the header
        (path / last).write_bytes(bytes(raw))
    COMM.Barrier()
    with CheckpointReader(path, COMM) as reader, pytest.raises(ValueError, match=f"{last} is corrupt: sha256"):
        for name in SPECS:
            reader.read(name)


def test_pieces_read_along_another_axis_is_an_error(shared_dir: Path, grid: ProcessGrid) -> None:
    path = save_checkpoint(shared_dir, 1, _shards(grid, True), grid=grid, meta={})
    with CheckpointReader(path, COMM) as reader, pytest.raises(ValueError, match="pieces of slabs split along axis 1"):
        reader.read("optim/a", 0, 0, 2)
