"""keras_sparse_moe: sparse layers and mixtures of sparse experts for Keras 3."""

from keras_sparse_moe import (
    callbacks,
    datasets,
    layers,
    losses,
    manifold,
    metrics,
    ops,
    plots,
    schedules,
    topologies,
)
from keras_sparse_moe.conversion import sparsify
from keras_sparse_moe.layers import SparseDense, SparseExpertMixture
from keras_sparse_moe.manifold import ParametricTSNE

__version__ = "0.1.0"

__all__ = [
    "ParametricTSNE",
    "SparseDense",
    "SparseExpertMixture",
    "__version__",
    "callbacks",
    "datasets",
    "layers",
    "losses",
    "manifold",
    "metrics",
    "ops",
    "plots",
    "schedules",
    "sparsify",
    "topologies",
]
