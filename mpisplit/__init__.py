"""mpisplit: layer-split (tensor-parallel) training and serving of neural networks on MPI.

    import mpisplit as ms
    grid = ms.ProcessGrid(tp=2)
    model = ms.GPT(ms.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64), grid)
    opt = ms.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model.loss(idx, targets); loss.backward(); opt.step(); opt.zero_grad()

The layers, from the bottom: runtime/ (arrays, devices, errors, faults), autograd/, parallel/
(communicators, grid, differentiable collectives), nn/ (split layers), models/, data/ (prepared
corpora), training/ (the loop, optimizers, checkpoints), cli/ (the `mpisplit` command). Each imports
only those below.
"""

__version__ = "0.1.0"

from mpisplit.runtime.allocator import tune_malloc

tune_malloc()  # reuse freed activation buffers instead of page-faulting them back each step

from mpisplit.autograd import Function, Tensor, no_grad, ops
from mpisplit.models import GPT, GPTConfig
from mpisplit.nn import (
    ColumnParallelLinear,
    LayerNorm,
    Linear,
    Module,
    ParallelMLP,
    Parameter,
    RowParallelLinear,
)
from mpisplit.parallel import Communicator, ProcessGrid
from mpisplit.parallel.gpu import use_gpu
from mpisplit.runtime import device
from mpisplit.runtime.backend import get_array_module, limit_blas_threads, to_numpy
from mpisplit.training import TrainConfig, Trainer, amp, optim, train

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
    "TrainConfig",
    "Trainer",
    "amp",
    "device",
    "get_array_module",
    "limit_blas_threads",
    "no_grad",
    "ops",
    "optim",
    "to_numpy",
    "train",
    "use_gpu",
]
