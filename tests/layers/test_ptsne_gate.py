"""PTSNEGate: gate values against numpy, the t-SNE loss, positions, mixture training, saving, errors."""

import os

import keras
import numpy as np
import pytest
from scipy.special import softmax
from sklearn.datasets import load_digits

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import PTSNEGate, SparseExpertMixture
from keras_sparse_moe.ops import tsne
from tests.test_case import assert_config_covers_init, assert_masked_weights_zero, to_numpy

X, Y = load_digits(return_X_y=True)
X = (X / 16.0).astype("float32")[:384]
Y = Y[:384]


def _gate(**kwargs):
    return PTSNEGate(4, **{"perplexity": 10.0, "seed": 0, **kwargs})


def test_gate_values_fall_off_with_distance_to_the_positions():
    gate = _gate(temperature=0.5)
    gates = to_numpy(gate(X[:64]))
    y = to_numpy(gate.embed(X[:64]))
    z = (y - to_numpy(gate.map_centre)) / np.sqrt(to_numpy(gate.map_scale))
    d2 = ((z[:, None] - to_numpy(gate.positions)[None]) ** 2).sum(-1)
    np.testing.assert_allclose(gates, softmax(-d2 / 0.5, axis=1), atol=1e-5)
    # The nearest position gets the largest value.
    np.testing.assert_array_equal(gates.argmax(1), d2.argmin(1))


def test_route_returns_the_embedding_and_the_tsne_loss_in_training():
    gate = _gate()
    gate(X[:64])
    routing = gate.route(X[:64], training=True)
    y = to_numpy(routing.embedding)
    assert y.shape == (64, 2)
    expected = to_numpy(tsne.tsne_kl(tsne.joint_affinities(X[:64], 10.0), y))
    assert float(to_numpy(routing.losses["tsne_kl"])) == pytest.approx(float(expected), rel=1e-5)
    assert gate.route(X[:64], training=False).losses is None
    assert gate.loss_weights == {"tsne_kl": 1.0}
    # A zero weight leaves the loss out altogether (no affinities computed, nothing added).
    silent = _gate(tsne_weight=0.0)
    silent(X[:64])
    assert silent.loss_weights == {} and silent.route(X[:64], training=True).losses is None


def test_standalone_gate_adds_its_weighted_loss_in_training():
    inputs = keras.Input((64,))
    gate = _gate(tsne_weight=0.5)
    model = keras.Model(inputs, gate(inputs))
    model(X[:64], training=True)
    (added,) = model.losses
    gate_loss = gate.route(X[:64], training=True).losses["tsne_kl"]
    assert float(to_numpy(added)) == pytest.approx(0.5 * float(to_numpy(gate_loss)), rel=1e-5)


def _embedding_gradients(gate, x):
    """Gradient norms of a task loss (sum of gate values times a fixed target) on the embedding."""
    target = np.eye(4, dtype="float32")[np.arange(len(x)) % 4]
    variables = gate.embedding.trainable_variables

    def task(*values):
        for variable, value in zip(variables, values):
            variable.assign(value)
        return keras.ops.sum(gate.route(x, training=False).gates * target)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(gate.route(x, training=False).gates * target)
        grads = tape.gradient(loss, [v.value for v in variables])
    else:
        import jax

        def fn(values):
            return keras.ops.sum(
                gate.stateless_call(values, [v.value for v in gate.non_trainable_variables], x)[0]
                * target
            )

        grads = jax.grad(fn)([v.value for v in gate.trainable_variables])
        grads = grads[: len(variables)]
    return [0.0 if g is None else float(np.abs(to_numpy(g)).sum()) for g in grads]


@pytest.mark.parametrize("task_gradient", [True, False])
def test_task_gradient_option_keeps_the_task_loss_out_of_the_embedding(task_gradient):
    gate = _gate(task_gradient=task_gradient, expert_positions="grid")
    gate(X[:32])
    norms = _embedding_gradients(gate, X[:32])
    assert (sum(norms) > 0) == task_gradient


@pytest.mark.parametrize("mode", ["kmeans", "grid", "trainable", "array"])
def test_expert_positions(mode):
    positions = ksm.layers.ptsne_gate.grid_positions(4) * 0.5
    gate = _gate(expert_positions=positions if mode == "array" else mode)
    model = keras.Sequential([keras.Input((64,)), gate])
    model.compile("adam", "categorical_crossentropy")
    start = to_numpy(gate.positions).copy()
    model.fit(X, np.eye(4, dtype="float32")[Y % 4], batch_size=64, epochs=2, verbose=0)
    moved = not np.allclose(to_numpy(gate.positions), start)
    assert moved == (mode in ("kmeans", "trainable"))
    if mode == "kmeans":
        # Every position ends inside the standardised map (it follows the points).
        z = to_numpy(gate.standardise(gate.embed(X)))
        assert np.all(np.abs(to_numpy(gate.positions)) <= np.abs(z).max(axis=0) + 1e-6)
    assert float(to_numpy(gate.started)) == 1.0


