"""SparseConv1D / SparseConv2D: the SparseDense contract on convolution kernels."""

import math
import os

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.callbacks import MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.layers import SparseConv1D, SparseConv2D
from keras_sparse_moe.layers.sparse_kernel import compute_fans, initial_values
from keras_sparse_moe.schedules import ConstantSparsity
from tests.test_case import (
    JIT_COMPILE,
    assert_config_covers_init,
    assert_masked_weights_zero,
    masked_layers,
    to_numpy,
)

RNG = np.random.default_rng(0)
X2 = RNG.standard_normal((48, 8, 8, 3)).astype("float32")
Y2 = np.eye(4, dtype="float32")[(X2[:, :4, :4, 0].mean((1, 2)) > 0).astype(int) * 2]


def _reference(layer):
    """The Keras convolution `layer` stands for, holding its (masked) kernel."""
    config = {
        k: v
        for k, v in layer.get_config().items()
        if k in ("filters", "kernel_size", "strides", "padding", "dilation_rate", "use_bias")
    }
    dense = (keras.layers.Conv1D if layer.rank == 1 else keras.layers.Conv2D)(**config)
    dense.build((None, *([9] * layer.rank), layer.weight_shape[-2]))
    dense.set_weights([to_numpy(w) for w in (layer.dense_kernel(), layer.bias)])
    return dense


