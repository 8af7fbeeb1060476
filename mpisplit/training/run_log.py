"""What a run shows and keeps on rank 0: messages, the progress bar and DIR/metrics.jsonl.

Every method is a no-op on the other ranks, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class RunLog:
    def __init__(self, rank: int, out: Path, *, start_step: int, total: int, progress: bool) -> None:
        self.rank, self.out = rank, out
        self.metrics = None
        self.progress = None
        if rank != 0:
            return
        if start_step:
            truncate_metrics(out / METRICS_NAME, start_step)  # lines a crash left past the checkpoint
        self.metrics = open(out / METRICS_NAME, "a" if start_step else "w")  # noqa: SIM115
        if progress:
            from tqdm import tqdm

            self.progress = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def say(self, *msg: object) -> None:
        if self.rank == 0:
            print(*msg, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step_done(self, loss: float, val_loss: float | None, evaluated: bool, step: int) -> None:
        """Advance the bar (or print the evaluations when there is none)."""
        if self.rank != 0:
            return
        line = f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}" if evaluated else None
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{loss:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
            self.progress.update(1)
            if line:
                self.progress.write(line)
        elif line:
            print(line, flush=True)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        self.close_progress()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines of steps <= step (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        kept.append(line)
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, skipping a line a crash cut short."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            print(f"{path}: skipped a line that is not JSON", file=sys.stderr)
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out
