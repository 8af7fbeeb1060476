"""`mpisplit plot RUN_DIR`: draw RUN_DIR/loss.png (train and validation loss, tokens/s) from
RUN_DIR/metrics.jsonl. Needs matplotlib (pip install "mpisplit[plot]"); no MPI."""

from __future__ import annotations

import argparse

USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (train's --out)")
    args = p.parse_args(argv)
    from mpisplit.training.plot import plot_run

    print(plot_run(args.run_dir).message, flush=True)
    return 0
