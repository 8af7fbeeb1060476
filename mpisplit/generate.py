"""`python -m mpisplit.generate`: the same as `mpisplit generate` (see mpisplit/cli/generate.py)."""

if __name__ == "__main__":
    from mpisplit.cli.generate import USER_ERRORS, main
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: main(prog="python -m mpisplit.generate"), USER_ERRORS)
