"""Shared experts, expert-choice routing and bias-balanced selection, against numpy."""

import keras
import numpy as np
import pytest
from scipy.special import softmax

import keras_sparse_moe as ksm
from keras_sparse_moe.callbacks import BiasBalancing
from keras_sparse_moe.layers import NoisyTopKGate, SparseExpertMixture
from keras_sparse_moe.ops import dispatch
from tests.test_case import assert_config_covers_init, assert_masked_weights_zero, to_numpy

RNG = np.random.default_rng(3)
X = RNG.standard_normal((40, 10)).astype("float32")
BUILTIN = dict(units=3, num_experts=4, expert_units=8, expert_density=0.5, seed=0)


def _gates(layer, x):
    kernel, bias = (to_numpy(w) for w in layer.gate.network.weights)
    return softmax(x @ kernel + bias, axis=-1)


def _expert_outputs(bank, x):
    """`(tokens, E, units)`: every expert of a built-in bank on every token, in numpy."""
    e, h, u = bank.num_experts, bank.hidden_units, bank.units
    w1, b1 = to_numpy(bank.expert_hidden.kernel), to_numpy(bank.expert_hidden.bias)
    w2, b2 = to_numpy(bank.expert_output.kernel), to_numpy(bank.expert_output.bias)
    hidden = np.maximum(x @ w1 + b1, 0).reshape(len(x), e, h)
    return np.einsum("neh,heu->neu", hidden, w2.reshape(h, e, u)) + b2.reshape(e, u)


def _top_k_weights(scores, gates, k, normalize=True):
    """Choose by `scores` (argsort: ties to the lower index), weigh by `gates`."""
    chosen = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    weights = np.zeros_like(gates)
    np.put_along_axis(weights, chosen, np.take_along_axis(gates, chosen, 1), axis=1)
    return weights / weights.sum(1, keepdims=True) if normalize else weights


def _model(layer, shape=(10,)):
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


# ---------------------------------------------------------------------------- shared experts
@pytest.mark.parametrize("top_k", [None, 2])
def test_shared_experts_add_to_every_token(top_k):
    layer = SparseExpertMixture(top_k=top_k, num_shared_experts=2, **BUILTIN)
    y = to_numpy(layer(X))
    routed = np.einsum(
        "ne,neu->nu",
        _top_k_weights(_gates(layer, X), _gates(layer, X), top_k or 4),
        _expert_outputs(layer.expert_bank, X),
    )
    shared = _expert_outputs(layer.shared_bank, X).sum(axis=1)
    np.testing.assert_allclose(y, routed + shared, rtol=1e-4, atol=1e-5)
    for sub in (layer.shared_bank.expert_hidden, layer.shared_bank.expert_output):
        assert sub.actual_density == pytest.approx(0.5, abs=0.02)  # the experts' density
    assert_config_covers_init(layer)


