"""Keras layers of keras_sparse_moe."""

from keras_sparse_moe.layers.sparse_dense import SparseDense

__all__ = ["SparseDense"]
