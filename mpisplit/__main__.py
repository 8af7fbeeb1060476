"""`python -m mpisplit COMMAND ...`: the same as the `mpisplit` command."""

from mpisplit.cli.main import main

main()
