"""`python -m mpisplit.chat`: the same as `mpisplit chat` (see mpisplit/cli/chat.py)."""

if __name__ == "__main__":
    from mpisplit.cli.chat import USER_ERRORS, main
    from mpisplit.runtime.errors import run_cli

    run_cli(lambda: main(prog="python -m mpisplit.chat"), USER_ERRORS)
