"""sparsify on convolutional and nested models: weights kept, choices, ERK, warnings."""

import math
import warnings

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import SparseConv1D, SparseConv2D, SparseDense
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)
X = RNG.random((4, 8, 8, 3), dtype=np.float32)


def _cnn():
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, activation="relu", name="inner_dense")],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="first")(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", name="second")(h)
    h = keras.layers.Reshape((36, 8))(h)
    h = keras.layers.Conv1D(8, 3, name="temporal")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(2, name="logits")(inner(h))
    return keras.Model(inputs, outputs)


def test_converts_convolutions_and_nested_models_keeping_weights():
    dense = _cnn()
    sparse = ksm.sparsify(dense, density=0.4, seed=0)
    types = {x.name: type(x) for x in sparse._flatten_layers(include_self=False)}
    assert types["first"] is SparseConv2D and types["second"] is SparseConv2D
    assert types["temporal"] is SparseConv1D
    assert types["inner_dense"] is SparseDense and types["logits"] is SparseDense
    for name in ("first", "second", "temporal", "inner_dense"):
        old = next(x for x in dense._flatten_layers() if x.name == name)
        new = next(x for x in sparse._flatten_layers() if x.name == name)
        kernel, mask = to_numpy(new.kernel), new.dense_mask()
        assert new.num_connections == round(0.4 * math.prod(kernel.shape))
        np.testing.assert_array_equal(kernel, np.where(mask, to_numpy(old.kernel), 0))
        np.testing.assert_array_equal(to_numpy(new.bias), to_numpy(old.bias))
    full = ksm.sparsify(dense, density=1.0)
    np.testing.assert_allclose(to_numpy(full(X)), to_numpy(dense(X)), rtol=1e-5, atol=1e-6)


def test_include_and_exclude_by_name_or_class():
    dense = _cnn()
    only_convs = ksm.sparsify(dense, density=0.5, include=[keras.layers.Conv2D])
    kinds = [type(x).__name__ for x in only_convs._flatten_layers(include_self=False)]
    assert kinds.count("SparseConv2D") == 2 and "SparseDense" not in kinds
    assert "SparseConv1D" not in kinds
    kept = ksm.sparsify(dense, density=0.5, exclude=["first", "logits"])
    assert isinstance(kept.get_layer("first"), keras.layers.Conv2D)
    assert isinstance(kept.get_layer("logits"), keras.layers.Dense)
    assert isinstance(kept.get_layer("second"), SparseConv2D)
    with pytest.raises(ValueError, match=r"include=\['nope'\]"):
        ksm.sparsify(dense, density=0.5, include=["nope"])
    with pytest.raises(TypeError, match="invalid `exclude`"):
        ksm.sparsify(dense, density=0.5, exclude=[3])
    with pytest.raises(ValueError, match="found no layer to convert"):
        ksm.sparsify(dense, density=0.5, include=["first"], exclude=[keras.layers.Conv2D])


def test_erk_distribution_spreads_a_global_density():
    dense = _cnn()
    sparse = ksm.sparsify(dense, density=0.2, distribution="erk", seed=0)
    layers = [x for x in sparse._flatten_layers() if isinstance(x, ksm.layers.SparseKernelLayer)]
    shapes = [x.weight_shape for x in layers]
    expected = ksm.topologies.erk_densities(shapes, 0.2)
    for layer, density in zip(layers, expected):  # within one connection of the ERK share
        assert abs(layer.num_connections - density * math.prod(layer.weight_shape)) < 1
    total = sum(x.num_connections for x in layers)
    assert total == round(0.2 * sum(math.prod(s) for s in shapes))
    with pytest.raises(ValueError, match="pass `density`"):
        ksm.sparsify(dense, epsilon=2, distribution="erk")
    # A small first layer, capped at dense: the total is the global density exactly
    # (each layer rounded on its own would give 595).
    small_first = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(19), keras.layers.Dense(30), keras.layers.Dense(21)]
    )
    sparse = ksm.sparsify(small_first, density=0.48, distribution="erk", seed=0)
    counts = [x.num_connections for x in sparse.layers]
    assert counts[0] == 2 * 19 and sum(counts) == round(0.48 * (38 + 19 * 30 + 30 * 21)) == 594
    with pytest.raises(ValueError, match="distribution='random'"):
        ksm.sparsify(dense, density=0.2, distribution="random")


def test_layers_it_cannot_convert_are_named_in_a_warning():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    h = keras.layers.Conv2D(6, 1, groups=3, name="grouped")(h)
    h = keras.layers.Conv2D(4, 1, name="pointwise")(h)
    outputs = ksm.layers.SparseExpertMixture(
        experts=[keras.Sequential([keras.layers.Dense(2, name="expert_dense")])],
        units=2,
        name="mixture",
    )(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning) as record:
        sparse = ksm.sparsify(model, density=0.5)
    message = str(record[0].message)
    for name in ("'depthwise' (DepthwiseConv2D)", "'grouped' (Conv2D)", "'expert_dense' (Dense)"):
        assert name in message
    assert "'pointwise'" not in message
    assert isinstance(sparse.get_layer("pointwise"), SparseConv2D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a model it fully converts warns nothing
        ksm.sparsify(_cnn(), density=0.5)


def test_convert_implementation_covers_convolutions():
    sparse = ksm.sparsify(_cnn(), density=0.3, seed=1)
    stored = ksm.convert_implementation(sparse, "sparse")
    assert stored.get_layer("first").implementation == "sparse"
    np.testing.assert_allclose(to_numpy(stored(X)), to_numpy(sparse(X)), rtol=1e-5, atol=1e-6)
