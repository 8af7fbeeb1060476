"""Where the ranks of a grid sit: a tensor-parallel group should share one node.

Each layer's TP all-reduce moves the activations of every token, so a TP group that spans nodes
sends them over the network instead of shared memory. Nodes are MPI's own: the ranks of one
shared-memory split (MPI_COMM_TYPE_SHARED), named by the processor name of their first rank.
"""

from __future__ import annotations

import sys
from typing import Any

from mpi4py import MPI


def node_names(world: Any) -> list[str]:
    """Every world rank's node, as the processor name of that node's first rank. Collective."""
    world = getattr(world, "mpi", world)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        name = node.bcast(MPI.Get_processor_name() if node.Get_rank() == 0 else None, root=0)
        leader = node.bcast(world.Get_rank(), root=0)
    finally:
        node.Free()
    return [f"{n} (rank {r})" for n, r in world.allgather((name, leader))]


def split_tp_groups(world: Any, tp: int) -> list[tuple[list[int], list[str]]]:
    """The TP groups (consecutive world ranks, tp of them) whose ranks sit on more than one node,
    with those nodes. Collective over `world`."""
    nodes = node_names(world)
    spans = []
    for first in range(0, len(nodes), tp):
        ranks = list(range(first, first + tp))
        held = sorted({nodes[r] for r in ranks})
        if len(held) > 1:
            spans.append((ranks, held))
    return spans


def warn_split_tp_groups(world: Any, tp: int) -> None:
    """Rank 0 warns once, naming them, when TP groups span nodes. Collective over `world`."""
    spans = split_tp_groups(world, tp)
    if spans and getattr(world, "mpi", world).Get_rank() == 0:
        ranks, held = spans[0]
        print(f"warning: {len(spans)} tensor-parallel group(s) span nodes, e.g. ranks {ranks} on "
              f"{', '.join(held)}: each layer's all-reduce crosses the network. Place ranks node by node "
              "with --tp at most the ranks per node (TP varies fastest over the world ranks).",
              file=sys.stderr, flush=True)
