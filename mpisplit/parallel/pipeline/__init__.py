"""Pipeline parallelism: point-to-point buffer messages between neighbouring stages (p2p.py)
and the 1F1B schedule that drives one stage's micro-batches (schedule.py)."""

from mpisplit.parallel.pipeline.p2p import StageLink
from mpisplit.parallel.pipeline.schedule import forward_only, one_forward_one_backward, warmup_count

__all__ = ["StageLink", "forward_only", "one_forward_one_backward", "warmup_count"]
