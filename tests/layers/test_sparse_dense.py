"""SparseDense: numpy reference, zero invariant in training, saving, export, errors."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_sparse_moe import topologies
from keras_sparse_moe.layers import SparseDense
from keras_sparse_moe.layers.storage import MaskedState
from tests.test_case import (
    JIT_COMPILE,
    assert_config_covers_init,
    assert_masked_weights_zero,
    masked_layers,
    to_numpy,
)

RNG = np.random.default_rng(0)


def _data(n=64, d=12, k=3):
    return RNG.random((n, d), dtype=np.float32), RNG.random((n, k), dtype=np.float32)


def test_matches_numpy_reference_and_reports_density():
    layer = SparseDense(7, density=0.3, activation="relu", seed=2)
    x = RNG.standard_normal((5, 11)).astype("float32")
    y = to_numpy(layer(x))
    kernel, mask, bias = (to_numpy(v) for v in (layer.kernel, layer.mask, layer.bias))
    np.testing.assert_allclose(y, np.maximum(x @ (kernel * mask) + bias, 0), rtol=1e-5, atol=1e-6)
    assert layer.num_connections == int(mask.sum()) == round(0.3 * 77)
    assert layer.actual_density == pytest.approx(mask.sum() / 77)
    assert np.all(kernel[mask == 0] == 0)
    np.testing.assert_array_equal(mask, topologies.erdos_renyi(11, 7, density=0.3, seed=2))


@pytest.mark.parametrize("density_aware_init", [True, False])
def test_density_aware_init_scales_variance_scaling(density_aware_init):
    layer = SparseDense(
        400,
        density=0.04,
        kernel_initializer="he_normal",
        density_aware_init=density_aware_init,
        seed=0,
    )
    layer.build((None, 500))
    kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
    # He: Var = 2 / fan_in; fan_in counts kept inputs only when density-aware.
    fan_in = 500 * (0.04 if density_aware_init else 1.0)
    assert np.var(kernel[mask == 1]) == pytest.approx(2 / fan_in, rel=0.1)
    # Other initializers are left as they are.
    ones = SparseDense(
        4, density=0.5, kernel_initializer="ones", density_aware_init=density_aware_init, seed=0
    )
    ones.build((None, 4))
    np.testing.assert_array_equal(to_numpy(ones.kernel), to_numpy(ones.mask))


def test_epsilon_and_default_density():
    layer = SparseDense(100, epsilon=5, seed=0)
    layer.build((None, 80))
    assert layer.num_connections == round(topologies.density_from_epsilon(5, 80, 100) * 8000)
    small = SparseDense(4)
    small.build((None, 6))  # epsilon=20 would exceed 1: capped at fully connected
    assert small.actual_density == 1.0


@pytest.mark.parametrize(
    "topology, kwargs",
    [
        ("random_regular", {}),
        ("structured_regular", {}),
        ("fibonacci", {}),
        ("fibonacci", {"rescale": "always"}),
        ("pseudo_random_regular", {}),
        ("small_world", {"num_clusters": 3}),
        ("random_regular", {"degree": 4}),
    ],
)
def test_named_topologies(topology, kwargs):
    density = None if "degree" in kwargs else 0.25
    layer = SparseDense(12, density=density, topology=topology, topology_kwargs=kwargs, seed=1)
    layer.build((None, 9))
    mask = to_numpy(layer.mask)
    expected = topologies.get(topology)(9, 12, density=density, seed=1, **kwargs)
    np.testing.assert_array_equal(mask, expected)
    if topology != "small_world":
        assert np.all(mask.sum(axis=1) == (kwargs.get("degree") or 3))
    else:
        assert mask.sum() == round(0.25 * 108)


def test_user_mask_is_kept():
    mask = (RNG.random((6, 4)) < 0.5).astype("float32")
    mask[0, 0] = 1
    layer = SparseDense(4, mask=mask)
    layer(np.ones((1, 6), "float32"))
    np.testing.assert_array_equal(to_numpy(layer.mask), mask)
    with pytest.raises(ValueError, match=r"Expected shape \(7, 4\)"):
        SparseDense(4, mask=mask)(np.ones((1, 7), "float32"))


def test_rank_3_inputs_act_on_last_axis():
    layer = SparseDense(5, density=0.5, use_bias=False, seed=0)
    x = RNG.random((2, 3, 8), dtype=np.float32)
    y = to_numpy(layer(x))
    assert y.shape == (2, 3, 5) == layer.compute_output_shape((2, 3, 8))
    np.testing.assert_allclose(y, x @ (to_numpy(layer.kernel) * to_numpy(layer.mask)), rtol=1e-5)


class SubclassedMLP(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = SparseDense(16, density=0.2, activation="relu", seed=0)
        self.out = SparseDense(3, density=0.5, seed=1)

    def call(self, x):
        return self.out(self.hidden(x))


def _functional():
    inputs = keras.Input((12,))
    h = SparseDense(16, density=0.2, activation="relu", seed=0)(inputs)
    return keras.Model(inputs, SparseDense(3, density=0.5, seed=1)(h))


def _sequential():
    return keras.Sequential(
        [
            keras.Input((12,)),
            SparseDense(16, density=0.2, activation="relu", seed=0),
            SparseDense(3, density=0.5, seed=1),
        ]
    )


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
}


@pytest.mark.keras_deferred_build  # the optimizer built inside the traced step too
@pytest.mark.parametrize("build", [_sequential, _functional, SubclassedMLP])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_masked_weights_stay_exactly_zero_in_fit(build, optimizer, jit_compile):
    model = build()
    model.compile(OPTIMIZERS[optimizer](), "mse", jit_compile=jit_compile)
    x, y = _data()
    model.predict(x[:2], verbose=0)
    layers = masked_layers(model)
    before = [to_numpy(layer.kernel).copy() for layer in layers]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert_masked_weights_zero(model)
    # ... and the kept weights did train.
    for b, layer in zip(before, layers):
        moved = b != to_numpy(layer.kernel)
        assert moved.any() and np.all(to_numpy(layer.mask)[moved] == 1)


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_a_nan_input_leaves_masked_weights_exactly_zero(jit_compile):
    # A NaN gradient times a zero mask is NaN: masking must select, not multiply.
    x = np.random.default_rng(0).random((64, 16)).astype("float32")
    x[5, 3] = np.nan
    model = keras.Sequential([keras.Input((16,)), SparseDense(8, density=0.3, seed=0)])
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    model.fit(x, np.zeros((64, 8), "float32"), batch_size=16, epochs=2, verbose=0)
    layer = model.layers[0]
    kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
    assert np.isnan(kernel[mask > 0]).any()  # the user's NaN did reach the kept weights
    assert np.all(kernel[mask == 0] == 0)


def test_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _sequential()
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    x, y = _data()
    model.fit(x, y, epochs=2, verbose=0)
    layer = model.layers[0]
    assert layer.compute_dtype == "float16" and layer.kernel.dtype == "float32"
    assert layer.mask.dtype == "float32"
    assert keras.backend.standardize_dtype(model(x).dtype) == "float16"
    assert_masked_weights_zero(model)


def test_set_weights_keeps_the_invariant():
    layer = SparseDense(4, density=0.25, seed=0)
    layer.build((None, 8))
    assert [v.name for v in layer.weights] == ["kernel", "bias", "mask"]
    mask = to_numpy(layer.mask)
    layer.set_weights([np.ones((8, 4)), np.zeros(4), mask])
    np.testing.assert_array_equal(to_numpy(layer.kernel), mask)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": 8, "density": 0.3, "seed": 4},
        {"units": 8, "epsilon": 2.0, "topology": "fibonacci", "activation": "relu"},
        {"units": 3, "mask": np.eye(5, 3), "use_bias": False},
        {
            "units": 8,
            "density": 0.5,
            "topology": "small_world",
            "topology_kwargs": {"num_clusters": 2},
        },
        {"units": 8, "kernel_regularizer": "l2", "kernel_constraint": "max_norm", "seed": 1},
        {"units": 8, "density": 0.2, "allowed": topologies.BlockPattern.within_clusters(2)},
    ],
)
def test_config_round_trip(kwargs):
    layer = SparseDense(**kwargs)
    assert_config_covers_init(layer)
    clone = SparseDense.from_config(layer.get_config())
    layer.build((None, 5))
    clone.build((None, 5))
    if kwargs.get("seed") is not None or "mask" in kwargs or kwargs.get("topology") == "fibonacci":
        np.testing.assert_array_equal(to_numpy(layer.mask), to_numpy(clone.mask))


def test_keras_save_and_load(tmp_path):
    model = _functional()
    model.compile("adam", "mse")
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6)
    for a, b in zip(masked_layers(model), masked_layers(loaded)):
        np.testing.assert_array_equal(to_numpy(a.mask), to_numpy(b.mask))
    loaded.fit(x, y, epochs=1, verbose=0)  # training resumes with the same masks
    assert_masked_weights_zero(loaded)


@pytest.mark.tensorflow_only
def test_saved_model_export(tmp_path):
    import tensorflow as tf

    model = _functional()
    model.compile("adam", "mse")
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x).numpy(), to_numpy(model(x)), rtol=1e-5)
    variables = {v.name: v.numpy() for v in reloaded.variables}
    for layer in masked_layers(model):
        mask = to_numpy(layer.mask)
        exported = [
            v for name, v in variables.items() if v.shape == mask.shape and "kernel" in name
        ]
        assert any(np.array_equal(v, to_numpy(layer.kernel)) for v in exported)
        for v in exported:
            if np.array_equal(v, to_numpy(layer.kernel)):
                assert np.all(v[mask == 0] == 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"units": 0}, ValueError, "units=0"),
        ({"units": -3}, ValueError, "units=-3"),
        ({"units": 2.5}, TypeError, "units=2.5"),
        ({"units": "8"}, TypeError, "units='8'"),
        ({"units": 8, "density": 1.5}, ValueError, "density=1.5"),
        ({"units": 8, "density": 0}, ValueError, "density=0"),
        ({"units": 8, "density": 0.1, "epsilon": 3}, ValueError, "not both"),
        ({"units": 8, "epsilon": -1}, ValueError, "epsilon=-1"),
        (
            {"units": 8, "topology": "ring"},
            ValueError,
            "erdos_renyi.*fibonacci|fibonacci.*erdos_renyi",
        ),
        ({"units": 8, "implementation": "csr"}, ValueError, "implementation='csr'"),
        ({"units": 3, "mask": np.ones((4, 2))}, ValueError, r"mask.shape=\(4, 2\)"),
        ({"units": 2, "mask": np.full((4, 2), 0.5)}, ValueError, "non-binary"),
        ({"units": 2, "mask": np.ones((4, 2)), "density": 0.5}, ValueError, "not both"),
        ({"units": 8, "seed": "0"}, TypeError, "seed='0'"),
        ({"units": 8, "seed": 1.0}, TypeError, "seed=1.0"),
        ({"units": 8, "topology_kwargs": 3}, TypeError, "topology_kwargs=3"),
        ({"units": 8, "density_aware_init": "yes"}, TypeError, "density_aware_init='yes'"),
        ({"units": 8, "allowed": "blocks"}, TypeError, "allowed='blocks'"),
        (
            {
                "units": 8,
                "density": 0.5,
                "topology": "random_regular",
                "topology_kwargs": {"degree": 2},
            },
            ValueError,
            "not both",
        ),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseDense(**kwargs)


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({"units": 100, "epsilon": 80}, (None, 10), "epsilon <= "),
        (
            {"units": 4, "topology": "random_regular", "topology_kwargs": {"degree": 9}},
            (None, 5),
            "degree=9",
        ),
        ({"units": 4}, (None, None), "known last input dimension"),
        (  # more connections than the allowed blocks hold
            {"units": 8, "density": 0.6, "allowed": np.eye(2)},
            (None, 8),
            "room for 32",
        ),
        (  # a topology drawing outside the pattern
            {"units": 8, "density": 0.5, "topology": "fibonacci", "allowed": np.eye(2)},
            (None, 8),
            "lie outside its `allowed`",
        ),
        ({"units": 2, "mask": np.ones((4, 2)), "allowed": np.eye(2)}, (None, 4), "its `mask`"),
        ({"units": 8, "allowed": np.ones((9, 1))}, (None, 8), r"blocks.shape=\(9, 1\)"),
    ],
)
def test_invalid_at_build(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        SparseDense(**kwargs).build(shape)


def test_allowed_pattern_bounds_the_initial_draw():
    pattern = topologies.BlockPattern.between_clusters(3)
    layer = SparseDense(12, density=0.25, allowed=pattern, seed=0)
    layer.build((None, 12))
    mask = to_numpy(layer.mask)
    assert mask.sum() == round(0.25 * 144)  # density of the whole kernel
    assert not np.any((mask > 0) & ~pattern.dense((12, 12)))
    assert layer.num_allowed == 96
    # A dense binary array is the finest pattern.
    fine = np.random.default_rng(0).random((12, 12)) < 0.5
    layer = SparseDense(12, density=0.1, allowed=fine.astype(int), seed=0)
    layer.build((None, 12))
    assert not np.any((to_numpy(layer.mask) > 0) & ~fine) and layer.num_allowed == fine.sum()


def test_connection_interface_matches_the_mask():
    layer = SparseDense(6, density=0.3, seed=2)
    layer.build((None, 5))
    mask, kernel = to_numpy(layer.mask) > 0, to_numpy(layer.kernel)
    assert layer.kernel_shape == (5, 6)
    positions = to_numpy(layer.connection_positions())
    np.testing.assert_array_equal(positions, np.flatnonzero(mask))
    np.testing.assert_array_equal(to_numpy(layer.connection_values()), kernel.ravel()[positions])
    np.testing.assert_array_equal(layer.dense_mask(), mask)
    layer.assign_dense_kernel(np.full((5, 6), 2.0))
    np.testing.assert_array_equal(to_numpy(layer.kernel), np.where(mask, 2.0, 0.0))
    with pytest.raises(ValueError, match=r"shape \(6, 5\)"):
        layer.assign_dense_kernel(np.ones((6, 5)))

    # `rewire` runs a compiled step on the storage's typed state and keeps its connection list.
    def move_first(storage, state, positions, target):
        assert isinstance(state, MaskedState) and state.slots == ()
        kernel, mask = state.kernel, state.mask
        first = positions[:1]
        mask = ops.scatter_update(mask, ops.expand_dims(first, -1), ops.zeros((1,)))
        mask = ops.scatter_update(mask, ops.reshape(target, (1, 1)), ops.ones((1,)))
        kernel = ops.scatter_update(kernel, ops.expand_dims(first, -1), ops.zeros((1,)))
        new_positions = ops.concatenate([ops.reshape(target, (1,)), positions[1:]])
        return MaskedState(kernel, mask), new_positions, ops.sum(mask)

    target = int(np.flatnonzero(~mask.ravel())[0])
    count = layer.rewire(move_first, None, (), np.asarray(target, "int32"))
    assert int(to_numpy(count)) == mask.sum() == layer.num_connections
    expected = np.append(positions[1:], target)
    np.testing.assert_array_equal(
        np.sort(to_numpy(layer.connection_positions())), np.sort(expected)
    )
    np.testing.assert_array_equal(np.flatnonzero(layer.dense_mask()), np.sort(expected))
    layer.set_weights(layer.get_weights())  # setting weights rebuilds the list from the mask
    np.testing.assert_array_equal(to_numpy(layer.connection_positions()), np.sort(expected))


def test_num_connections_before_build_is_a_clear_error():
    with pytest.raises(ValueError, match="once the layer is built"):
        _ = SparseDense(4).num_connections


def test_arguments_in_keras_dense_order():
    """`SparseDense(64, "relu")` as `keras.layers.Dense(64, "relu")`; numpy ints count as ints."""
    import inspect

    dense = inspect.signature(keras.layers.Dense.__init__).parameters
    ours = inspect.signature(SparseDense.__init__).parameters
    keras_order = [
        n
        for n in dense
        if n not in ("self", "kwargs", "lora_rank", "lora_alpha", "quantization_config")
    ]
    assert list(ours)[1 : len(keras_order) + 1] == keras_order
    x = np.random.default_rng(0).standard_normal((3, 5)).astype("float32")
    positional = SparseDense(np.int64(4), "relu", False, density=0.5, seed=1)
    named = SparseDense(4, activation="relu", use_bias=False, density=0.5, seed=1)
    expected = to_numpy(positional(x))
    named.build(x.shape)
    named.set_weights(positional.get_weights())  # same connections (seed), same values
    np.testing.assert_array_equal(expected, to_numpy(named(x)))
    assert positional.units == 4 and isinstance(positional.units, int) and positional.bias is None
    with pytest.raises(TypeError, match="activation"):
        SparseDense(4, "relu", activation="tanh")
