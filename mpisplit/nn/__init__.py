"""Layers: Module and Parameter, the split linear layers, LayerNorm, the MLP, parallel
self-attention, the vocab-parallel embedding and cross-entropy. Imports parallel/ and below.
"""

from mpisplit.nn.attention import KVCache, ParallelSelfAttention
from mpisplit.nn.cross_entropy import vocab_parallel_cross_entropy
from mpisplit.nn.embedding import VocabParallelEmbedding
from mpisplit.nn.layernorm import LayerNorm
from mpisplit.nn.linear import ColumnParallelLinear, Linear, RowParallelLinear
from mpisplit.nn.mlp import ParallelMLP
from mpisplit.nn.module import Module, Parameter

__all__ = [
    "ColumnParallelLinear",
    "KVCache",
    "LayerNorm",
    "Linear",
    "Module",
    "ParallelMLP",
    "ParallelSelfAttention",
    "Parameter",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
