"""Reading a checkpoint at any TP layout: only the rows a rank needs, through lazy safetensors slices;
and finding the latest complete checkpoint of a run folder."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

from mpisplit.runtime.files import sha256_file
from mpisplit.training.checkpoint.index import _is_int, _validate_index
from mpisplit.training.checkpoint.layout import (
    _DTYPES,
    _OLD_STEP_DIR,
    _STEP_DIR,
    INDEX_NAME,
    LATEST_NAME,
    _agree,
    _mpi,
)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder `root/latest` names, or None if there is none.

    If `latest` is missing or names an incomplete folder (a crash during a first
    save, or between the two renames of a re-save on a filesystem without atomic
    swap), falls back to the highest-step complete folder. Never modifies the disk.
    """
    root = Path(root)
    try:
        name = (root / LATEST_NAME).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (root / name / INDEX_NAME).is_file():
        return root / name
    best: tuple[int, int, Path] | None = None
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for entry in entries:
        m = _STEP_DIR.match(entry.name) or _OLD_STEP_DIR.match(entry.name)
        if m and os.path.isfile(os.path.join(entry.path, INDEX_NAME)):
            key = (int(m.group(1)), int(entry.name.startswith("step-")), Path(entry.path))
            best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else best[2]




def _shard_box(t: dict, shard: dict) -> list[tuple[int, int]]:
    """Global [lo, hi) per axis of the block a shard file holds."""
    box = [(0, g) for g in t["global_shape"]]
    if t["split_axis"] is not None:
        box[t["split_axis"]] = (shard["start"], shard["stop"])
    return box


def _check_files(path: Path, index: dict) -> None:
    """Every file is a regular file whose safetensors header lists the expected tensors."""
    from safetensors import safe_open

    expected: dict[str, dict[str, tuple[str, list[int]]]] = {f: {} for f in index["files"]}
    for name, t in index["tensors"].items():
        for s in t["shards"]:
            shape = [hi - lo for lo, hi in _shard_box(t, s)]
            expected[s["file"]][name] = (_DTYPES[t["dtype"]], shape)
    for fname, want in expected.items():
        fpath = path / fname
        try:
            mode = os.lstat(fpath).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"checkpoint file {fpath} is not a regular file")
        try:
            with safe_open(str(fpath), framework="numpy") as f:
                keys = set(f.keys())
                for name, (code, shape) in want.items():
                    if name not in keys:
                        raise ValueError(f"checkpoint file {fpath} lacks tensor {name!r}")
                    sl = f.get_slice(name)
                    if sl.get_dtype() != code or list(sl.get_shape()) != shape:
                        raise ValueError(
                            f"checkpoint file {fpath}: tensor {name!r} is {sl.get_dtype()} "
                            f"{list(sl.get_shape())}, index says {code} {shape}"
                        )
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"checkpoint file {fpath} is corrupt or truncated: {exc}") from None


