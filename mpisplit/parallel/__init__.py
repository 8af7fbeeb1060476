"""Communication: the Communicator (buffer collectives with counters), the dp x tp ProcessGrid,
the differentiable f/g collectives (mappings.py) and the GPU paths of the collectives.
Imports autograd/ and runtime/.
"""

from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.grid import ProcessGrid

__all__ = ["Communicator", "ProcessGrid"]
