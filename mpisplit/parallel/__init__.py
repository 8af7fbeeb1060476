"""Communication: the Communicator (buffer collectives with counters), the dp x pp x tp
ProcessGrid, the differentiable f/g collectives (mappings.py), the pipeline's point-to-point
messages and 1F1B schedule (pipeline/) and the GPU paths of the collectives.
Imports autograd/ and runtime/.
"""

from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.grid import ProcessGrid

__all__ = ["Communicator", "ProcessGrid"]
