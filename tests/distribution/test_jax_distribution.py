"""keras.distribution on JAX over 4 host devices: DataParallel and expert parallelism.

`make test` runs this module in its own pytest call with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (JAX reads it at start).
"""

import keras
import numpy as np
import pytest

from keras_sparse_moe.distribution import expert_layout_map, expert_variable_layouts
from tests.distribution import common

pytestmark = pytest.mark.distributed

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution runs on the JAX backend", allow_module_level=True)

import jax  # noqa: E402

if jax.device_count() < 4:
    pytest.skip(
        "needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by `make test`)",
        allow_module_level=True,
    )


def _train_both(build, callback, distribution):
    """The same model trained on one device and under `distribution`, from the same weights."""
    reference = common.compile_model(build())
    weights = reference.get_weights()
    single = common.fit(reference, common.CALLBACKS[callback]())
    with distribution.scope():
        model = common.compile_model(build())
        model.set_weights(weights)
        history = common.fit(model, common.CALLBACKS[callback]())
    return reference, single, model, history


def test_data_parallel_bias_balancing_matches_one_device():
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])
    model, reference = common.bias_balancing_matches_one_device(distribution.scope())
    _assert_replicated_and_consistent(model)
    common.assert_same_training(model, reference)


@pytest.mark.parametrize("callback", ["set", "rigl"])
def test_data_parallel_n_m_rewiring_keeps_groups(callback):
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])
    reference, single, model, history = _train_both(common.n_m_mlp, callback, distribution)
    key = f"{common.CALLBACKS[callback]().name}/rewired"
    assert sum(history[key]) > 0 and history[key] == single[key]
    common.assert_same_training(model, reference)
    common.assert_exactly_n_m(model)


def _spec(variable):
    return tuple(variable.value.sharding.spec)


def _assert_replicated_and_consistent(model):
    """Every replicated variable's copies agree bit for bit on all 4 devices."""
    for variable in model.variables + model.optimizer.variables:
        value = variable.value
        if value.sharding.is_fully_replicated:
            shards = [np.asarray(s.data) for s in value.addressable_shards]
            assert len(shards) == 4, variable.path
            assert all(np.array_equal(shards[0], s) for s in shards[1:]), variable.path


@pytest.mark.parametrize("callback", sorted(common.CALLBACKS))
def test_data_parallel_callbacks_match_one_device(callback):
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])
    reference, single, model, history = _train_both(common.mlp, callback, distribution)
    key = f"{common.CALLBACKS[callback]().name}/rewired"
    assert sum(history[key]) > 0 and history[key] == single[key]
    _assert_replicated_and_consistent(model)
    common.assert_same_training(model, reference)


def test_data_parallel_mixture_with_losses_matches_one_device():
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])

    def build():
        return common.mixture(route_density=0.2, balance_losses="entropy")

    reference, _, model, history = _train_both(build, "set", distribution)
    assert common.rewired(history) > 0
    _assert_replicated_and_consistent(model)
    common.assert_same_training(model, reference)


def _mesh():
    return keras.distribution.DeviceMesh((2, 2), ["batch", "model"], jax.devices()[:4])


def test_expert_layout_map_shards_experts_and_their_slots():
    model = common.mixture(route_density=0.2)
    layout_map = expert_layout_map(model, _mesh())
    sharded = expert_variable_layouts(model, layout_map)
    bank = "moe/experts/"
    assert sharded == {
        f"{bank}expert_{name}/{kind}": axes
        for name in ("hidden", "output", "routes")
        for kind, axes in (
            ("kernel", (None, "model")),
            ("bias", ("model",)),
            ("mask", (None, "model")),
        )
        if not (name == "routes" and kind == "bias")  # routes have no bias
    }
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        model = common.compile_model(common.mixture(route_density=0.2))
        common.fit(model, common.CALLBACKS["set"]())
    slots = {v.path.split("/", 1)[1]: _spec(v) for v in model.optimizer.variables}
    for variable in model.variables:
        expected = sharded.get(variable.path)
        assert _spec(variable) == (expected or (None,) * len(variable.shape)), variable.path
        if expected and variable.trainable:  # its momentum follows its layout
            assert slots[variable.path.replace("/", "_") + "_momentum"] == expected
    # Each device along "model" holds 2 of the 4 experts: half the columns.
    kernel = model.get_layer("moe").expert_bank.expert_hidden.kernel.value
    assert {s.data.shape for s in kernel.addressable_shards} == {(20, 2 * 16)}


def test_expert_parallel_training_matches_one_device():
    layout_map = expert_layout_map(common.mixture(), _mesh())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    def build():
        return common.mixture(route_density=0.2, balance_losses={"sample_entropy": 0.1})

    reference, single, model, history = _train_both(build, "set", distribution)
    assert common.rewired(history) > 0 and history["set/rewired"] == single["set/rewired"]
    common.assert_same_training(model, reference)
    kernel = model.get_layer("moe").expert_bank.expert_output.kernel
    assert _spec(kernel) == (None, "model")  # still sharded after rewiring
