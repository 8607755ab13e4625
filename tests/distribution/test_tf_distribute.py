"""tf.distribute.MirroredStrategy over two logical CPUs: every layer, gate, loss and callback
trains, rewiring leaves bit-identical replicas, and N replicas follow one device."""

import types

import numpy as np
import pytest

from keras_sparse_moe import _runtime
from keras_sparse_moe.callbacks import ActivationRateLogger, SETEvolution
from keras_sparse_moe.layers import NoisyTopKGate, OracleGate, PTSNEGate
from tests.distribution import common

pytestmark = [pytest.mark.tensorflow_only, pytest.mark.distributed]

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def strategy():
    # One strategy a process (not a module: the slow tests run first, so the module's
    # tests are not together): strategies created one after another in a process can
    # reuse collective instance keys and abort each other's all-reduce.
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs 2 logical CPUs, set up by tests/conftest.py before TF starts")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def _replicas_identical(model):
    """Every variable (model and optimizer) holds the same bits on each replica; running
    statistics (read as the replicas' mean, like metrics) are each replica's own."""
    differing = []
    for variable in model.variables + model.optimizer.variables:
        if variable.synchronization == "on_read":
            continue
        values = [np.asarray(c) for c in variable.value.values]
        assert len(values) == 2, variable.path
        if not all(np.array_equal(values[0], v) for v in values[1:]):
            differing.append(variable.path)
    assert not differing, f"replicas differ in {differing}"


def _train_both(build, callback, strategy, inputs=common.X):
    """The same model trained on one device and on two replicas, from the same weights."""
    reference = common.compile_model(build())
    weights = reference.get_weights()
    single = common.fit(reference, common.CALLBACKS[callback](), inputs)
    with strategy.scope():
        model = common.compile_model(build())
        model.set_weights(weights)
    history = common.fit(model, common.CALLBACKS[callback](), inputs)
    return reference, single, model, history


@pytest.mark.parametrize("callback", sorted(common.CALLBACKS))
def test_callbacks_rewire_replicas_identically_and_match_one_device(callback, strategy):
    reference, single, model, history = _train_both(common.mlp, callback, strategy)
    key = f"{common.CALLBACKS[callback]().name}/rewired"
    assert sum(history[key]) > 0
    assert history[key] == single[key]
    _replicas_identical(model)
    common.assert_same_training(model, reference)
    np.testing.assert_allclose(history["loss"], single["loss"], rtol=1e-5)


@pytest.mark.parametrize("callback", ["set", "rigl"])
def test_n_m_rewiring_keeps_groups_on_identical_replicas(callback, strategy):
    reference, single, model, history = _train_both(common.n_m_mlp, callback, strategy)
    key = f"{common.CALLBACKS[callback]().name}/rewired"
    assert sum(history[key]) > 0 and history[key] == single[key]
    _replicas_identical(model)
    common.assert_same_training(model, reference)
    common.assert_exactly_n_m(model)


def test_gate_losses_are_averaged_over_replicas(strategy):
    # A per-sample balancing loss: its mean over two half batches is the global
    # batch's, so the replicas' summed gradients equal one device's only if
    # Keras scales each replica's added loss by 1/2.
    def build():
        return common.mixture(balance_losses={"sample_entropy": 0.5, "router_z_loss": 0.1})

    reference, single, model, history = _train_both(build, "set", strategy)
    assert common.rewired(history) > 0
    _replicas_identical(model)
    common.assert_same_training(model, reference)
    np.testing.assert_allclose(history["loss"], single["loss"], rtol=1e-5)


def test_oracle_gate_matches_one_device(strategy):
    inputs = {"x": common.X, "index": common.GATE_INDEX}
    reference, _, model, _ = _train_both(
        lambda: common.mixture(gate=OracleGate(4), oracle=True), "set", strategy, inputs
    )
    _replicas_identical(model)
    common.assert_same_training(model, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: common.mixture(
            gate=NoisyTopKGate(4, 2, seed=3), top_k=2, capacity_factor=1.5, balance_losses="switch"
        ),
        lambda: common.mixture(
            gate=PTSNEGate(4, perplexity=5.0, expert_positions="kmeans", seed=3)
        ),
        lambda: common.mixture(
            route_density=0.2, implementation="sparse", balance_losses="entropy"
        ),
        common.user_expert_mixture,
    ],
    ids=["noisy_top_k_capacity", "ptsne", "sparse_routes", "user_experts"],
)
def test_mixtures_train_with_identical_replicas(build, strategy):
    # Batch statistics (noise, k-means positions, batch-level balancing losses)
    # are per replica, as in data-parallel MoE training: the replicas agree with
    # each other, not with one device.
    with strategy.scope():
        model = common.compile_model(build())
    logger = ActivationRateLogger()
    history = model.fit(
        common.X,
        common.Y,
        batch_size=common.BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[SETEvolution(update_every=3, seed=5), logger],
    )
    assert np.all(np.isfinite(history.history["loss"]))
    assert common.rewired(history.history) > 0
    _replicas_identical(model)


def test_bias_balancing_is_replica_consistent_and_matches_one_device(strategy):
    # Each replica counts its half batch; the callback reads the replicas'
    # counts together and writes one bias to both.
    model, reference = common.bias_balancing_matches_one_device(strategy.scope())
    _replicas_identical(model)
    common.assert_same_training(model, reference)


@pytest.mark.parametrize(
    "unsupported",
    [tf.distribute.ParameterServerStrategy, tf.distribute.TPUStrategy],
    ids=["parameter_server", "tpu"],
)
def test_callbacks_refuse_strategies_they_cannot_rewire_under(unsupported):
    # A real ParameterServerStrategy needs a cluster and TPUStrategy a TPU: an
    # instance of the class, not started, is what the check looks at.
    strategy = unsupported.__new__(unsupported)
    model = types.SimpleNamespace(name="mlp", distribute_strategy=strategy)
    with pytest.raises(ValueError, match=f"SETEvolution.*{unsupported.__name__}"):
        _runtime.check_strategy("SETEvolution", model)


def test_one_device_strategy_on_a_second_device_rewires_there(strategy):
    # The compiled rewiring runs where the variables live, not on the default device.
    second = tf.config.list_logical_devices("CPU")[1].name
    with tf.distribute.OneDeviceStrategy(second).scope():
        model = common.compile_model(common.mlp())
    history = common.fit(model, common.CALLBACKS["rigl"]())
    assert common.rewired(history) > 0
    assert model.get_layer("masked").kernel.value.device.endswith("CPU:1")
