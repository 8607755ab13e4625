"""Per-group learning rates: exact multiples of the plain optimizer's update."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.optimizers import scale_learning_rates
from tests.test_case import to_numpy

# The optimizer wrapper's `build` runs inside `fit`'s first trace on TensorFlow, as
# Keras does it without a strategy (tests/conftest.py builds first elsewhere).
pytestmark = pytest.mark.keras_deferred_build

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 6)).astype("float32")
Y = RNG.standard_normal((32, 2)).astype("float32")


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh", name="body"),
            keras.layers.Dense(4, activation="tanh", name="frozen"),
            keras.layers.Dense(2, name="head"),
        ],
        name="net",
    )
    model.compile(optimizer, "mse")
    return model


def _weights(model):
    return {v.path: to_numpy(v).copy() for v in model.trainable_variables}


@pytest.mark.parametrize(
    "make", [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.Adam(1e-2)]
)
def test_updates_are_the_plain_updates_times_the_multiplier(make):
    plain, scaled = (
        _model(make()),
        _model(scale_learning_rates(make(), {"head": 4.0, "frozen": 0.0})),
    )
    start = _weights(plain)
    assert all(np.array_equal(start[k], v) for k, v in _weights(scaled).items())
    # One step: every update is lr * (something that does not depend on lr).
    plain.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    scaled.fit(X, Y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    after_plain, after_scaled = _weights(plain), _weights(scaled)
    for path in start:
        delta_plain = after_plain[path] - start[path]
        delta_scaled = after_scaled[path] - start[path]
        factor = 4.0 if "/head/" in path else 0.0 if "/frozen/" in path else 1.0
        assert np.abs(delta_plain).max() > 0
        np.testing.assert_allclose(delta_scaled, factor * delta_plain, rtol=1e-4, atol=1e-7)


def test_first_matching_pattern_decides_and_unmatched_patterns_fail():
    optimizer = scale_learning_rates(keras.optimizers.SGD(0.1), {"body/bias": 0.0, "body": 2.0})
    model = _model(optimizer)
    bias = to_numpy(model.get_layer("body").bias).copy()
    model.fit(X, Y, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.get_layer("body").bias), bias)
    model = _model(scale_learning_rates(keras.optimizers.SGD(0.1), {"gaet": 2.0}))
    with pytest.raises(ValueError, match=r"\['gaet'\] match no trainable variable"):
        model.fit(X, Y, verbose=0)


def test_a_faster_gate_in_a_mixture():
    # The use it is made for: a gate network with its own learning rate.
    def build(optimizer):
        keras.utils.set_random_seed(2)
        moe = ksm.layers.SparseExpertMixture(
            units=2,
            num_experts=2,
            expert_units=8,
            gate=ksm.layers.SoftmaxGate(2),
            seed=0,
            name="moe",
        )
        model = keras.Sequential([keras.Input((6,)), moe], name="net")
        model.compile(optimizer, "mse")
        return model

    plain = build(keras.optimizers.SGD(0.05))
    fast = build(scale_learning_rates(keras.optimizers.SGD(0.05), {"gate": 3.0}))
    paths = [v.path for v in fast.trainable_variables]
    is_gate = ["gate" in p for p in paths]
    assert any(is_gate) and not all(is_gate)
    start = [to_numpy(v).copy() for v in plain.trainable_variables]
    plain.fit(X, Y, batch_size=32, shuffle=False, verbose=0)
    fast.fit(X, Y, batch_size=32, shuffle=False, verbose=0)
    for v_plain, v_fast, w, gate in zip(
        plain.trainable_variables, fast.trainable_variables, start, is_gate
    ):
        np.testing.assert_allclose(
            to_numpy(v_fast) - w, (3.0 if gate else 1.0) * (to_numpy(v_plain) - w), atol=1e-6
        )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: scale_learning_rates("adam", {"a": 1.0}), TypeError, "optimizer='adam'"),
        (lambda: scale_learning_rates(keras.optimizers.SGD(), {}), TypeError, "non-empty dict"),
        (lambda: scale_learning_rates(keras.optimizers.SGD(), {"a": -1.0}), ValueError, "-1.0"),
        (lambda: scale_learning_rates(keras.optimizers.SGD(), {"a": "x"}), TypeError, "'x'"),
        (lambda: scale_learning_rates(keras.optimizers.SGD(), {3: 1.0}), TypeError, "3"),
    ],
)
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
