"""Scaffolding shared by the examples and the benchmarks: the MLP of the SET paper, weight
counts, data loading (always through `keras_sparse_moe.datasets`).

Scripts import it as `common` (examples from their own folder; benchmarks put
this folder on `sys.path` first).
"""

from __future__ import annotations

import os

import keras
import numpy as np

import keras_sparse_moe as ksm

# The SET paper's MNIST MLP: 784-1000-1000-1000-10.
HIDDEN = (1000, 1000, 1000)
# SET's sparsity parameter for its hidden layers.
EPSILON = 20.0


def build_mlp(
    hidden_layer,
    input_dim=784,
    num_classes=10,
    hidden=HIDDEN,
    optimizer=None,
    dropout=0.0,
    metrics=("accuracy",),
    seed=None,
):
    """`input -> hidden_layer(units, i) for each width -> softmax`, compiled under XLA.

    `hidden_layer(units, i)` makes the i-th hidden layer (ReLU), e.g. a
    `keras.layers.Dense` or a `keras_sparse_moe.layers.SparseDense`. At
    epsilon=20 a 1000x10 output layer would be denser than full, so the output
    stays `Dense`. Adam 1e-3 unless `optimizer` is given.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for i, units in enumerate(hidden):
        x = hidden_layer(units, i)(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    model.compile(
        optimizer or keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        metrics=list(metrics),
        jit_compile=True,
    )
    return model


def dense_layer(units, i=0):
    return keras.layers.Dense(units, activation="relu")


def sparse_layer(epsilon=EPSILON, seed=0):
    """A `hidden_layer` for `build_mlp`: SparseDense at SET's `epsilon`, layer i seeded
    `seed + i`."""
    return lambda units, i=0: ksm.layers.SparseDense(
        units, epsilon=epsilon, activation="relu", seed=seed + i
    )


def weight_count(model):
    """(weights used, weights of the same model fully connected): kernels + biases."""
    used = full = 0
    for layer in model.layers:
        for weight in layer.trainable_weights:
            size = int(np.prod(weight.shape))
            full += size
            if isinstance(layer, ksm.layers.SparseDense) and weight is layer.kernel:
                size = layer.num_connections
            used += size
    return used, full


def load_named(data_dir, name, train=None, test=None):
    """`data_dir/<name>.npz` as a `keras_sparse_moe.datasets.Dataset`, optionally the first
    `train` / `test` samples of each split."""
    data = ksm.datasets.load_image_classification(os.path.join(data_dir, f"{name}.npz"))
    data.x_train, data.y_train = data.x_train[:train], data.y_train[:train]
    data.x_test, data.y_test = data.x_test[:test], data.y_test[:test]
    return data