@pytest.mark.parametrize(
    "cls, kwargs, shape",
    [
        (SparseConv1D, dict(kernel_size=3), (2, 11, 4)),
        (SparseConv1D, dict(kernel_size=3, padding="causal", dilation_rate=2), (2, 11, 4)),
        (SparseConv1D, dict(kernel_size=4, strides=2, padding="same"), (2, 11, 4)),
        (SparseConv2D, dict(kernel_size=3, padding="same"), (2, 9, 9, 3)),
        (SparseConv2D, dict(kernel_size=(3, 2), strides=(2, 1)), (2, 9, 9, 3)),
        (SparseConv2D, dict(kernel_size=3, dilation_rate=2, padding="same"), (2, 9, 9, 3)),
    ],
)
@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_matches_keras_convolution_with_the_masked_kernel(cls, kwargs, shape, implementation):
    layer = cls(6, density=0.3, seed=0, implementation=implementation, **kwargs)
    x = RNG.standard_normal(shape).astype("float32")
    y = to_numpy(layer(x))
    kernel, mask = to_numpy(layer.dense_kernel()), layer.dense_mask()
    assert kernel.shape == mask.shape == layer.weight_shape
    assert np.all(kernel[~mask] == 0)
    assert layer.num_connections == round(0.3 * math.prod(layer.weight_shape))
    assert tuple(y.shape) == layer.compute_output_shape(shape)
    if kwargs.get("padding") == "causal":  # Keras' Conv1D pads left by dilation * (k - 1)
        pad = 2 * (3 - 1)  # dilation * (kernel_size - 1)
        x_ref = np.pad(x, [(0, 0), (pad, 0), (0, 0)])
        reference = keras.layers.Conv1D(6, 3, dilation_rate=2, padding="valid")
        reference.build(x_ref.shape)
        reference.set_weights([kernel, to_numpy(layer.bias)])
        expected = to_numpy(reference(x_ref))
    else:
        expected = to_numpy(_reference(layer)(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_one_dimensional_case():
    mask = np.zeros((2, 1, 1), "float32")
    mask[1, 0, 0] = 1  # only the second tap: y[t] = w * x[t + 1]
    layer = SparseConv1D(1, 2, mask=mask, use_bias=False)
    layer.build((None, 5, 1))
    layer.assign_dense_kernel(np.full((2, 1, 1), 3.0))
    x = np.arange(5, dtype="float32").reshape(1, 5, 1)
    np.testing.assert_array_equal(to_numpy(layer(x))[0, :, 0], 3.0 * np.arange(1, 5))
    assert to_numpy(layer.kernel)[0, 0, 0] == 0  # the masked tap stayed zero


def test_density_from_epsilon_counts_kernel_dimensions():
    layer = SparseConv2D(32, 3, epsilon=4, seed=0)
    layer.build((None, 8, 8, 16))
    shape = (3, 3, 16, 32)
    assert layer.num_connections == round(4 * sum(shape) / math.prod(shape) * math.prod(shape))
    assert layer.kernel_shape == (3 * 3 * 16, 32)
    # ERK counts the kernel dimensions: density ∝ sum(shape) / prod(shape).
    densities = ksm.topologies.erk_densities([shape, (64, 10)], 0.1)
    scale = 0.1 * (math.prod(shape) + 640) / (sum(shape) + 74)
    assert densities == pytest.approx([scale * sum(shape) / math.prod(shape), scale * 74 / 640])


def test_initial_values_use_the_convolution_fans():
    shape = (3, 3, 16, 32)
    assert compute_fans(shape) == (144, 288)
    initializer = keras.initializers.GlorotNormal(seed=0)
    drawn = to_numpy(initial_values(initializer, shape, 40_000)(None, "float32"))
    reference = to_numpy(keras.initializers.GlorotNormal(seed=1)((30, 30, 16, 32)))
    expected_std = np.sqrt(2.0 / (144 + 288))  # Glorot: 2 / (fan_in + fan_out)
    assert drawn.std() == pytest.approx(expected_std, rel=0.03)
    # Keras' own draw for a larger kernel of the same kind has fans 100x larger.
    assert reference.std() == pytest.approx(expected_std / 10, rel=0.03)


def _cnn(implementation="masked", density=0.3, jit_compile=True, optimizer=None):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            SparseConv2D(
                8,
                3,
                padding="same",
                activation="relu",
                density=density,
                seed=0,
                implementation=implementation,
                name="c1",
            ),
            SparseConv2D(
                8,
                3,
                strides=2,
                activation="relu",
                density=density,
                seed=1,
                implementation=implementation,
                name="c2",
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.Adam(0.01),
        "categorical_crossentropy",
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_masked_weights_stay_exactly_zero_in_fit(jit_compile):
    model = _cnn(jit_compile=jit_compile)
    before = {layer.name: layer.dense_mask().copy() for layer in masked_layers(model)}
    kernels = {layer.name: to_numpy(layer.kernel).copy() for layer in masked_layers(model)}
    model.fit(X2, Y2, batch_size=16, epochs=1, verbose=0)
    assert_masked_weights_zero(model)
    for layer in masked_layers(model):
        np.testing.assert_array_equal(layer.dense_mask(), before[layer.name])
        moved = to_numpy(layer.kernel) != kernels[layer.name]
        assert moved[before[layer.name]].mean() > 0.9  # kept connections train


def _assert_storage_invariant(layer):
    if layer.implementation == "masked":
        kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
        assert np.all(kernel[mask == 0] == 0)
    else:
        rows, values = layer.storage.slot_indices()[0], to_numpy(layer.values)
        assert np.all(values[rows >= layer.kernel_shape[0]] == 0)


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
@pytest.mark.parametrize("callback", ["set", "rigl", "pruning"])
def test_callbacks_evolve_convolution_kernels(callback, implementation):
    density = 1.0 if callback == "pruning" else 0.3
    model = _cnn(implementation=implementation, density=density)
    layers = masked_layers(model)
    counts = [layer.num_connections for layer in layers]
    masks = [layer.dense_mask().copy() for layer in layers]
    if callback == "set":
        cb = SETEvolution(zeta=0.3, update_every=3, seed=0)
    elif callback == "rigl":
        cb = RigL(data=(X2, Y2), update_every=3, drop_fraction=0.3, end_step=9, seed=0)
    else:
        cb = MagnitudePruning(ConstantSparsity(0.75, begin_step=2, frequency=100))
    history = model.fit(X2, Y2, batch_size=16, epochs=3, verbose=0, callbacks=[cb])
    for layer, count, mask in zip(layers, counts, masks):
        _assert_storage_invariant(layer)
        if callback == "pruning":
            size = math.prod(layer.weight_shape)
            assert layer.num_connections == round(0.25 * size)
        else:
            assert layer.num_connections == count
            assert (layer.dense_mask() != mask).any(), f"{callback} left {layer.name} unchanged"
    assert sum(history.history[f"{cb.name}/rewired"]) > 0


def test_sparse_storage_gradients_equal_masked():
    masked = SparseConv2D(5, 3, density=0.4, seed=3, padding="same")
    sparse = SparseConv2D(5, 3, density=0.4, seed=3, padding="same", implementation="sparse")
    x = RNG.standard_normal((3, 6, 6, 2)).astype("float32")
    masked.build(x.shape)
    sparse.build(x.shape)
    np.testing.assert_array_equal(sparse.dense_mask(), masked.dense_mask())
    sparse.assign_connections(*masked.connection_indices(), to_numpy(masked.connection_values()))
    sparse.bias.assign(to_numpy(masked.bias))
    np.testing.assert_allclose(to_numpy(sparse(x)), to_numpy(masked(x)), atol=1e-5)
    grads = []
    for layer in (masked, sparse):
        weight = layer.storage_variables[0]
        grads.append(_gradient(layer, weight, x))
    rows, cols = masked.connection_indices()
    dense_grad = grads[0].reshape(masked.kernel_shape)[rows, cols]
    sparse_grad = grads[1][: masked.num_connections]
    np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-4, atol=1e-5)


def _gradient(layer, weight, x):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, weight).numpy()
    import jax

    def loss(value):
        trainable = [value if v is weight else v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        return (layer.stateless_call(trainable, non_trainable, x)[0] ** 2).sum()

    return np.asarray(jax.grad(loss)(weight.value))


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (SparseConv1D, dict(filters=4, kernel_size=3, padding="causal", epsilon=2.0)),
        (SparseConv2D, dict(filters=4, kernel_size=(3, 1), strides=2, density=0.2)),
        (
            SparseConv2D,
            dict(filters=2, kernel_size=1, mask=np.eye(3, 2).reshape(1, 1, 3, 2)),
        ),
        (SparseConv2D, dict(filters=4, kernel_size=3, implementation="sparse", density=0.5)),
    ],
)
def test_config_round_trip(cls, kwargs):
    assert_config_covers_init(cls(**kwargs))


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_keras_save_and_load(tmp_path, implementation):
    model = _cnn(implementation=implementation)
    model.fit(X2, Y2, batch_size=16, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "cnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X2[:5])), to_numpy(model(X2[:5])), atol=1e-6)
    for old, new in zip(masked_layers(model), masked_layers(loaded)):
        np.testing.assert_array_equal(new.dense_mask(), old.dense_mask())


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (SparseConv2D, dict(filters=4, kernel_size=3, groups=2), ValueError, "groups=2"),
        (SparseConv2D, dict(filters=4, kernel_size=3, padding="causal"), ValueError, "padding"),
        (SparseConv2D, dict(filters=4, kernel_size=(3, 0)), ValueError, "kernel_size"),
        (SparseConv1D, dict(filters=0, kernel_size=3), ValueError, "filters"),
        (
            SparseConv2D,
            dict(filters=4, kernel_size=3, strides=2, dilation_rate=2),
            ValueError,
            "dilation_rate",
        ),
        (
            SparseConv2D,
            dict(filters=4, kernel_size=3, mask=np.ones((3, 2, 2, 4))),
            ValueError,
            r"mask.*\(3, 3, 'input_dim', 4\).*\(3, 2, 2, 4\)",
        ),
        (
            SparseConv2D,
            dict(filters=4, kernel_size=3, data_format="nhwc"),
            ValueError,
            "data_format",
        ),
    ],
)
def test_invalid_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_mask_with_other_channels_fails_at_build():
    layer = SparseConv2D(4, 3, mask=np.ones((3, 3, 2, 4)))
    with pytest.raises(ValueError, match=r"Expected shape \(3, 3, 5, 4\)"):
        layer.build((None, 8, 8, 5))


def test_arguments_in_keras_conv_order():
    import inspect

    conv = inspect.signature(keras.layers.Conv2D.__init__).parameters
    ours = inspect.signature(SparseConv2D.__init__).parameters
    keras_order = [n for n in conv if n not in ("self", "kwargs", "lora_rank", "lora_alpha")]
    assert list(ours)[1 : len(keras_order) + 1] == keras_order
    layer = SparseConv2D(4, 3, 1, "same", None, 1, 1, "relu", density=0.5, seed=0)
    assert (layer.padding, layer.activation) == ("same", keras.activations.relu)
