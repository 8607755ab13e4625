"""MaskConstraint on plain Keras layers, and the sparsity summary."""

import math
import os

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.constraints import MaskConstraint, apply_mask_constraints
from tests.test_case import JIT_COMPILE, to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 6, 6, 2)).astype("float32")
Y = RNG.standard_normal((32, 3)).astype("float32")
CONV_MASK = (RNG.random((3, 3, 2, 4)) < 0.3).astype("float32")
DENSE_MASK = (RNG.random((4, 3)) < 0.5).astype("float32")
DENSE_MASK[:, 0] = 1  # every conv filter feeds the output (else it gets no gradient)


def _model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(
                4, 3, activation="tanh", kernel_constraint=MaskConstraint(CONV_MASK), name="conv"
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, kernel_constraint=MaskConstraint(DENSE_MASK), name="dense"),
        ]
    )


def _assert_masked(model):
    for name, mask in (("conv", CONV_MASK), ("dense", DENSE_MASK)):
        kernel = to_numpy(model.get_layer(name).kernel)
        assert np.all(kernel[mask == 0] == 0), f"{name}: masked weights are not zero"


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_masked_weights_are_zero_after_every_fit_step(jit_compile):
    model = _model()
    assert apply_mask_constraints(model) == 2
    _assert_masked(model)
    before = to_numpy(model.get_layer("conv").kernel).copy()
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    _assert_masked(model)
    moved = to_numpy(model.get_layer("conv").kernel) != before
    assert moved[CONV_MASK == 1].all()  # the kept entries train


def test_save_and_load_keeps_the_mask(tmp_path):
    model = _model()
    apply_mask_constraints(model)
    model.compile("adam", "mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "masked.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    constraint = loaded.get_layer("conv").kernel_constraint
    assert isinstance(constraint, MaskConstraint)
    np.testing.assert_array_equal(constraint.mask, CONV_MASK)
    np.testing.assert_allclose(to_numpy(loaded(X[:4])), to_numpy(model(X[:4])), atol=1e-6)
    loaded.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    _assert_masked(loaded)


def test_config_round_trip():
    constraint = MaskConstraint(CONV_MASK)
    clone = MaskConstraint.from_config(constraint.get_config())
    np.testing.assert_array_equal(clone.mask, CONV_MASK)
    assert clone.num_connections == int(CONV_MASK.sum())


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="non-binary `mask`"):
        MaskConstraint([[0, 2]])
    with pytest.raises(ValueError, match="at least one axis"):
        MaskConstraint(1)
    with pytest.raises(TypeError, match="invalid `mask`"):
        MaskConstraint({"a": 1})
    layer = keras.layers.Dense(3, kernel_constraint=MaskConstraint(np.ones((5, 3))))
    model = keras.Sequential([keras.Input((4,)), layer])
    with pytest.raises(ValueError, match=r"\(5, 3\) differs from the weight's \(4, 3\)"):
        apply_mask_constraints(model)
    with pytest.raises(TypeError, match="Keras model or layer"):
        apply_mask_constraints("model")


def test_summary_counts_connections_not_masked_kernels():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            ksm.layers.SparseConv2D(8, 3, density=0.25, seed=0, name="c1"),
            keras.layers.Conv2D(
                4, 1, kernel_constraint=MaskConstraint(np.eye(8, 4).reshape(1, 1, 8, 4)), name="c2"
            ),
            keras.layers.Flatten(),
            ksm.layers.SparseDense(5, density=0.1, implementation="sparse", seed=0, name="d1"),
        ]
    )
    rows = ksm.reporting.summary_rows(model)
    assert [(r["layer"], r["storage"]) for r in rows] == [
        ("c1", "masked"),
        ("c2/kernel", "constraint"),
        ("d1", "sparse"),
    ]
    assert [r["connections"] for r in rows] == [round(0.25 * 144), 4, round(0.1 * 64 * 5)]
    assert [r["dense"] for r in rows] == [144, 32, 320]
    lines = []
    ksm.summary(model, print_fn=lines.append)
    other = 8 + 4 + 5  # the three biases
    used = 36 + 4 + 32 + other
    assert lines[-1].startswith(f"Weights used: 72 connections + {other} other = {used},")
    assert f"({144 + 32 + 320 + other})" in lines[-1]
    flops = ksm.reporting.executed_flops(model)["total"]
    density = 72 / (144 + 32 + 320)
    expected = (
        f"Global density {density:.4g} (72 of 496 kernel entries); {flops:,} FLOPs per example"
    )
    assert lines[-2] == expected
    assert math.isclose(rows[0]["density"], 0.25)
    assert set(rows[0]) == {
        "layer",
        "type",
        "shape",
        "storage",
        "connections",
        "dense",
        "density",
        "pattern",
    }
    assert rows[0]["pattern"] is None
    with pytest.raises(ValueError, match="needs a built model"):
        ksm.summary(keras.Sequential([keras.layers.Dense(2)]))


def test_summary_of_a_subclassed_conv_model_says_its_flops_are_unknown():
    class Net(keras.Model):  # its convolution has no symbolic output shape
        def __init__(self):
            super().__init__()
            self.conv = ksm.layers.SparseConv2D(4, 3, density=0.5, seed=0)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 6, 6, 2), "float32"))
    lines = []
    ksm.summary(net, print_fn=lines.append)
    assert lines[-2] == (
        "Global density 0.5 (36 of 72 kernel entries); "
        "FLOPs per example unknown (a layer without an output shape)"
    )
