"""SparseExpertMixture: numpy reference, dispatch = dense path, losses, training, saving, errors."""

import os

import keras
import numpy as np
import pytest
from keras import ops
from scipy.special import softmax

import keras_sparse_moe as ksm
from keras_sparse_moe import losses
from keras_sparse_moe.layers import (
    NoisyTopKGate,
    OracleGate,
    SoftmaxGate,
    SparseDense,
    SparseExpertMixture,
)
from tests.test_case import (
    JIT_COMPILE,
    assert_config_covers_init,
    assert_masked_weights_zero,
    compiled_call,
    to_numpy,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((48, 10)).astype("float32")
Y = RNG.integers(0, 3, 48)
BUILTIN = dict(units=3, num_experts=4, expert_units=8, expert_density=0.5, seed=0)


def _numpy_builtin(layer, x, top_k=None):
    """The mixture written out with numpy from the layer's own weights."""
    e, h, u = layer.num_experts, layer.expert_bank.hidden_units, layer.units
    w1, b1 = (
        to_numpy(layer.expert_bank.expert_hidden.kernel),
        to_numpy(layer.expert_bank.expert_hidden.bias),
    )
    w2, b2 = (
        to_numpy(layer.expert_bank.expert_output.kernel),
        to_numpy(layer.expert_bank.expert_output.bias),
    )
    gate_kernel, gate_bias = (to_numpy(w) for w in layer.gate.network.weights)
    gates = softmax(x @ gate_kernel + gate_bias, axis=-1)
    active = np.ones_like(gates)
    if top_k is not None:
        keep = np.argsort(-gates, axis=1)[:, :top_k]
        active = np.zeros_like(gates)
        np.put_along_axis(active, keep, 1.0, axis=1)
        gates = gates * active
        gates /= gates.sum(axis=1, keepdims=True)
    hidden = np.maximum(x @ w1 + b1, 0).reshape(len(x), e, h)
    if layer.expert_bank.expert_routes is not None:
        source = (hidden * active[:, :, None]).reshape(len(x), e * h)
        hidden = hidden + (source @ to_numpy(layer.expert_bank.expert_routes.kernel)).reshape(
            len(x), e, h
        )
    out = np.einsum("neh,heu->neu", hidden, w2.reshape(h, e, u)) + b2.reshape(e, u)
    return np.einsum("ne,neu->nu", gates, out)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("route_density", [None, 0.2])
def test_builtin_experts_match_numpy(top_k, route_density):
    layer = SparseExpertMixture(top_k=top_k, route_density=route_density, **BUILTIN)
    y = to_numpy(layer(X))
    np.testing.assert_allclose(y, _numpy_builtin(layer, X, top_k), rtol=1e-4, atol=1e-5)
    # Experts are sparse: masked kernels are zero and densities are as asked.
    for sub in (layer.expert_bank.expert_hidden, layer.expert_bank.expert_output):
        assert sub.actual_density == pytest.approx(0.5, abs=0.01)
        assert np.all(to_numpy(sub.kernel)[to_numpy(sub.mask) == 0] == 0)
    if route_density:
        mask = to_numpy(layer.expert_bank.expert_routes.mask)
        same = np.equal.outer(np.arange(32) // 8, np.arange(32) // 8)
        assert mask[same].sum() == 0  # routes only link different experts
        assert mask[~same].mean() == pytest.approx(0.2, abs=0.01)


def _copy_weights(source, target):
    for a, b in zip(source._flatten_layers(), target._flatten_layers()):
        if a is not source and a.weights:
            b.set_weights(a.get_weights())


def _user_experts(width=3):
    return [
        keras.Sequential([keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(width)])
        for _ in range(3)
    ]


@pytest.mark.parametrize("kind", ["builtin", "builtin_routes", "user"])
def test_capacity_dispatch_equals_dense_path_when_capacity_suffices(kind):
    def make(capacity_factor):
        if kind == "user":
            return SparseExpertMixture(
                experts=_user_experts(), top_k=2, capacity_factor=capacity_factor
            )
        routes = 0.3 if kind == "builtin_routes" else None
        return SparseExpertMixture(
            top_k=2, capacity_factor=capacity_factor, route_density=routes, **BUILTIN
        )

    def model(layer):
        m = keras.Sequential([keras.Input((10,)), layer])
        m.compile(keras.optimizers.SGD(0.1), "mse")
        return m

    dense, dispatched = model(make(None)), model(make(2.0))  # capacity = all tokens
    _copy_weights(dense.layers[0], dispatched.layers[0])
    np.testing.assert_allclose(
        to_numpy(dispatched(X, training=True)),
        to_numpy(dense(X, training=True)),
        rtol=1e-5,
        atol=1e-5,
    )
    # The same gradients: one SGD step leaves the same weights.
    target = RNG.standard_normal((48, 3)).astype("float32")
    dense.train_on_batch(X, target)
    dispatched.train_on_batch(X, target)
    assert len(dense.trainable_weights) == len(dispatched.trainable_weights)
    for a, b in zip(dense.trainable_weights, dispatched.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)
    assert dispatched.layers[0].overflow_fraction == 0.0


@pytest.mark.parametrize(
    "top_k, route_density, implementation",
    [(1, None, "masked"), (3, None, "masked"), (1, 0.3, "masked"), (3, 0.3, "masked")]
    + [(3, 0.3, "sparse")],  # its grouped path densifies the stored connections
)
def test_grouped_dispatch_equals_every_expert_weighted(top_k, route_density, implementation):
    def model(dispatch):
        layer = SparseExpertMixture(
            top_k=top_k,
            route_density=route_density,
            dispatch=dispatch,
            implementation=implementation,
            **BUILTIN,
        )
        m = keras.Sequential([keras.Input((10,)), layer])
        m.compile(keras.optimizers.SGD(0.1), "mse")
        return m

    grouped, every = model("auto"), model("all")
    _copy_weights(every.layers[0], grouped.layers[0])
    assert grouped.layers[0].dispatch_path(True) == "grouped"
    assert every.layers[0].dispatch_path(False) == "all"
    for training in (False, True):
        np.testing.assert_allclose(
            compiled_call(grouped, X, training=training),
            compiled_call(every, X, training=training),
            rtol=1e-5,
            atol=1e-5,
        )
    # A token's output does not depend on its batch: one token at a time gives the same.
    alone = np.concatenate([compiled_call(grouped, X[i : i + 1]) for i in range(0, 48, 7)])
    np.testing.assert_allclose(alone, compiled_call(grouped, X[::7]), rtol=1e-5, atol=1e-6)
    _assert_same_sgd_step(grouped, every)


def _assert_same_sgd_step(first, second):
    """The same gradients: one SGD step on the same batch leaves the same weights."""
    target = RNG.standard_normal((48, 3)).astype("float32")
    first.train_on_batch(X, target)
    second.train_on_batch(X, target)
    for a, b in zip(first.trainable_weights, second.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)


def test_sparse_storage_groups_where_densifying_costs_less_than_every_connection():
    sparse = SparseExpertMixture(top_k=2, implementation="sparse", **BUILTIN)
    masked = SparseExpertMixture(top_k=2, **BUILTIN)
    for layer in (sparse, masked):
        layer.build((None, 10))
    bank = sparse.expert_bank
    layers = [bank.expert_hidden, bank.expert_output]
    connections = sum(int(layer.values.shape[0]) for layer in layers)
    entries = sum(int(np.prod(layer.kernel_shape)) for layer in layers)
    # The all-experts path multiplies each token by every connection; the grouped
    # path writes every entry of the dense kernels (about DENSIFY_COST products each).
    threshold = -(-bank.DENSIFY_COST * entries // connections)
    assert sparse.dispatch_path(False, threshold - 1) == "all"
    assert sparse.dispatch_path(False, threshold) == "grouped"
    assert sparse.dispatch_path(False) == "grouped"  # count unknown
    assert masked.dispatch_path(False, 1) == "grouped"


def test_overflow_drops_assignments_and_is_counted():
    layer = SparseExpertMixture(top_k=2, capacity_factor=0.5, **BUILTIN)
    dense = SparseExpertMixture(top_k=2, **BUILTIN)
    y = to_numpy(layer(X, training=True))
    dense(X)
    _copy_weights(layer, dense)
    # Rebuild the dropped assignments from the plan and check the output lacks them.
    gates = to_numpy(layer.gate_values(X))
    weights, index = (to_numpy(v) for v in ksm.ops.dispatch.top_k_weights(gates, 2))
    capacity = ksm.ops.dispatch.expert_capacity(48, 4, 2, 0.5)
    plan = ksm.ops.dispatch.dispatch_plan(index, 4, capacity)
    kept = to_numpy(plan.kept)
    assert layer.overflow_fraction == pytest.approx(1 - kept.mean())
    assert 0 < layer.overflow_fraction < 1
    kept_weights = np.zeros_like(gates)
    np.put_along_axis(kept_weights, index, weights * kept, axis=1)
    # Dense path evaluated with only the kept (token, expert) weights.
    all_outputs = np.stack(
        [
            to_numpy(dense.expert_bank.mix(X, np.eye(4, dtype="float32")[[e] * 48], None))
            for e in range(4)
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        y, np.einsum("ne,neu->nu", kept_weights, all_outputs), rtol=1e-4, atol=1e-5
    )
    layer.reset_statistics()
    assert layer.overflow_fraction == 0.0


def test_inference_drops_nothing_and_ignores_the_batch():
    # Capacity applies in training; predictions must not depend on batch company or size.
    layer = SparseExpertMixture(top_k=2, capacity_factor=0.5, **BUILTIN)
    dense = SparseExpertMixture(top_k=2, **BUILTIN)
    model = keras.Sequential([keras.Input((10,)), layer])
    dense(X)
    _copy_weights(layer, dense)
    whole = model.predict(X, batch_size=48, verbose=0)
    np.testing.assert_allclose(
        model.predict(X, batch_size=8, verbose=0), whole, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(whole, to_numpy(dense(X)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(to_numpy(layer(X, training=True)), whole, atol=1e-4)  # training drops


def test_rank_3_inputs_route_every_position():
    layer = SparseExpertMixture(top_k=1, capacity_factor=4.0, **BUILTIN)
    x = X.reshape(6, 8, 10)
    y = to_numpy(layer(x))
    assert y.shape == (6, 8, 3)
    np.testing.assert_allclose(y.reshape(48, 3), to_numpy(layer(X)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "balance, gate",
    [
        ("entropy", None),
        ("variance", None),
        ({"importance_cv2": 0.5, "load_cv2": 0.25}, NoisyTopKGate(4, top_k=2, seed=0)),
        ("switch", None),
    ],
)
def test_balance_losses_are_added_in_training_only(balance, gate):
    layer = SparseExpertMixture(gate=gate, balance_losses=balance, **BUILTIN)
    layer(X)
    assert layer.losses == []
    layer(X, training=True)
    weights = layer.balance_weights
    assert len(layer.losses) == len(weights)
    means = layer.balance_loss_means
    for value, (name, weight) in zip(layer.losses, weights.items()):
        assert float(to_numpy(value)) == pytest.approx(weight * means[name], rel=1e-5)
    if balance == "entropy":
        # Gates in eval and training agree for a softmax gate: check against the functions.
        gates = layer.gate(X)
        assert means["batch_entropy"] == pytest.approx(
            float(to_numpy(losses.batch_entropy(gates))), rel=1e-5
        )
        assert means["sample_entropy"] == pytest.approx(
            float(to_numpy(losses.sample_entropy(gates))), rel=1e-5
        )


def _oracle_model(capacity_factor=1.0):
    x_in, index_in = keras.Input((10,)), keras.Input((1,), dtype="int32")
    mixture = SparseExpertMixture(
        gate=OracleGate(2), top_k=1, capacity_factor=capacity_factor, units=3, num_experts=2, seed=1
    )
    out = keras.layers.Softmax()(mixture(x_in, gate_inputs=index_in))
    return keras.Model([x_in, index_in], out)


def test_oracle_gate_sends_each_sample_to_its_expert():
    model = _oracle_model(capacity_factor=2.0)
    index = (Y % 2).astype("int32")
    table = ksm.routing.activation_rates(
        model,
        {"even": [X[index == 0], index[index == 0]], "odd": [X[index == 1], index[index == 1]]},
        verbose=False,
    )
    np.testing.assert_array_equal(table.values, np.eye(2))
    assert table.rows == ["even", "odd"] and table.counts == [
        int((index == 0).sum()),
        int((index == 1).sum()),
    ]
    with pytest.raises(ValueError, match="gate_inputs"):
        SparseExpertMixture(gate=OracleGate(2), units=3, num_experts=2)(X)


@pytest.mark.slow
@pytest.mark.keras_deferred_build
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_fit_keeps_experts_sparse_and_logs(jit_compile):
    mixture = SparseExpertMixture(
        top_k=2, capacity_factor=1.0, balance_losses="entropy", route_density=0.2, **BUILTIN
    )
    model = keras.Sequential([keras.Input((10,)), mixture, keras.layers.Softmax()])
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=jit_compile)
    logger = ksm.callbacks.ActivationRateLogger(
        {"a": X[:20], "b": X[20:]}, by_class={"a": Y[:20]}, verbose=0
    )
    set_callback = ksm.callbacks.SETEvolution(zeta=0.2, seed=0)
    counts = [
        sub.num_connections
        for sub in (mixture.expert_bank.expert_hidden, mixture.expert_bank.expert_output)
    ]
    # Batches of 20, 20 and 8: partial batches (and, on TF, an unknown batch size).
    history = model.fit(X, Y, epochs=3, batch_size=20, verbose=0, callbacks=[logger, set_callback])
    assert_masked_weights_zero(model)
    assert [
        sub.num_connections
        for sub in (mixture.expert_bank.expert_hidden, mixture.expert_bank.expert_output)
    ] == counts
    name = mixture.name
    for key in (f"{name}/batch_entropy", f"{name}/sample_entropy", f"{name}/overflow", "rate/b/0"):
        assert len(history.history[key]) == 3, key
    assert 0 <= history.history[f"{name}/batch_entropy"][-1] <= np.log(4) + 1e-6
    assert len(logger.tables) == 3 and logger.tables[-1].rows[-1] == "b"
    np.testing.assert_allclose(logger.tables[-1].values.sum(axis=1), 1.0, rtol=1e-5)


def test_noisy_top_k_gate_with_capacity_dispatch_in_fit():
    gate = NoisyTopKGate(4, top_k=2, seed=0)
    mixture = SparseExpertMixture(
        gate=gate,
        capacity_factor=1.0,
        balance_losses={"importance_cv2": 0.1, "load_cv2": 0.1},
        **BUILTIN,
    )
    assert mixture.top_k == 2  # taken from the gate
    model = keras.Sequential([keras.Input((10,)), mixture, keras.layers.Softmax()])
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    logger = ksm.callbacks.ActivationRateLogger(verbose=0)
    history = model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[logger])
    name = mixture.name
    assert np.isfinite(history.history[f"{name}/load_cv2"]).all()
    assert 0.0 <= history.history[f"{name}/overflow"][-1] < 1.0
    # The gate left its zero start, and inference routes every token to exactly two experts.
    assert np.any(to_numpy(gate.gate_kernel) != 0)
    assert np.all(np.count_nonzero(to_numpy(mixture.gate_values(X)), axis=1) == 2)


def test_mixed_precision_fit():
    keras.mixed_precision.set_global_policy("mixed_float16")
    mixture = SparseExpertMixture(top_k=2, capacity_factor=1.5, balance_losses="switch", **BUILTIN)
    model = keras.Sequential(
        [keras.Input((10,)), mixture, keras.layers.Activation("softmax", dtype="float32")]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(X, Y, epochs=1, verbose=0)
    assert mixture.gate.compute_dtype == "float32"
    assert to_numpy(model(X)).dtype == np.float32
    assert np.isfinite(list(mixture.balance_loss_means.values())).all()
    assert_masked_weights_zero(model)


def _conv_expert():
    return keras.Sequential(
        [
            keras.layers.Conv2D(2, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("kind", ["builtin", "user"])
def test_keras_save_and_load(tmp_path, kind):
    if kind == "builtin":
        mixture = SparseExpertMixture(
            top_k=2,
            capacity_factor=1.0,
            route_density=0.2,
            balance_losses="entropy",
            normalize_top_k=False,
            router_jitter=0.1,
            **BUILTIN,
        )
        x, shape = X, (10,)
    else:
        gate = SoftmaxGate(
            2, network=keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(2)])
        )
        mixture = SparseExpertMixture(
            experts=[_conv_expert(), _conv_expert()], gate=gate, top_k=1, capacity_factor=2.0
        )
        x, shape = RNG.standard_normal((48, 6, 6, 1)).astype("float32"), (6, 6, 1)
    model = keras.Sequential([keras.Input(shape), mixture])
    model.compile("adam", "mse")
    model.fit(x, RNG.standard_normal((48, 3)).astype("float32"), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "moe.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-6)
    assert_config_covers_init(mixture)


def test_sparse_layers_are_found_by_the_callbacks():
    mixture = SparseExpertMixture(route_density=0.2, **BUILTIN)
    model = keras.Sequential([keras.Input((10,)), mixture])
    found = ksm.callbacks.base.find_sparse_layers(model)
    assert {layer.name for layer in found} == {"expert_hidden", "expert_output", "expert_routes"}
    assert all(isinstance(layer, SparseDense) for layer in found)


def _gate_of_width(width):
    return SoftmaxGate(4, network=keras.layers.Dense(width))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"units": 3}, ValueError, "exactly one"),
        ({"units": 3, "num_experts": 2, "experts": _user_experts()}, ValueError, "exactly one"),
        ({"num_experts": 2}, ValueError, "units=None"),
        ({**BUILTIN, "top_k": 5}, ValueError, "top_k=5"),
        ({**BUILTIN, "top_k": 0}, ValueError, "top_k=0"),
        ({**BUILTIN, "top_k": 1.5}, TypeError, "top_k=1.5"),
        ({**BUILTIN, "top_k": True}, TypeError, "top_k=True"),
        ({**BUILTIN, "route_density": -0.1}, ValueError, "route_density=-0.1"),
        ({**BUILTIN, "route_density": "0.1"}, TypeError, "route_density='0.1'"),
        ({**BUILTIN, "top_k": 2, "capacity_factor": 0.0}, ValueError, "capacity_factor=0.0"),
        ({**BUILTIN, "top_k": 2, "capacity_factor": -1}, ValueError, "capacity_factor=-1"),
        ({**BUILTIN, "capacity_factor": 1.0}, ValueError, "set `top_k`"),
        ({**BUILTIN, "balance_losses": {"batch_entropy": -0.1}}, ValueError, "batch_entropy=-0.1"),
        ({**BUILTIN, "balance_losses": {"entropy_of_doom": 0.1}}, ValueError, "entropy_of_doom"),
        ({**BUILTIN, "balance_losses": "nope"}, ValueError, "preset"),
        ({**BUILTIN, "balance_losses": {"load_cv2": 0.1}}, ValueError, "load"),
        ({**BUILTIN, "gate": keras.layers.Dense(4)}, TypeError, "SoftmaxGate"),
        ({**BUILTIN, "gate": SoftmaxGate(3)}, ValueError, "num_experts=3"),
        ({**BUILTIN, "gate": NoisyTopKGate(4, top_k=1), "top_k": 2}, ValueError, "top_k=1"),
        ({**BUILTIN, "route_density": 1.0}, ValueError, "route_density=1.0"),
        ({**BUILTIN, "expert_density": 0.0}, ValueError, "expert_density"),
        ({**BUILTIN, "router_jitter": 1.0}, ValueError, "router_jitter=1.0"),
        ({**BUILTIN, "router_jitter": -0.1}, ValueError, "router_jitter=-0.1"),
        ({**BUILTIN, "router_jitter": "0.1"}, TypeError, "router_jitter='0.1'"),
        ({**BUILTIN, "normalize_top_k": "yes"}, TypeError, "normalize_top_k='yes'"),
        ({**BUILTIN, "gate": OracleGate(4), "router_jitter": 0.1}, ValueError, "router_jitter"),
        ({"experts": _user_experts(), "expert_units": 4}, ValueError, "expert_units"),
        ({"experts": []}, TypeError, "non-empty list"),
        ({"experts": [keras.layers.Dense(3), "dense"]}, TypeError, "dense"),
        (
            {
                "experts": [keras.layers.Dense(3)],
                "gate": OracleGate(1),
                "balance_losses": {"router_z_loss": 1.0},
            },
            ValueError,
            "logits",
        ),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseExpertMixture(**kwargs)


def test_invalid_dispatch():
    with pytest.raises(ValueError, match="dispatch='sorted'"):
        SparseExpertMixture(dispatch="sorted", **BUILTIN)


def test_numpy_integers_are_ints():
    layer = SparseExpertMixture(top_k=np.int64(2), **{**BUILTIN, "num_experts": np.int32(4)})
    assert (layer.top_k, layer.num_experts) == (2, 4)
    assert type(layer.top_k) is int and type(layer.num_experts) is int


def test_invalid_at_build():
    with pytest.raises(ValueError, match="equal output shapes"):
        SparseExpertMixture(experts=[keras.layers.Dense(3), keras.layers.Dense(4)])(X)
    with pytest.raises(ValueError, match="num_experts=4"):
        SparseExpertMixture(gate=_gate_of_width(3), **BUILTIN)(X)
    with pytest.raises(ValueError, match="units=5"):
        SparseExpertMixture(experts=[keras.layers.Dense(3)] * 2, units=5)(X)
    with pytest.raises(ValueError, match=r"inputs_shape=\(10,\)"):
        SparseExpertMixture(**BUILTIN)(X[0])
    with pytest.raises(ValueError, match=r"gate_inputs of shape \(5, 10\)"):
        SparseExpertMixture(**BUILTIN)(X, gate_inputs=X[:5])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ksm.callbacks.SETEvolution(zeta=0.5, seed=0),
        lambda: ksm.callbacks.RigL(
            data=(X, keras.utils.to_categorical(Y, 3)), update_every=3, drop_fraction=0.5, seed=0
        ),
    ],
)
def test_evolved_routes_stay_between_experts(make):
    # Measured before `allowed`: 77 routes inside an expert's own block after 4 epochs of SET.
    inputs = keras.Input((10,))
    mixture = SparseExpertMixture(route_density=0.05, **{**BUILTIN, "expert_units": 16})
    model = keras.Model(inputs, keras.layers.Softmax()(mixture(inputs)))
    model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
    routes = mixture.expert_bank.expert_routes
    count = routes.num_connections
    model.fit(
        X, keras.utils.to_categorical(Y, 3), batch_size=8, epochs=4, verbose=0, callbacks=[make()]
    )
    mask = to_numpy(routes.mask)
    owner = np.arange(mask.shape[0]) // 16
    assert mask[owner[:, None] == owner[None, :]].sum() == 0
    assert routes.num_connections == count


def _compiled_step_sizes(layer, tokens):
    """Instructions in one gradient step of `layer` as XLA programs: `(as traced,
    as optimized for the CPU)`."""
    x = RNG.standard_normal((tokens, 16)).astype("float32")
    if keras.backend.backend() == "jax":
        import jax

        def loss(trainable, non_trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
            return keras.ops.sum(y**2)

        args = (
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
        )
        lowered = jax.jit(jax.grad(loss)).lower(*args)
        texts = lowered.as_text(), lowered.compile().as_text()
    else:
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x):
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                value = tf.reduce_sum(y**2)
            return tape.gradient(value, layer.trainable_variables)

        ir = step.experimental_get_compiler_ir(tf.constant(x))
        texts = ir(stage="hlo"), ir(stage="optimized_hlo")
    return tuple(sum(" = " in line for line in text.splitlines()) for text in texts)


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_compiled_dispatch_does_not_grow_with_the_tokens(capacity_factor):
    # A program that grows with the batch is unrolled or constant-folded per
    # token: TensorFlow once took minutes to compile the capacity dispatch.
    layer = SparseExpertMixture(
        units=16,
        num_experts=8,
        expert_units=16,
        top_k=2,
        capacity_factor=capacity_factor,
        route_density=0.2,
        seed=0,
    )
    layer.build((None, 16))
    path = layer.dispatch_path(training=True)
    assert path == ("grouped" if capacity_factor is None else "capacity")
    small, large = _compiled_step_sizes(layer, 64), _compiled_step_sizes(layer, 512)
    # Lowerings and fusion choices differ a little with the sizes (a few %);
    # a per-token unrolling or folding would multiply the count by up to 8.
    for before, after in zip(small, large):
        assert after <= 1.25 * before, (path, small, large)


def test_implementation_defaults_to_the_default_storage_and_user_experts_take_none():
    from keras_sparse_moe.layers.storage import DEFAULT_STORAGE

    built_in = SparseExpertMixture(**BUILTIN)
    assert built_in.implementation == DEFAULT_STORAGE
    assert built_in.expert_bank.expert_hidden.implementation == DEFAULT_STORAGE
    user = SparseExpertMixture(experts=[keras.layers.Dense(3), keras.layers.Dense(3)])
    assert user.implementation is None and user.get_config()["implementation"] is None
    for storage in ("masked", "sparse"):
        with pytest.raises(ValueError, match=f"'implementation': '{storage}'"):
            SparseExpertMixture(experts=[keras.layers.Dense(3)] * 2, implementation=storage)
    # A config saved when the default was spelled out still loads, as the same layer.
    old = {**user.get_config(), "implementation": DEFAULT_STORAGE}
    restored = SparseExpertMixture.from_config(old)
    assert restored.implementation is None and restored.num_experts == 2


@pytest.mark.parametrize("route_density", [0.0, 0.2])
def test_unnormalized_top_k_mixes_the_raw_gate_values(route_density):
    """Switch's weighting: the selected experts' gate values as they are, so each
    token's output is its renormalised output scaled by the sum of its top-k values."""
    kwargs = dict(top_k=2, route_density=route_density, **BUILTIN)
    normalized, raw = (
        SparseExpertMixture(**kwargs),
        SparseExpertMixture(normalize_top_k=False, **kwargs),
    )
    normalized(X)
    raw(X)
    raw.set_weights(normalized.get_weights())
    gates = to_numpy(normalized.gate(X))
    top = np.sort(gates, axis=-1)[:, -2:]
    chosen = to_numpy(raw.gate_values(X))
    np.testing.assert_allclose(np.sort(chosen, axis=-1)[:, -2:], top, rtol=1e-6)
    assert np.count_nonzero(chosen, axis=-1).max() == 2
    np.testing.assert_allclose(to_numpy(normalized.gate_values(X)).sum(-1), 1.0, rtol=1e-6)
    scale = top.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(raw(X)), scale * to_numpy(normalized(X)), atol=1e-5)


def test_router_jitter_scales_the_gate_input_in_training_only():
    kwargs = dict(top_k=2, **BUILTIN)
    plain, jittered = (
        SparseExpertMixture(**kwargs),
        SparseExpertMixture(router_jitter=0.5, **kwargs),
    )
    plain(X)
    jittered(X)
    own = [v for v in jittered.weights if "seed_generator" not in v.path]
    assert len(own) == len(plain.weights)
    for mine, theirs in zip(own, plain.weights):  # the same weights, the generator aside
        assert mine.shape == theirs.shape
        mine.assign(theirs)
    # Inference: no noise, identical to the mixture without jitter.
    np.testing.assert_allclose(to_numpy(jittered(X)), to_numpy(plain(X)), atol=1e-6)
    tokens = ops.convert_to_tensor(X)
    clean = to_numpy(plain._route(tokens, None, training=True)[0].gates)
    noisy = to_numpy(jittered._route(tokens, None, training=True)[0].gates)
    assert not np.allclose(noisy, clean, atol=1e-4)  # the gate read a jittered input
    # Within the jitter's reach: the gate's logits are linear in its input, so each
    # logit moves by at most 50 % of the largest |w_ij x_j| sum.
    kernel = to_numpy(plain.gate.network.kernel)
    bound = 0.5 * np.abs(X) @ np.abs(kernel)
    logits = np.log(noisy) - np.log(clean)
    spread = logits - logits.mean(-1, keepdims=True)
    assert np.all(np.abs(spread) <= 2 * bound.max(-1, keepdims=True) + 1e-4)


@pytest.mark.parametrize("form", ["tiles", "folded"])
def test_both_route_forms_equal_every_expert_weighted(monkeypatch, form):
    from keras_sparse_moe.layers.experts import SparseExperts

    # Either form on every batch size, against the all-experts path (the whole route matrix).
    monkeypatch.setattr(SparseExperts, "route_form", lambda self, tokens, k: form)

    def model(dispatch):
        layer = SparseExpertMixture(top_k=3, route_density=0.3, dispatch=dispatch, **BUILTIN)
        m = keras.Sequential([keras.Input((10,)), layer])
        m.compile(keras.optimizers.SGD(0.1), "mse")
        return m

    grouped, every = model("auto"), model("all")
    _copy_weights(every.layers[0], grouped.layers[0])
    for batch in (X[:1], X):
        np.testing.assert_allclose(
            compiled_call(grouped, batch), compiled_call(every, batch), rtol=1e-5, atol=1e-5
        )
    _assert_same_sgd_step(grouped, every)


def test_route_form_folds_narrow_outputs_at_large_batches():
    # E * units <= 2 (k - 1) h and tokens * k (k - 1) >= E^2 * units: folded.
    narrow = SparseExpertMixture(top_k=2, route_density=0.3, **BUILTIN).expert_bank
    assert narrow.route_form(24, 2) == "folded"  # 24 * 2 = 48 >= 4 * 4 * 3
    assert narrow.route_form(23, 2) == "tiles"
    assert narrow.route_form(None, 2) == "tiles"  # unknown when traced (exports)
    assert narrow.route_form(1024, 1) is None  # one expert a token: no pair to route
    wide = SparseExpertMixture(
        top_k=2, route_density=0.3, **{**BUILTIN, "units": 5}
    ).expert_bank  # 4 * 5 = 20 > 2 * 8
    assert wide.route_form(1024, 2) == "tiles"
    assert SparseExpertMixture(top_k=2, **BUILTIN).expert_bank.route_form(1024, 2) is None