class CheckpointReader:
    """Read a checkpoint folder written by `save_checkpoint`, at any TP layout.

    Opening validates the index (format version, well-formed JSON, every file a
    plain name inside the folder, files present with the listed tensors, shards
    covering each tensor exactly once, known dtypes). `read`, `verify` and the
    constructor are collective over `comm` (a Communicator or mpi4py comm; None:
    this process alone): every rank calls them in the same order, and a problem on
    any rank raises ValueError / FileNotFoundError on all. Never writes to disk.

    With `verify` (the default), a rank hashes each file before its first read from it and
    compares the sha256 with the index, so no rank uses a weight from a corrupted file: a
    mismatch raises ValueError naming the file and both digests, on every rank.
    """

    def __init__(self, path: str | os.PathLike, comm: Any = None, *, verify: bool = True) -> None:
        self.path = Path(path)
        self._comm = comm
        self._verify = verify
        self._handles: dict[str, Any] = {}
        index = None
        # World rank 0 reads and validates; the others receive the parsed index.
        with _agree(comm):
            if comm is None or _mpi(comm).Get_rank() == 0:
                index = self._load_index()
        if comm is not None:
            index = _mpi(comm).bcast(index, root=0)
        self._index = index
        self._tensors: dict[str, dict] = index["tensors"]

    def _load_index(self) -> dict:
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
        where = self.path / INDEX_NAME
        try:
            text = where.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{where} is missing: {self.path} is not a complete checkpoint"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} is not UTF-8 text: {exc}") from None
        try:
            index = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        index = _validate_index(self.path, index)
        _check_files(self.path, index)
        return index

    # ---- metadata (local, no communication)

    @property
    def meta(self) -> dict:
        """The `meta` dict given to save_checkpoint."""
        return self._index["meta"]

    @property
    def step(self) -> int:
        return self._index["step"]

    @property
    def tp(self) -> int:
        """TP degree the checkpoint was saved at."""
        return self._index["tp"]

    @property
    def dp(self) -> int:
        return self._index["dp"]

    @contextlib.contextmanager
    def within(self, comm: Any) -> Iterator[CheckpointReader]:
        """Inside the block, reads are collective over `comm` (a subgroup of the reader's ranks
        that read the same tensors, e.g. one pipeline stage) instead of the reader's comm."""
        saved, self._comm = self._comm, comm
        try:
            yield self
        finally:
            self._comm = saved

    @property
    def pp(self) -> int:
        """Pipeline stages of the saving job (1 for checkpoints written before stages existed)."""
        return int(self._index.get("pp", 1))

    def rank_meta(self, world_rank: int) -> dict | None:
        """The `rank_meta` that world rank `world_rank` of the saving job passed."""
        rm = self._index["rank_meta"]
        if not _is_int(world_rank) or not 0 <= world_rank < len(rm):
            raise ValueError(
                f"world_rank {world_rank!r} is not in [0, {len(rm)}) (ranks of the saving job)"
            )
        return rm[world_rank]

    def names(self) -> list[str]:
        return list(self._tensors)

    def _entry(self, name: str) -> dict:
        if name not in self._tensors:
            raise ValueError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._tensors[name]

    def global_shape(self, name: str) -> tuple[int, ...]:
        """Logical (unpadded) shape of tensor `name`."""
        return tuple(self._entry(name)["global_shape"])

    def split_axis(self, name: str) -> int | None:
        """Axis the tensor was split along when saved (None: replicated)."""
        return self._entry(name)["split_axis"]

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._entry(name)["dtype"])

    # ---- data (collective)

    def read(
        self,
        name: str,
        split_axis: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> np.ndarray:
        """Global rows [start, stop) of `name` along `split_axis` (whole tensor if None).

        Reads only the overlapping parts of the shard files; rows >= the logical
        length (padding of the caller's layout) are zeros. Collective over comm.
        """
        with _agree(self._comm):
            out = self._read(name, split_axis, start, stop, None)
        return out

    def _read(
        self,
        name: str,
        split_axis: int | None,
        start: int | None,
        stop: int | None,
        expect_shape: tuple[int, ...] | None,
    ) -> np.ndarray:
        t = self._entry(name)
        gshape = tuple(t["global_shape"])
        if expect_shape is not None and tuple(expect_shape) != gshape:
            raise ValueError(
                f"tensor {name!r}: checkpoint global shape {gshape} != expected "
                f"{tuple(expect_shape)}"
            )
        if split_axis is None:
            if start is not None or stop is not None:
                raise ValueError(
                    f"tensor {name!r}: start/stop ({start}, {stop}) given without split_axis"
                )
            axis, start, stop = None, 0, 0
        else:
            if not _is_int(split_axis) or not 0 <= split_axis < len(gshape):
                raise ValueError(
                    f"tensor {name!r}: split_axis {split_axis!r} is not an axis of shape {gshape}"
                )
            axis = split_axis
            start = 0 if start is None else start
            stop = gshape[axis] if stop is None else stop
            if not (_is_int(start) and _is_int(stop)) or not 0 <= start <= stop:
                raise ValueError(f"tensor {name!r}: rows [{start}, {stop}) are not a valid range")
        dtype = np.dtype(t["dtype"])
        out_shape = list(gshape)
        if axis is not None:
            out_shape[axis] = stop - start
        out = np.zeros(out_shape, dtype=dtype)
        want = [(0, g) for g in gshape]
        if axis is not None:
            want[axis] = (min(start, gshape[axis]), min(stop, gshape[axis]))
        for shard in t["shards"]:
            box = _shard_box(t, shard)
            inter = [
                (max(w0, b0), min(w1, b1)) for (w0, w1), (b0, b1) in zip(want, box, strict=True)
            ]
            if any(hi <= lo for lo, hi in inter):
                continue  # no overlap (or an empty tensor): nothing to read
            src = tuple(
                slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box, strict=True)
            )
            off = [0] * len(gshape)
            if axis is not None:
                off[axis] = start
            dst = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, off, strict=True))
            out[dst] = self._slice(shard["file"], name, src)
        return out

    def _slice(self, fname: str, name: str, src: tuple[slice, ...]) -> np.ndarray:
        from safetensors import safe_open

        fpath = self.path / fname
        try:
            if fname not in self._handles:
                if self._verify:
                    self._check_sha256(fname)
                self._handles[fname] = safe_open(str(fpath), framework="numpy")
            handle = self._handles[fname]
            return handle.get_slice(name)[src] if src else handle.get_tensor(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(
                f"checkpoint file {fpath}: cannot read tensor {name!r}: {exc}"
            ) from None

    def _check_sha256(self, fname: str) -> None:
        """Hash `fname` (streamed in chunks) against the index: local, before its first read."""
        fpath = self.path / fname
        try:
            digest = sha256_file(fpath)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file {fpath} is missing") from None
        except OSError as exc:
            raise OSError(f"checkpoint file {fpath} cannot be read: {exc}") from None
        want = self._index["files"][fname]
        if digest != want:
            raise ValueError(f"checkpoint file {fpath} is corrupt: sha256 {digest}, the index records {want}")

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sha256 of the files holding `names` (all if None) against the index.

        The files are hashed in chunks, spread over the ranks of comm. Collective.
        """
        with _agree(self._comm):
            names = self.names() if names is None else list(names)
            files = sorted({s["file"] for n in names for s in self._entry(n)["shards"]})
            rank, size = (
                (0, 1)
                if self._comm is None
                else (_mpi(self._comm).Get_rank(), _mpi(self._comm).Get_size())
            )
            for fname in files[rank::size]:
                self._check_sha256(fname)

    def close(self) -> None:
        """Release the memory maps of the shard files (local)."""
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_shard(
    reader: CheckpointReader,
    name: str,
    *,
    global_shape: tuple[int, ...],
    split_axis: int | None,
    start: int | None,
    stop: int | None,
) -> np.ndarray:
    """A rank's slab of `name` for a model layout; collective over reader's comm.

    Raises ValueError naming both shapes if the checkpoint's logical global shape
    differs from `global_shape`; returns rows [start, stop) along `split_axis`
    (the whole tensor if split_axis is None), zero past the logical length.
    """
    with _agree(reader._comm):
        out = reader._read(name, split_axis, start, stop, tuple(global_shape))
    return out