@pytest.mark.slow
def test_dense_shared_expert_trains_and_saves(tmp_path):
    layer = SparseExpertMixture(
        top_k=1, num_shared_experts=1, shared_expert_density=1.0, name="moe", **BUILTIN
    )
    model = _model(layer)
    assert to_numpy(layer.shared_bank.expert_hidden.mask).all()  # a dense expert
    target = RNG.standard_normal((40, 3)).astype("float32")
    before = to_numpy(layer.shared_bank.expert_output.kernel).copy()
    model.fit(
        X,
        target,
        epochs=2,
        batch_size=20,
        verbose=0,
        callbacks=[ksm.callbacks.SETEvolution(update_every=1, zeta=0.3, seed=0)],
    )
    assert not np.allclose(before, to_numpy(layer.shared_bank.expert_output.kernel))
    assert_masked_weights_zero(model)
    path = str(tmp_path / "shared.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6)
    # Executed FLOPs count the shared experts on every token.
    d, h, u = 10, 8, 3
    flops = ksm.reporting.executed_flops(model)["total"]
    without = ksm.reporting.executed_flops(_model(SparseExpertMixture(top_k=1, **BUILTIN)))
    assert flops - without["total"] == 2 * (d * h + h * u) + 2 * u


def test_user_shared_experts_beside_user_experts(tmp_path):
    experts = [keras.layers.Dense(3, name=f"routed_{i}") for i in range(2)]
    shared = keras.layers.Dense(3, name="shared")
    layer = SparseExpertMixture(experts=experts, shared_experts=[shared], top_k=1, name="moe")
    model = _model(layer)
    gates = _gates(layer, X)
    routed = np.stack([to_numpy(e(X)) for e in experts], axis=1)
    expected = np.einsum("ne,neu->nu", _top_k_weights(gates, gates, 1), routed) + to_numpy(
        shared(X)
    )
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)
    flops = ksm.reporting.executed_flops(model)["moe"]
    assert flops == 2 * 10 * 2 + 3 * (2 * 10 * 3)  # gate, two routed and one shared Dense
    path = str(tmp_path / "user_shared.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match=r"shapes must agree.*shared \(40, 4\)"):
        SparseExpertMixture(experts=experts, shared_experts=[keras.layers.Dense(4)])(X)


def test_shared_expert_errors():
    with pytest.raises(ValueError, match="num_shared_experts=-1"):
        SparseExpertMixture(num_shared_experts=-1, **BUILTIN)
    with pytest.raises(ValueError, match=r"shared_expert_density=0\.5"):
        SparseExpertMixture(shared_expert_density=0.5, **BUILTIN)  # no shared experts
    experts = [keras.layers.Dense(3), keras.layers.Dense(3)]
    with pytest.raises(ValueError, match="experts=a list"):
        SparseExpertMixture(experts=experts, num_shared_experts=1)
    with pytest.raises(ValueError, match="shared_expert_density"):
        SparseExpertMixture(num_shared_experts=1, shared_expert_density=1.5, **BUILTIN)
    with pytest.raises(ValueError, match="either `num_shared_experts`"):
        SparseExpertMixture(num_shared_experts=1, shared_experts=[keras.layers.Dense(3)], **BUILTIN)
    with pytest.raises(TypeError, match="shared_experts=\\[\\]"):
        SparseExpertMixture(shared_experts=[], **BUILTIN)


# ---------------------------------------------------------------------------- expert choice
def _expert_choice_numpy(layer, x, k, capacity_factor=1.0):
    gates = _gates(layer, x)
    n, e = gates.shape
    capacity = min(n, int(np.ceil(capacity_factor * k * n / e)))
    weights = np.zeros_like(gates)
    for expert in range(e):
        picked = np.argsort(-gates[:, expert], kind="stable")[:capacity]
        weights[picked, expert] = gates[picked, expert]
    return weights, capacity


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_expert_choice_matches_numpy_and_balances_exactly(capacity_factor):
    layer = SparseExpertMixture(
        top_k=2, routing="expert_choice", capacity_factor=capacity_factor, **BUILTIN
    )
    y = to_numpy(layer(X))
    assert layer.dispatch_path(False, 40) == "expert_choice"
    weights, capacity = _expert_choice_numpy(layer, X, 2, capacity_factor or 1.0)
    expected = np.einsum("ne,neu->nu", weights, _expert_outputs(layer.expert_bank, X))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    chosen = to_numpy(layer.gate_values(X))
    np.testing.assert_allclose(chosen, weights, rtol=1e-6)
    # Perfect balance by construction: every expert takes exactly `capacity` tokens.
    assert ((chosen > 0).sum(axis=0) == capacity).all()
    assert_config_covers_init(layer)


@pytest.mark.parametrize("route_density", [None, 0.3])
def test_expert_choice_slots_equal_every_expert_weighted(route_density):
    def model(mode):
        return _model(
            SparseExpertMixture(
                top_k=1,
                routing="expert_choice",
                dispatch=mode,
                route_density=route_density,
                **BUILTIN,
            )
        )

    slots, every = model("auto"), model("all")
    every.layers[0].set_weights(slots.layers[0].get_weights())
    expected_path = "all" if route_density else "expert_choice"
    assert slots.layers[0].dispatch_path(True, 40) == expected_path
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(slots(X, training=training)),
            to_numpy(every(X, training=training)),
            rtol=1e-5,
            atol=1e-5,
        )
    # Same gradients (the gate's included: the chosen tokens' gate values weigh them).
    target = RNG.standard_normal((40, 3)).astype("float32")
    gate_before = to_numpy(slots.layers[0].gate.network.kernel).copy()
    slots.train_on_batch(X, target)
    every.train_on_batch(X, target)
    assert not np.allclose(gate_before, to_numpy(slots.layers[0].gate.network.kernel))
    for a, b in zip(slots.trainable_weights, every.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)


