"""Gates: softmax, noisy top-k (with Shazeer's load) and oracle against numpy."""

import keras
import numpy as np
import pytest
from scipy.special import ndtr, softmax

from keras_sparse_moe.layers import NoisyTopKGate, OracleGate, SoftmaxGate
from tests.test_case import assert_config_covers_init, to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 6)).astype("float32")


def test_softmax_gate_matches_numpy():
    gate = SoftmaxGate(4)
    gates = to_numpy(gate(X))
    kernel, bias = (to_numpy(w) for w in gate.network.weights)
    np.testing.assert_allclose(gates, softmax(X @ kernel + bias, axis=-1), rtol=1e-5, atol=1e-6)
    assert gates.dtype == np.float32


def test_softmax_gate_over_a_network_and_width_check():
    network = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    gate = SoftmaxGate(3, network=network)
    assert to_numpy(gate(X)).shape == (32, 3)
    with pytest.raises(ValueError, match="num_experts=4"):
        SoftmaxGate(4, network=keras.layers.Dense(3))(X)
    with pytest.raises(TypeError, match="network"):
        SoftmaxGate(4, network="dense")


def test_router_math_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    gate = SoftmaxGate(3, network=keras.layers.Dense(3))  # a float16 network
    routing = gate.route(X)
    assert routing.logits.dtype == "float32" and routing.gates.dtype == "float32"
    assert NoisyTopKGate(3, top_k=1).compute_dtype == "float32"


def _set_noisy_weights(gate):
    gate.build(X.shape)
    gate.gate_kernel.assign(RNG.standard_normal(gate.gate_kernel.shape).astype("float32"))
    gate.noise_kernel.assign(RNG.standard_normal(gate.noise_kernel.shape).astype("float32"))
    return to_numpy(gate.gate_kernel), to_numpy(gate.noise_kernel)


def test_noisy_top_k_inference_is_softmax_over_the_clean_top_k():
    gate = NoisyTopKGate(5, top_k=2)
    w_gate, _ = _set_noisy_weights(gate)
    gates = to_numpy(gate(X, training=False))
    clean = X @ w_gate
    expected = np.zeros_like(clean)
    for row, logits in enumerate(clean):
        top = np.argsort(-logits)[:2]
        expected[row, top] = softmax(logits[top])
    np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-6)


def test_noisy_top_k_training_noise_and_load_match_the_paper():
    gate = NoisyTopKGate(5, top_k=2, noise_epsilon=0.01, seed=3)
    w_gate, w_noise = _set_noisy_weights(gate)
    routing = gate.route(X, training=True)
    noisy, gates, load = (to_numpy(v) for v in (routing.logits, routing.gates, routing.load))
    clean = X @ w_gate
    std = np.log1p(np.exp(X @ w_noise)) + 0.01
    assert not np.allclose(noisy, clean)  # noise is on in training
    assert np.all(np.count_nonzero(gates, axis=1) == 2)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-6)
    expected = np.zeros(5)
    for row in range(len(X)):
        order = np.sort(noisy[row])[::-1]
        for e in range(5):
            selected = noisy[row, e] >= order[1]
            threshold = order[2] if selected else order[1]
            expected[e] += ndtr((clean[row, e] - threshold) / std[row, e])
    np.testing.assert_allclose(load, expected, rtol=1e-4, atol=1e-5)


def test_noisy_top_k_starts_at_zero():
    gate = NoisyTopKGate(4, top_k=1)
    gate.build(X.shape)
    assert not np.any(to_numpy(gate.gate_kernel)) and not np.any(to_numpy(gate.noise_kernel))


def test_oracle_gate_is_one_hot():
    gate = OracleGate(3)
    index = np.array([[2], [0], [1], [5]], dtype="int32")
    np.testing.assert_array_equal(
        to_numpy(gate(index)), [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]]
    )
    with pytest.raises(ValueError, match="one integer expert index"):
        OracleGate(3)(np.zeros((4, 3), "int32"))


@pytest.mark.parametrize(
    "gate",
    [
        lambda: SoftmaxGate(3),
        lambda: SoftmaxGate(3, network=keras.Sequential([keras.layers.Dense(3)])),
        lambda: NoisyTopKGate(4, top_k=2, noise_epsilon=0.1, seed=1),
        lambda: OracleGate(2),
    ],
)
def test_config_round_trip(gate):
    assert_config_covers_init(gate())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SoftmaxGate(0), ValueError, "num_experts=0"),
        (lambda: NoisyTopKGate(3, top_k=4), ValueError, "top_k=4"),
        (lambda: NoisyTopKGate(3, top_k=0), ValueError, "top_k=0"),
        (lambda: NoisyTopKGate(3, top_k=1.5), TypeError, "top_k=1.5"),
        (lambda: NoisyTopKGate(3, top_k=1, noise_epsilon=-1), ValueError, "noise_epsilon=-1"),
    ],
)
def test_invalid_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
