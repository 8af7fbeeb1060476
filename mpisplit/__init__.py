"""Layer-split (tensor-parallel) training and serving of neural networks on MPI."""

__version__ = "0.1.0"
