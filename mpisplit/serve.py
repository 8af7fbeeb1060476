"""`python -m mpisplit.serve`: the same as `mpisplit serve` (see mpisplit/cli/serve.py)."""

if __name__ == "__main__":
    from mpisplit.cli.serve import USER_ERRORS, main
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: main(prog="python -m mpisplit.serve"), USER_ERRORS)
