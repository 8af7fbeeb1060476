"""mpisplit: layer-split (tensor-parallel) training and serving of neural networks on MPI.

    import mpisplit as ms
    grid = ms.ProcessGrid(tp=2)
    model = ms.GPT(ms.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64), grid)
    opt = ms.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model.loss(idx, targets); loss.backward(); opt.step(); opt.zero_grad()
"""

__version__ = "0.1.0"

from .allocator import tune_malloc

tune_malloc()  # reuse freed activation buffers instead of page-faulting them back each step

from . import ops, optim
from .backend import get_array_module, limit_blas_threads, to_numpy
from .comm import Communicator
from .grid import ProcessGrid
from .layers import ColumnParallelLinear, LayerNorm, Linear, ParallelMLP, RowParallelLinear
from .models.gpt import GPT, GPTConfig
from .module import Module, Parameter
from .tensor import Function, Tensor, no_grad

__all__ = [
    "GPT",
    "ColumnParallelLinear",
    "Communicator",
    "Function",
    "GPTConfig",
    "LayerNorm",
    "Linear",
    "Module",
    "ParallelMLP",
    "Parameter",
    "ProcessGrid",
    "RowParallelLinear",
    "Tensor",
    "amp",
    "device",
    "get_array_module",
    "limit_blas_threads",
    "no_grad",
    "ops",
    "optim",
    "to_numpy",
]
