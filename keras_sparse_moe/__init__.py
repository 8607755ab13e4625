"""keras_sparse_moe: sparse layers and mixtures of sparse experts for Keras 3."""

from keras_sparse_moe import (
    callbacks,
    constraints,
    datasets,
    distribution,
    layers,
    losses,
    manifold,
    ops,
    optimizers,
    plots,
    routing,
    saving,
    schedules,
    topologies,
    validation,
)
from keras_sparse_moe.conversion import convert_implementation, sparsify, strip
from keras_sparse_moe.layers import SparseDense, SparseExpertMixture
from keras_sparse_moe.manifold import ParametricTSNE
from keras_sparse_moe.reporting import summary
from keras_sparse_moe.walk import find_layers

__version__ = "0.1.0"

__all__ = [
    "ParametricTSNE",
    "SparseDense",
    "SparseExpertMixture",
    "__version__",
    "callbacks",
    "constraints",
    "convert_implementation",
    "datasets",
    "find_layers",
    "distribution",
    "layers",
    "losses",
    "manifold",
    "saving",
    "ops",
    "optimizers",
    "plots",
    "routing",
    "schedules",
    "sparsify",
    "strip",
    "summary",
    "topologies",
    "validation",
]
