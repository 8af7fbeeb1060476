"""Sharded, atomic safetensors checkpoints that load at any tensor-parallel degree.

layout.py  the folder layout, names and the shard record (`ShardInfo`)
writer.py  save_checkpoint: each TP rank writes its slabs, each DP rank its pieces, rank 0 the index,
           then an atomic rename
index.py   validation of index.json
reader.py  CheckpointReader / load_shard / load_range at any layout; latest_checkpoint of a run folder
"""

from mpisplit.training.checkpoint.layout import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    LATEST_NAME,
    ShardInfo,
)
from mpisplit.training.checkpoint.reader import (
    CheckpointReader,
    latest_checkpoint,
    load_range,
    load_shard,
)
from mpisplit.training.checkpoint.writer import save_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LATEST_NAME",
    "CheckpointReader",
    "ShardInfo",
    "latest_checkpoint",
    "load_range",
    "load_shard",
    "save_checkpoint",
]
