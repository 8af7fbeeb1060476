"""The commands: `mpisplit train | generate | convert | plot` (main.py) and one module per command.
Imports everything below; nothing imports cli/.
"""
