"""strip: sparse layers become Keras built-ins with the masked kernels; served without the package."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import SparseConv1D, SparseConv2D, SparseDense, SparseExpertMixture
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((5, 8, 8, 3)).astype("float32")


def _sparse_cnn(implementation):
    inner = keras.Sequential(
        [keras.Input((8,)), SparseDense(8, "relu", density=0.5, seed=3, name="inner_dense")],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    h = SparseConv2D(8, 3, activation="relu", density=0.4, seed=0, implementation=implementation)(
        inputs
    )
    h = keras.layers.Reshape((36, 8))(h)
    h = SparseConv1D(8, 3, density=0.5, seed=1, implementation=implementation)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.BatchNormalization()(inner(h))
    outputs = SparseDense(3, density=0.3, seed=2, implementation=implementation, name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    model.fit(X, RNG.standard_normal((5, 3)), epochs=2, verbose=0)  # biases and BN move
    return model


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_strip_gives_built_in_layers_with_the_masked_kernels(implementation):
    model = _sparse_cnn(implementation)
    plain = ksm.strip(model)
    pairs = list(zip(ksm.find_layers(model), ksm.find_layers(plain)))
    built_in = {SparseDense: keras.layers.Dense, SparseConv1D: keras.layers.Conv1D}
    built_in[SparseConv2D] = keras.layers.Conv2D
    for old, new in pairs:
        assert type(new).__module__.startswith("keras."), type(new)
        if type(old) in built_in:
            assert type(new) is built_in[type(old)]
            kernel = to_numpy(old.dense_kernel())
            np.testing.assert_array_equal(to_numpy(new.kernel), kernel)
            # Zero exactly off the connections, as many nonzeros as connections at most.
            assert np.count_nonzero(kernel) <= old.num_connections
            np.testing.assert_array_equal(to_numpy(new.bias), to_numpy(old.bias))
            assert new.activation is old.activation
    np.testing.assert_allclose(to_numpy(plain(X)), to_numpy(model(X)), rtol=1e-5, atol=1e-5)


def test_strip_refuses_a_mixture_naming_the_layer():
    model = keras.Sequential(
        [keras.Input((6,)), SparseExpertMixture(units=2, num_experts=3, top_k=1, seed=0)]
    )
    with pytest.raises(ValueError, match="sparse_expert_mixture.*SparseExpertMixture.*export"):
        ksm.strip(model)
    with pytest.raises(TypeError, match="model of type SparseDense"):
        ksm.strip(SparseDense(3))


@pytest.mark.slow
def test_stripped_model_loads_and_serves_without_the_package(tmp_path):
    model = _sparse_cnn("sparse")
    path = os.path.join(tmp_path, "plain.keras")
    ksm.strip(model).save(path)
    np.save(os.path.join(tmp_path, "x.npy"), X)
    np.save(os.path.join(tmp_path, "expected.npy"), to_numpy(model(X)))
    child = textwrap.dedent(
        f"""
        import importlib.util, os, sys
        # No editable-install finder and no repository on the path: the package is absent.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
        sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != {os.getcwd()!r}]
        assert importlib.util.find_spec("keras_sparse_moe") is None, "package still importable"
        import keras, numpy as np
        model = keras.models.load_model({path!r})
        got = model.predict(np.load({os.path.join(tmp_path, "x.npy")!r}), verbose=0)
        np.testing.assert_allclose(got, np.load({os.path.join(tmp_path, "expected.npy")!r}),
                                   rtol=1e-5, atol=1e-5)
        print("served", sorted({{type(layer).__name__ for layer in model.layers}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SparseDense" not in result.stdout and "served" in result.stdout
