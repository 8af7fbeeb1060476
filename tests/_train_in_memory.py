"""The reference run of test_train_prepared.py: `train.py` with its data replaced by token
arrays held in memory (nothing memory-mapped, no prepared folder).

    python tests/_train_in_memory.py TRAIN.npy VAL.npy VOCAB_SIZE TRAIN_FLAGS...
"""

from __future__ import annotations

import sys

import numpy as np

from mpisplit.cli import train as cli
from mpisplit.runtime.errors import run_cli
from mpisplit.training import trainer
from mpisplit.training.data import TokenDataset
from mpisplit.training.setup import Data

if __name__ == "__main__":
    train = np.load(sys.argv[1]).astype(np.int64)
    val = np.load(sys.argv[2]).astype(np.int64)
    vocab = int(sys.argv[3])
    trainer.load_data = lambda config, rank=0, size=1: Data(TokenDataset(train, val, vocab), "in memory", None)
    run_cli(lambda: cli.main(sys.argv[4:]), cli.USER_ERRORS)
