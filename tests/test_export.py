"""SavedModel export of every layer and gate, on TensorFlow and JAX, at any batch size."""

import os

import keras
import numpy as np
import pytest

from keras_sparse_moe.layers import (
    NoisyTopKGate,
    OracleGate,
    PTSNEGate,
    SparseConv1D,
    SparseConv2D,
    SparseDense,
    SparseExpertMixture,
)
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)
MIXTURE = dict(units=3, num_experts=4, expert_units=8, expert_density=0.5, seed=0)


def _sequential(layer, dim=10):
    return keras.Sequential([keras.Input((dim,)), layer])


def _user_experts():
    return [
        keras.Sequential([keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
        for _ in range(3)
    ]


def _oracle():
    x_in, index_in = keras.Input((10,)), keras.Input((1,), dtype="int32")
    mixture = SparseExpertMixture(
        gate=OracleGate(2), top_k=1, capacity_factor=1.0, units=3, num_experts=2, seed=1
    )
    return keras.Model([x_in, index_in], mixture(x_in, gate_inputs=index_in))


MODELS = {
    "sparse_dense": lambda: _sequential(SparseDense(7, density=0.3, activation="relu", seed=0)),
    "sparse_dense_sparse_storage": lambda: _sequential(
        SparseDense(7, density=0.3, activation="relu", seed=0, implementation="sparse")
    ),
    "sparse_conv1d": lambda: keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Reshape((10, 1)),
            SparseConv1D(4, 3, padding="causal", density=0.5, activation="relu", seed=0),
            keras.layers.Flatten(),
        ]
    ),
    "sparse_conv2d_sparse_storage": lambda: keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Reshape((5, 2, 1)),
            SparseConv2D(3, 2, padding="same", density=0.5, implementation="sparse", seed=0),
            keras.layers.Flatten(),
        ]
    ),
    "softmax_routes_capacity": lambda: _sequential(
        SparseExpertMixture(top_k=2, capacity_factor=1.0, route_density=0.2, **MIXTURE)
    ),
    "noisy_top_k_capacity": lambda: _sequential(
        SparseExpertMixture(gate=NoisyTopKGate(4, top_k=2, seed=0), capacity_factor=1.25, **MIXTURE)
    ),
    "user_experts": lambda: _sequential(
        SparseExpertMixture(experts=_user_experts(), top_k=2, capacity_factor=1.0)
    ),
    "ptsne_gate": lambda: _sequential(
        SparseExpertMixture(
            gate=PTSNEGate(4, perplexity=5.0, seed=0), top_k=2, capacity_factor=1.0, **MIXTURE
        )
    ),
    "oracle_gate_inputs": _oracle,
}


def _inputs(name, batch):
    x = RNG.standard_normal((batch, 10)).astype("float32")
    if name == "oracle_gate_inputs":
        return [x, RNG.integers(0, 2, (batch, 1)).astype("int32")]
    return [x]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_model_export_reloads_with_equal_outputs(name, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="SavedModel export needs TensorFlow")
    model = MODELS[name]()
    model.compile("adam", "mse")
    train = _inputs(name, 32)
    train = train if len(train) > 1 else train[0]
    model.fit(train, RNG.standard_normal((32, model.output_shape[-1])), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    for batch in (1, 5, 32):  # the batch size is left dynamic
        inputs = _inputs(name, batch)
        expected = to_numpy(model(inputs if len(inputs) > 1 else inputs[0]))
        served = reloaded.serve(inputs if len(inputs) > 1 else inputs[0])
        np.testing.assert_allclose(np.asarray(served), expected, rtol=1e-5, atol=1e-5)
