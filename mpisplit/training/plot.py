"""The loss curve of a run: RUN_DIR/loss.png from RUN_DIR/metrics.jsonl.

Train loss (line) and validation loss (points) against the step, and tokens/s on a second axis.
Needs matplotlib (`pip install "mpisplit[plot]"`); without it the end of training says so and
`mpisplit plot` is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpisplit.training.run_log import METRICS_NAME, read_metrics

PLOT_NAME = "loss.png"


@dataclass
class PlotResult:
    path: Path | None  # the PNG written, or None
    message: str  # one line for the user: where it is, or why there is none
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # what was drawn


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of the train loss, validation loss and tokens/s in the records."""
    out: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": [], "tokens_per_s": []}
    for rec in records:
        for key, points in out.items():
            value = rec.get(key)
            if isinstance(value, (int, float)):
                points.append((int(rec["step"]), float(value)))
    return out


def plot_run(run_dir: str | Path, *, missing_ok: bool = False) -> PlotResult:
    """Write run_dir/loss.png. ValueError for a folder without metrics; without matplotlib, a
    PlotResult with no path when `missing_ok`, else ValueError saying how to install it."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no {METRICS_NAME}: is it a training run folder (--out)?")
    series = curves(read_metrics(metrics))
    if not series["loss"]:
        raise ValueError(f"{metrics} holds no training loss yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        hint = 'no loss curve: matplotlib is not installed (pip install "mpisplit[plot]")'
        if missing_ok:
            return PlotResult(None, hint, series)
        raise ValueError(hint) from None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*series["loss"]), color="tab:blue", label="train loss")
    if series["val_loss"]:
        ax.plot(*zip(*series["val_loss"]), "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if series["tokens_per_s"]:
        speed = ax.twinx()
        speed.plot(*zip(*series["tokens_per_s"]), ":", color="tab:gray", label="tokens/s")
        speed.set_ylabel("tokens/s")
        more = speed.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="upper right")
    ax.set_title(f"{run_dir.resolve().name}: {series['loss'][-1][0]} steps")
    fig.tight_layout()
    path = run_dir / PLOT_NAME
    fig.savefig(path)
    plt.close(fig)
    return PlotResult(path, f"loss curve -> {path}", series)
