"""Callbacks: evolve `SparseDense` connectivity during `model.fit`; log mixtures."""

from keras_sparse_moe.callbacks.balancing import BiasBalancing
from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.callbacks.monitoring import ActivationRateLogger
from keras_sparse_moe.callbacks.pruning import MagnitudePruning
from keras_sparse_moe.callbacks.rigl import RigL
from keras_sparse_moe.callbacks.set_evolution import SETEvolution

__all__ = [
    "ActivationRateLogger",
    "BiasBalancing",
    "MagnitudePruning",
    "RigL",
    "SETEvolution",
    "SparseTrainingCallback",
]
