"""Save a checkpoint in a single process and stall (or not) at a chosen moment, to be killed.

    python tests/_ckpt_kill_helper.py ROOT STEP STAGE MARKER

STAGE chooses where the save stops and waits to be SIGKILLed, after touching MARKER:
  write   the shard file is written, nothing else (no index)
  rename  the index is written, the folder not yet renamed into place
  latest  the folder is in place, `latest` not yet replaced
  resave  STEP already exists; the rename fallback (no atomic swap) has moved the old
          folder aside and not yet moved the new one in
  asap    no stall: the caller kills as soon as the temporary folder appears
The data are `helper_tensors(STEP)`: a different content from any MPI-saved step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.checkpoint import writer as ckpt

BIG_ELEMENTS = 24 << 20  # 96 MiB of float32: the write takes a while


def helper_tensors(step: int, big: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    out = {"w": rng.standard_normal((9, 5))}
    if big:
        out["big"] = rng.standard_normal(BIG_ELEMENTS, dtype=np.float32)
    return out


def main() -> None:
    root, step, stage, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    final_name = f"step-{step:08d}"

    def stall() -> None:
        marker.touch()
        time.sleep(600)

    real_replace, real_fsync_file = os.replace, ckpt.fsync_file

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        src_name, dst_name = Path(src).name, Path(dst).name
        if stage == "rename" and dst_name == final_name:
            stall()
        if stage == "latest" and dst_name == ckpt.LATEST_NAME:
            stall()
        if stage == "resave" and src_name.startswith(".tmp-step") and dst_name == final_name:
            stall()
        real_replace(src, dst)

    def fsync_file(path: Path) -> None:
        real_fsync_file(path)
        if stage == "write":
            stall()

    os.replace = replace
    ckpt.fsync_file = fsync_file
    if stage == "resave":
        ckpt.exchange = lambda a, b: False

    arrays = helper_tensors(step, big=stage == "asap")
    tensors = {n: ckpt.ShardInfo(a, a.shape, None) for n, a in arrays.items()}
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid:
        ckpt.save_checkpoint(root, step, tensors, grid=grid, meta={"by": "helper"})


if __name__ == "__main__":
    main()
