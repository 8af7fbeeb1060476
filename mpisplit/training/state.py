"""Model and optimizer state <-> sharded checkpoints.

Tensor names in a checkpoint: `model/<parameter name>` and
`optim/<kind>/<parameter name>` (kind: exp_avg, exp_avg_sq, momentum). Optimizer
moments are split exactly like their parameter, so they reshard with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.nn.module import Module, Parameter
from mpisplit.runtime.backend import get_array_module, to_numpy
from mpisplit.runtime.errors import agree
from mpisplit.training.checkpoint import (
    CheckpointReader,
    ShardInfo,
    latest_checkpoint,
    load_shard,
    save_checkpoint,
)
from mpisplit.training.optim import Optimizer


def _shard(p: Parameter, array: Any) -> ShardInfo:
    local = to_numpy(array).reshape(p.view_shape)
    if p.replica_rank > 0:  # a replicated key/value head: its first replica saves the rows
        local = local[(slice(None),) * p.split_axis + (slice(0, 0),)]
    return ShardInfo(array=np.ascontiguousarray(local), global_shape=p.global_shape, split_axis=p.split_axis, start=p.start)


def training_shards(model: Module, optimizer: Optimizer | None = None) -> dict[str, ShardInfo]:
    """Every slab this rank holds, by checkpoint name; a pipeline stage's copy of a weight that
    another stage owns (the last stage's tied head) is left to the owner; the other replicas of a
    replicated key/value head hold no rows."""
    params = [(name, p) for name, p in model.named_parameters() if not p.pipeline_copy]
    shards = {f"model/{name}": _shard(p, p.data) for name, p in params}
    if optimizer is not None:
        names = {id(p): name for name, p in params}
        for kind, arrays in optimizer.state_arrays().items():
            for p, arr in zip(optimizer.params, arrays):
                if id(p) in names:
                    shards[f"optim/{kind}/{names[id(p)]}"] = _shard(p, arr)
    return shards


def _load_into(reader: CheckpointReader, name: str, p: Parameter, dst: Any) -> None:
    lo, hi = p.slab_bounds()
    slab = load_shard(
        reader, name, global_shape=p.global_shape, split_axis=p.split_axis,
        start=lo if p.split_axis is not None else None, stop=hi if p.split_axis is not None else None,
    )
    xp = get_array_module(dst)
    dst[...] = xp.asarray(slab.reshape(p.shape), dtype=dst.dtype)


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
            _load_into(reader, f"model/{name}", p, p.data)


def load_optimizer(reader: CheckpointReader, model: Module, optimizer: Optimizer) -> None:
    """Read the optimizer moments, resharded like their parameters. Collective."""
    names = {id(p): name for name, p in model.named_parameters()}
    with _per_stage(reader, model):
        for kind, arrays in optimizer.state_arrays().items():
            for p, arr in zip(optimizer.params, arrays):
                _load_into(reader, f"optim/{kind}/{names[id(p)]}", p, arr)
    optimizer.step_count = int(reader.meta.get("optimizer", {}).get("step_count", 0))


def save_training_state(
    root: str | Path, step: int, model: Module, optimizer: Optimizer | None, grid: Any, *,
    meta: dict, rank_meta: dict | None = None, keep_last: int = 3,
) -> Path:
    """Write model (and optimizer) slabs plus metadata as `root/step-XXXXXXXX`. Collective."""
    meta = dict(meta)
    if optimizer is not None:
        meta["optimizer"] = {"type": type(optimizer).__name__, "step_count": optimizer.step_count}
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
