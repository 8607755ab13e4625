"""keras_sparse_moe: sparse layers and mixtures of sparse experts for Keras 3."""

from keras_sparse_moe import datasets, layers, ops, topologies
from keras_sparse_moe.layers import SparseDense

__version__ = "0.1.0"

__all__ = ["SparseDense", "__version__", "datasets", "layers", "ops", "topologies"]