def _mixture(**kwargs):
    return SparseExpertMixture(
        units=10,
        num_experts=4,
        expert_units=16,
        expert_density=0.3,
        route_density=0.1,
        gate=_gate(**kwargs),
        top_k=2,
        capacity_factor=1.5,
        balance_losses="entropy",
        seed=0,
    )


@pytest.mark.slow
def test_in_a_mixture_with_top_k_capacity_balancing_set_and_xla():
    mixture = _mixture()
    model = keras.Sequential([keras.Input((64,)), mixture, keras.layers.Softmax()])
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    logger = ksm.callbacks.ActivationRateLogger(verbose=0)
    history = model.fit(
        X,
        Y,
        batch_size=64,
        epochs=2,
        verbose=0,
        callbacks=[logger, ksm.callbacks.SETEvolution(zeta=0.2, seed=0)],
    )
    kl = history.history[f"{mixture.name}/tsne_kl"]
    assert len(kl) == 2 and all(np.isfinite(kl)) and kl[-1] > 0
    assert f"{mixture.name}/batch_entropy" in history.history
    assert_masked_weights_zero(model)
    rates = ksm.routing.activation_rates(model, {"digits": X}, verbose=False)
    assert rates.values.shape == (1, 4) and rates.values.sum() == pytest.approx(1.0, abs=1e-4)
    embedding = to_numpy(mixture.gate_embedding(X[:10]))
    assert embedding.shape == (10, 2)


def test_mixed_float16_is_finite():
    keras.mixed_precision.set_global_policy("mixed_float16")
    mixture = _mixture()
    model = keras.Sequential([keras.Input((64,)), mixture])
    model.compile("adam", "mse")
    history = model.fit(X, np.zeros((len(X), 10), "float32"), batch_size=64, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert np.all(np.isfinite(to_numpy(mixture.gate_values(X[:10]))))


def test_keras_round_trip_of_a_ptsne_gated_mixture(tmp_path):
    mixture = _mixture(dof="trainable", expert_positions="trainable")
    model = keras.Sequential([keras.Input((64,)), mixture])
    model.compile("adam", "mse")
    model.fit(X, np.zeros((len(X), 10), "float32"), batch_size=64, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "moe.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X)), to_numpy(model(X)), rtol=1e-5, atol=1e-6)
    gate = loaded.layers[0].gate
    np.testing.assert_allclose(to_numpy(gate.positions), to_numpy(mixture.gate.positions))
    assert gate.dof_value == pytest.approx(mixture.gate.dof_value)
    assert_config_covers_init(mixture.gate)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"perplexity": 0.0}, ValueError, "perplexity=0.0"),
        ({"perplexity": -3}, ValueError, "perplexity=-3"),
        ({"dof": 0.0}, ValueError, "dof=0.0"),
        ({"dof": -1}, ValueError, "dof=-1"),
        ({"n_components": 0}, ValueError, "n_components=0"),
        ({"expert_positions": "spiral"}, ValueError, "expert_positions='spiral'"),
        ({"expert_positions": np.zeros((3, 2))}, ValueError, r"shape \(3, 2\)"),
        ({"temperature": 0.0}, ValueError, "temperature=0.0"),
        ({"temperature": "hot"}, TypeError, "temperature='hot'"),
        ({"momentum": 1.0}, ValueError, "momentum=1.0"),
        ({"seed": "abc"}, TypeError, "seed='abc'"),
        ({"tsne_weight": -1.0}, ValueError, "tsne_weight=-1.0"),
        ({"embedding": "mlp"}, TypeError, "embedding='mlp'"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _gate(**kwargs)


def test_perplexity_too_large_for_the_batch():
    gate = _gate(perplexity=40.0)
    with pytest.raises(ValueError, match="perplexity=40.0, batch_size=32"):
        gate(X[:32], training=True)
    with pytest.raises(ValueError, match=r"n_components=2\)"):
        PTSNEGate(4, embedding=keras.layers.Dense(3))(X[:32])


def test_gate_map_draws_the_standardised_map(tmp_path):
    pytest.importorskip("matplotlib")
    mixture = _mixture()
    model = keras.Sequential([keras.Input((64,)), mixture])
    path = os.path.join(tmp_path, "map.png")
    z = ksm.plots.gate_map(model, X, Y, path=path)
    gate = mixture.gate
    np.testing.assert_allclose(z, to_numpy(gate.standardise(gate.embed(X))), atol=1e-5)
    assert os.path.getsize(path) > 0
    np.testing.assert_allclose(ksm.plots.gate_map(gate, X), z, atol=1e-5)
    with pytest.raises(TypeError, match="PTSNEGate"):
        ksm.plots.gate_map(SparseExpertMixture(units=2, num_experts=2), X)
