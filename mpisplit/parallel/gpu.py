"""use_gpu: bind this rank to its GPU and give each communicator of a grid its device path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mpisplit.parallel.device_paths import (
    CudaAwarePath,
    NcclPath,
    StagedPath,
    check_path,
    choose_path,
)
from mpisplit.runtime.backend import local_rank_and_size
from mpisplit.runtime.device import (
    device_index,
    gpu_identity,
    launcher_local_rank,
    mpi_cuda_support,
    nccl_available,
    require_cupy,
)
from mpisplit.runtime.errors import agree


@dataclass
class GPUBinding:
    """What use_gpu decided on this rank."""

    device_id: int
    device_name: str
    local_rank: int
    local_size: int
    visible: int
    cuda_aware: bool
    cuda_aware_source: str
    nccl: str  # "NCCL x.y.z" or why NCCL is not used
    requested: str
    paths: dict[str, str] = field(default_factory=dict)  # communicator role -> path
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        paths = ", ".join(f"{role} {p}" for role, p in self.paths.items()) or "none (one rank)"
        text = (
            f"GPU {self.device_id} ({self.device_name}) for local rank {self.local_rank} of "
            f"{self.local_size}, {self.visible} visible; collectives ({self.requested}): {paths}; "
            f"CUDA-aware MPI: {'yes' if self.cuda_aware else 'no'} ({self.cuda_aware_source}); {self.nccl}"
        )
        return text + "".join(f"; {n}" for n in self.notes)


# A grid's communicators by role; embed exists only on the first and last pipeline stage.
GRID_ROLES = (("world", "world"), ("tp", "tp_comm"), ("dp", "dp_comm"), ("pp", "pp_comm"),
              ("stage", "stage_comm"), ("embed", "embed_comm"))


def _communicators(target: Any) -> list[tuple[str, Any]]:
    """(role, Communicator or None) pairs, the same roles in the same order on every rank."""
    if all(hasattr(target, a) for a in ("world", "tp_comm", "dp_comm")):
        return [(role, getattr(target, attr, None)) for role, attr in GRID_ROLES]
    if hasattr(target, "mpi") and hasattr(target, "set_device_path"):
        return [("comm", target)]
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        comms = [(f"comm{i}", c) for i, c in enumerate(target)]
        if comms and all(hasattr(c, "mpi") and hasattr(c, "set_device_path") for _, c in comms):
            return comms
    raise TypeError(f"use_gpu takes a ProcessGrid, a Communicator or a list of them, got {type(target).__name__}")


def use_gpu(
    target: Any, comm: str = "auto", *, device_id: int | None = None, cuda_aware: bool | None = None,
) -> GPUBinding:
    """Bind this rank to its GPU and choose the collective path of each communicator.

    `target`: a ProcessGrid (every communicator it has: world, tp, dp, pp, stage, embed), a
    Communicator or a list of Communicators; the first is the job's world (collective over
    it). `comm`: auto, mpi, staged or nccl (module docstring). `device_id` overrides the local-rank choice;
    `cuda_aware` overrides the detection. Every failure raises on every rank alike.
    """
    check_path(comm)
    comms = _communicators(target)
    world = comms[0][1]
    cupy = None
    with agree(world):
        cupy = require_cupy()
        visible = int(cupy.cuda.runtime.getDeviceCount())
    local_rank, local_size = local_rank_and_size(world)
    with agree(world):
        dev = device_index(local_rank, visible) if device_id is None else int(device_id)
        if not 0 <= dev < visible:
            raise ValueError(f"device_id {dev} out of range: {visible} device(s) visible")
        cupy.cuda.Device(dev).use()
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        identity = gpu_identity(dev)
    notes = []
    hint = launcher_local_rank()
    if hint is not None and hint != local_rank:
        notes.append(f"the launcher says local rank {hint}, MPI's shared-memory split {local_rank}")

    if cuda_aware is None:
        aware, source = mpi_cuda_support()
    else:
        aware, source = bool(cuda_aware), "given"
    ok, nccl_text = nccl_available()
    # Every rank must agree on NCCL: one rank without it, or two ranks on one GPU, rules it out.
    views = world.mpi.allgather((ok, identity)) if world.size > 1 else [(ok, identity)]
    ok = all(v[0] for v in views)
    ids = [v[1] for v in views]
    if ok and len(set(ids)) < len(ids):
        ok, nccl_text = False, f"{nccl_text} not used: ranks share a GPU (NCCL refuses that)"
    binding = GPUBinding(dev, name, local_rank, local_size, visible, aware, source, nccl_text, comm, notes=notes)
    for role, c in comms:
        _bind(binding, world, role, c, comm, nccl_ok=ok, nccl_text=nccl_text)
    return binding


def _bind(binding: GPUBinding, world: Any, role: str, c: Any, comm: str, *, nccl_ok: bool, nccl_text: str) -> None:
    """Give communicator `c` (None or one rank: nothing to do) its path. Collective over `world`
    when NCCL is chosen: every rank enters the agreement, members or not."""
    active = c is not None and c.size > 1
    chosen = choose_path(comm, size=c.size if active else 2, nccl_ok=nccl_ok, cuda_aware=binding.cuda_aware)
    path: Any = None
    if chosen == "nccl":
        try:
            with agree(world):
                if not nccl_ok:
                    raise ValueError(f"--comm nccl: {nccl_text}")
                if active:
                    path = NcclPath(c)
        except (ValueError, RuntimeError) as exc:
            if path is not None:  # this rank succeeded where another failed
                path.close()
            if comm != "auto":
                raise
            chosen, path = ("mpi" if binding.cuda_aware else "staged"), None
            binding.notes.append(f"NCCL failed on the {role} communicator ({exc}); using {chosen}")
    if not active:
        return
    if chosen == "mpi":
        path = CudaAwarePath()
        if not binding.cuda_aware:
            binding.notes.append("mpi forced although the MPI library reports no CUDA support")
    elif chosen == "staged":
        path = StagedPath()
    c.set_device_path(path)
    binding.paths[role] = chosen