def test_expert_choice_fits_under_xla_and_saves(tmp_path):
    layer = SparseExpertMixture(top_k=2, routing="expert_choice", name="moe", **BUILTIN)
    model = keras.Sequential([keras.Input((10,)), layer])
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    target = X[:, :3] ** 2
    history = model.fit(X, target, epochs=8, batch_size=20, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    path = str(tmp_path / "ec.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(X, batch_size=20, verbose=0),
        model.predict(X, batch_size=20, verbose=0),
        atol=1e-6,
    )
    # FLOPs: each expert runs its capacity of the batch, here ceil(2 * 20 / 4) = 10 of 20.
    d, h, u = 10, 8, 3
    flops = ksm.reporting.executed_flops(model, batch_size=20)["moe"]
    assert flops == 2 * d * 4 + round(4 * 10 / 20 * (2 * (d * h + h * u) + 2 * u))


def test_expert_choice_with_user_experts_counts_their_share_of_the_batch():
    experts = [keras.layers.Dense(3) for _ in range(4)]
    layer = SparseExpertMixture(experts=experts, top_k=1, routing="expert_choice", name="moe")
    model = _model(layer)
    assert layer.dispatch_path(False, 40) == "expert_choice"
    weights, _ = _expert_choice_numpy(layer, X, 1)
    outputs = np.stack([to_numpy(e(X)) for e in experts], axis=1)
    np.testing.assert_allclose(
        to_numpy(model(X)), np.einsum("ne,neu->nu", weights, outputs), rtol=1e-5, atol=1e-5
    )
    # Batch 40: each expert runs on ceil(40 / 4) = 10 of the 40 samples.
    flops = ksm.reporting.executed_flops(model, batch_size=40)["moe"]
    assert flops == 2 * 10 * 4 + round(4 * (2 * 10 * 3) * 10 / 40)


def test_expert_choice_errors():
    with pytest.raises(ValueError, match="routing='expert_choice' needs `top_k`"):
        SparseExpertMixture(routing="expert_choice", **BUILTIN)
    with pytest.raises(ValueError, match="NoisyTopKGate"):
        SparseExpertMixture(routing="expert_choice", gate=NoisyTopKGate(4, 2), **BUILTIN)
    with pytest.raises(ValueError, match="routing='experts'"):
        SparseExpertMixture(routing="experts", top_k=1, **BUILTIN)


def test_expert_choice_op_picks_the_highest_gates_per_expert():
    gates = RNG.random((9, 3)).astype("float32")
    values, tokens = (to_numpy(v) for v in dispatch.expert_choice(gates, top_k=1))
    assert tokens.shape == (3, 3)
    for e in range(3):
        np.testing.assert_array_equal(tokens[e], np.argsort(-gates[:, e])[:3])
        np.testing.assert_allclose(values[e], gates[tokens[e], e])
    dense = to_numpy(dispatch.expert_choice_weights(values, tokens, 9))
    expected = np.zeros_like(gates)
    for e in range(3):
        expected[tokens[e], e] = gates[tokens[e], e]
    np.testing.assert_allclose(dense, expected)


# ---------------------------------------------------------------------------- selection bias
@pytest.mark.parametrize("normalize", [True, False])
def test_selection_bias_chooses_but_does_not_weigh(normalize):
    layer = SparseExpertMixture(top_k=2, selection_bias=True, normalize_top_k=normalize, **BUILTIN)
    layer(X)
    bias = np.array([0.0, 0.3, -0.2, 0.1], "float32")
    layer.expert_bias.assign(bias)
    gates = _gates(layer, X)
    weights = _top_k_weights(gates + bias, gates, 2, normalize)
    assert not np.array_equal(weights > 0, _top_k_weights(gates, gates, 2) > 0)
    expected = np.einsum("ne,neu->nu", weights, _expert_outputs(layer.expert_bank, X))
    np.testing.assert_allclose(to_numpy(layer(X)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.gate_values(X)), weights, rtol=1e-5, atol=1e-7)
    # Training counts each expert's assignments.
    layer(X, training=True)
    np.testing.assert_array_equal(to_numpy(layer.expert_load), (weights > 0).sum(axis=0))
    assert_config_covers_init(layer)


@pytest.mark.parametrize("with_logger", [False, True])
def test_bias_balancing_follows_its_rule_and_balances(with_logger):
    layer = SparseExpertMixture(top_k=1, selection_bias=True, name="moe", **BUILTIN)
    model = keras.Sequential([keras.Input((10,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # fixed gates: only the bias moves
    layer(X)
    layer.gate.network.bias.assign(np.array([2.0, 0, 0, 0], "float32"))  # expert 0 favoured
    rate, bias = 0.02, np.zeros(4)
    expected = []
    for _ in range(3):  # epochs of 2 batches of 20, in order
        loads = []
        for batch in (X[:20], X[20:]):
            gates = _gates(layer, batch)
            load = (_top_k_weights(gates + bias, gates, 1) > 0).sum(axis=0)
            bias = bias + rate * np.sign(load.mean() - load)
            loads.append(load)
        total = np.sum(loads, axis=0)
        expected.append(total.max() / total.mean() - 1)
    # The logger resets the load count each epoch: the callback reads around it.
    callbacks = [BiasBalancing(rate=rate)]
    if with_logger:
        callbacks.append(ksm.callbacks.ActivationRateLogger())
    history = model.fit(
        X, X[:, :3], epochs=3, batch_size=20, shuffle=False, verbose=0, callbacks=callbacks
    )
    np.testing.assert_allclose(to_numpy(layer.expert_bias), bias, atol=1e-6)
    np.testing.assert_allclose(history.history["moe/max_violation"], expected, rtol=1e-6)
    assert expected[0] > 1.0  # skewed to start with
    if with_logger:  # the last epoch's share of each expert
        np.testing.assert_allclose(
            [history.history[f"moe/load/{e}"][-1] for e in range(4)], total / total.sum()
        )


def test_bias_balancing_config_and_errors():
    callback = BiasBalancing(rate=0.01, every=2)
    assert BiasBalancing.from_config(callback.get_config()).get_config() == callback.get_config()
    with pytest.raises(ValueError, match="rate=0"):
        BiasBalancing(rate=0)
    with pytest.raises(ValueError, match="selection_bias"):
        SparseExpertMixture(selection_bias=True, **BUILTIN)  # no top_k
    with pytest.raises(ValueError, match="routing='expert_choice'"):
        SparseExpertMixture(selection_bias=True, top_k=1, routing="expert_choice", **BUILTIN)
    model = _model(SparseExpertMixture(top_k=1, **BUILTIN))
    with pytest.raises(ValueError, match="selection_bias=True"):
        model.fit(X, X[:, :3], epochs=1, verbose=0, callbacks=[BiasBalancing()])


def test_logger_reports_each_experts_load_and_its_entropy():
    layer = SparseExpertMixture(top_k=2, capacity_factor=1.0, name="moe", **BUILTIN)
    model = keras.Sequential([keras.Input((10,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # fixed gates
    layer(X)
    gates = _gates(layer, X)
    count = (_top_k_weights(gates, gates, 2) > 0).sum(axis=0)
    shares = count / count.sum()
    logs = model.fit(
        X,
        X[:, :3],
        epochs=2,
        batch_size=20,
        verbose=0,
        callbacks=[ksm.callbacks.ActivationRateLogger()],
    ).history
    for e in range(4):
        np.testing.assert_allclose(logs[f"moe/load/{e}"], [shares[e]] * 2, rtol=1e-6)
    entropy = -np.sum(shares * np.log(shares)) / np.log(4)
    np.testing.assert_allclose(logs["moe/load_entropy"], [entropy] * 2, rtol=1e-6)
    assert "moe/overflow" in logs
    # Mixing every expert (no top_k) counts no load.
    assert SparseExpertMixture(**BUILTIN).counts_load is False


def test_a_file_saved_without_the_load_count_loads():
    # Top-k mixtures saved before the load count existed hold one variable less.
    layer = SparseExpertMixture(top_k=2, balance_losses="entropy", name="moe", **BUILTIN)
    layer(X, training=True)
    store = {}
    layer.save_own_variables(store)
    old = {k: v for k, v in store.items() if int(k) < len(store) - 1}
    fresh = SparseExpertMixture(top_k=2, balance_losses="entropy", name="moe", **BUILTIN)
    fresh.build((None, 10))
    fresh.load_own_variables(old)
    np.testing.assert_array_equal(to_numpy(fresh.expert_load), np.zeros(4))
    np.testing.assert_array_equal(to_numpy(fresh.loss_sums), to_numpy(layer.loss_sums))
    with pytest.raises(ValueError):  # two missing: still an error
        fresh.load_own_variables({k: v for k, v in old.items() if int(k) < len(old) - 1})
