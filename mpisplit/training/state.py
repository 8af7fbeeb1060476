"""Model and optimizer state <-> sharded checkpoints.

Tensor names in a checkpoint: `model/<parameter name>` and
`optim/<kind>/<parameter name>` (kind: exp_avg, exp_avg_sq, momentum). Optimizer
moments are split exactly like their parameter, so they reshard with it. A sharded optimizer
(training/sharded_optim.py) saves the same tensors, by global name, as pieces (element ranges
of each slab, checkpoint/layout.py) that every DP rank writes for its own range, the float32
master weights (`model/...`) too when it holds them; it reads back only its range of each, from
pieces or plain slabs. Either kind of checkpoint loads into either optimizer at any layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from mpisplit.nn.module import Module, Parameter
from mpisplit.runtime.backend import get_array_module, to_numpy
from mpisplit.runtime.errors import agree
from mpisplit.training.checkpoint import (
    CheckpointReader,
    ShardInfo,
    latest_checkpoint,
    load_range,
    load_shard,
    save_checkpoint,
)
from mpisplit.training.optim import Optimizer


class _RangedOptimizer(Protocol):
    """An optimizer that holds a range of each parameter's elements (training/sharded_optim.py)."""

    def local_range(self, i: int) -> tuple[int, int]: ...

    def load_range(self, kind: str, i: int, values: Any) -> None: ...


def _shard(p: Parameter, array: Any) -> ShardInfo:
    local = to_numpy(array).reshape(p.view_shape)
    if p.replica_rank > 0:  # a replicated key/value head: its first replica saves the rows
        axis = p.split_axis
        assert axis is not None, "the replicas of a key/value head are split parameters (nn/gqa.py)"
        local = local[(slice(None),) * axis + (slice(0, 0),)]
    return ShardInfo(array=np.ascontiguousarray(local), global_shape=p.global_shape, split_axis=p.split_axis, start=p.start)


def _piece(p: Parameter, lo: int, hi: int, values: Any) -> ShardInfo:
    """Elements [lo, hi) of p's flattened slab; a replica of a replicated key/value head saves none."""
    if p.replica_rank > 0:
        lo, hi, values = 0, 0, values[:0]
    rows = p.view_shape[p.split_axis] if p.split_axis is not None else None
    return ShardInfo(array=np.ascontiguousarray(values), global_shape=p.global_shape, split_axis=p.split_axis,
                     start=p.start, elements=(lo, hi), rows=rows)


def training_shards(model: Module, optimizer: Optimizer | None = None) -> dict[str, ShardInfo]:
    """Every slab (or piece) this rank holds, by checkpoint name; a pipeline stage's copy of a
    weight that another stage owns (the last stage's tied head) is left to the owner; the other
    replicas of a replicated key/value head hold no rows."""
    params = [(name, p) for name, p in model.named_parameters() if not p.pipeline_copy]
    names = {id(p): name for name, p in params}
    # A sharded optimizer (training/sharded_optim.py) saves its state as pieces.
    state_pieces = getattr(optimizer, "state_pieces", None)
    pieces: dict[str, list[tuple[int, int, Any]]] = state_pieces() if state_pieces is not None else {}
    shards = {}
    if "master" not in pieces:
        shards = {f"model/{name}": _shard(p, p.data) for name, p in params}
    if optimizer is not None:  # else there are no pieces
        for kind, per_param in pieces.items():
            prefix = "model" if kind == "master" else f"optim/{kind}"
            for p, (lo, hi, values) in zip(optimizer.params, per_param):
                if id(p) in names:
                    shards[f"{prefix}/{names[id(p)]}"] = _piece(p, lo, hi, values)
    if optimizer is not None and not pieces:
        for kind, arrays in optimizer.state_arrays().items():
            for p, arr in zip(optimizer.params, arrays):
                if id(p) in names:
                    shards[f"optim/{kind}/{names[id(p)]}"] = _shard(p, arr)
    return shards


def _read_slab(reader: CheckpointReader, name: str, p: Parameter) -> np.ndarray:
    """This rank's slab of checkpoint tensor `name` laid out like `p` (host array of p.shape)."""
    lo, hi = p.slab_bounds()
    slab = load_shard(
        reader, name, global_shape=p.global_shape, split_axis=p.split_axis,
        start=lo if p.split_axis is not None else None, stop=hi if p.split_axis is not None else None,
    )
    return slab.reshape(p.shape)


def _read_range(reader: CheckpointReader, name: str, p: Parameter, lo: int, hi: int) -> np.ndarray:
    """Elements [lo, hi) of this rank's slab of checkpoint tensor `name` laid out like `p`."""
    start, stop = p.slab_bounds() if p.split_axis is not None else (None, None)
    return load_range(reader, name, global_shape=p.global_shape, split_axis=p.split_axis,
                      start=start, stop=stop, lo=lo, hi=hi)


@contextmanager
def _per_stage(reader: CheckpointReader, model: Module) -> Iterator[None]:
    """Pipeline stages hold different parameters: each stage reads over its own ranks, and a
    failure on any stage is then raised on every rank of the reader."""
    grid = getattr(model, "grid", None)
    if grid is None or getattr(grid, "pp", 1) == 1:
        yield
        return
    with agree(grid.world), reader.within(grid.stage_comm):
        yield


def load_model(reader: CheckpointReader, model: Module) -> None:
    """Read this rank's slab of every parameter (any TP degree and pipeline layout of the saving
    job). Collective."""
    with _per_stage(reader, model):
        for name, p in model.named_parameters():
            p.data[...] = get_array_module(p.data).asarray(_read_slab(reader, f"model/{name}", p), dtype=p.dtype)


def load_optimizer(reader: CheckpointReader, model: Module, optimizer: Optimizer) -> None:
    """Read the optimizer moments, resharded like their parameters (a sharded optimizer reads
    only its range of each slab). Collective."""
    names = {id(p): name for name, p in model.named_parameters()}
    ranged = cast(_RangedOptimizer, optimizer) if hasattr(optimizer, "local_range") else None
    with _per_stage(reader, model):
        for kind in optimizer.state_kinds():
            for i, p in enumerate(optimizer.params):
                name = f"optim/{kind}/{names[id(p)]}"
                if ranged is not None:  # every rank reads, an empty range too: each read is collective
                    ranged.load_range(kind, i, _read_range(reader, name, p, *ranged.local_range(i)))
                else:
                    optimizer.load_state(kind, i, _read_slab(reader, name, p))
    optimizer.step_count = int(reader.meta.get("optimizer", {}).get("step_count", 0))


def save_training_state(
    root: str | Path, step: int, model: Module, optimizer: Optimizer | None, grid: Any, *,
    meta: dict, rank_meta: dict | None = None, keep_last: int = 3,
) -> Path:
    """Write model (and optimizer) slabs plus metadata as `root/step-XXXXXXXX`. Collective."""
    meta = dict(meta)
    if optimizer is not None:
        # a sharded AdamW saves AdamW's tensors (as pieces): its checkpoints are AdamW's
        kind = getattr(optimizer, "checkpoint_type", type(optimizer).__name__)
        meta["optimizer"] = {"type": kind, "step_count": optimizer.step_count}
    return save_checkpoint(
        root, step, training_shards(model, optimizer), grid=grid, meta=meta, rank_meta=rank_meta, keep_last=keep_last,
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the latest complete checkpoint under a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    if (path / "index.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found in {str(path)!r} (no index.json and no 'latest' file)")
    return latest
