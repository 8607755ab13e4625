"""Callbacks that evolve `SparseDense` connectivity during `model.fit`."""

from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.callbacks.pruning import MagnitudePruning
from keras_sparse_moe.callbacks.rigl import RigL
from keras_sparse_moe.callbacks.set_evolution import SETEvolution

__all__ = ["MagnitudePruning", "RigL", "SETEvolution", "SparseTrainingCallback"]
