"""`python -m mpisplit.convert`: the same as `mpisplit convert` (see mpisplit/cli/convert.py)."""

if __name__ == "__main__":
    from mpisplit.cli.convert import USER_ERRORS, main
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: main(prog="python -m mpisplit.convert"), USER_ERRORS)
