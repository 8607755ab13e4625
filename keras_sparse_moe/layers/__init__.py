"""Keras layers of keras_sparse_moe."""

from keras_sparse_moe.layers.expert_mixture import SparseExpertMixture
from keras_sparse_moe.layers.gates import Gate, NoisyTopKGate, OracleGate, Routing, SoftmaxGate
from keras_sparse_moe.layers.ptsne_gate import PTSNEGate
from keras_sparse_moe.layers.sparse_conv import SparseConv1D, SparseConv2D
from keras_sparse_moe.layers.sparse_dense import SparseDense
from keras_sparse_moe.layers.sparse_kernel import SparseKernelLayer

__all__ = [
    "Gate",
    "NoisyTopKGate",
    "OracleGate",
    "PTSNEGate",
    "Routing",
    "SoftmaxGate",
    "SparseConv1D",
    "SparseConv2D",
    "SparseDense",
    "SparseExpertMixture",
    "SparseKernelLayer",
]
