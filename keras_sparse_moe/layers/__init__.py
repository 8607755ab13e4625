"""Keras layers of keras_sparse_moe."""

from keras_sparse_moe.layers.expert_mixture import SparseExpertMixture
from keras_sparse_moe.layers.gates import Gate, NoisyTopKGate, OracleGate, SoftmaxGate
from keras_sparse_moe.layers.sparse_dense import SparseDense

__all__ = [
    "Gate",
    "NoisyTopKGate",
    "OracleGate",
    "SoftmaxGate",
    "SparseDense",
    "SparseExpertMixture",
]
