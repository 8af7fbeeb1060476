"""Train a character-level GPT split over MPI ranks: `mpirun -n 4 python train.py`.

The same command as `mpisplit train` (see `python train.py --help`); the loop itself is
mpisplit.training.Trainer, which Python code can also drive directly.
"""

if __name__ == "__main__":
    from mpisplit.cli.train import USER_ERRORS, main
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: main(script=__file__), USER_ERRORS)
