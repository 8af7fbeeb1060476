"""Autograd: Tensor, Function and backward (tensor.py), the primitives one file per kind
(elementwise, shape, linalg, reductions, losses, attention), gathered in `ops`.

Imports only mpisplit.runtime (the array backend) and mpisplit.kernels (the fused CPU
kernels some primitives run when they apply); knows nothing of MPI.
"""

from mpisplit.autograd import operators, ops
from mpisplit.autograd.tensor import Function, Tensor, is_grad_enabled, no_grad

operators.install()

__all__ = ["Function", "Tensor", "is_grad_enabled", "no_grad", "ops"]
