"""The commands: `mpisplit train | generate | convert | serve | plot` (main.py) and one module per command.
Imports everything below; nothing imports cli/.
"""
