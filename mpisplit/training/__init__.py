"""Training: the loop (trainer.py, driven by a TrainConfig), what a run builds first (setup.py),
the forward and backward of a step's micro-batches, pipelined or accumulated (step.py),
optimizers (AdamW with its state sharded over the DP ranks: sharded_optim.py) and the
learning-rate schedule, mixed precision, data, sharded checkpoints and the
training state they hold, the run log and the loss curve. Imports models/ and below.
"""

from mpisplit.training import amp, optim
from mpisplit.training.config import TrainConfig
from mpisplit.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "amp", "optim", "train"]
