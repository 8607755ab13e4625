"""tfmot interop: pruned tf_keras models become Keras 3 models with SparseDense layers."""

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow_only

tfmot = pytest.importorskip(
    "tensorflow_model_optimization", reason="the [tfmot] extra is not installed"
)
tf_keras = pytest.importorskip("tf_keras", reason="the [tfmot] extra is not installed")

from keras_sparse_moe.interop.tfmot import from_tfmot  # noqa: E402
from keras_sparse_moe.layers import SparseDense  # noqa: E402
from tests.test_case import to_numpy  # noqa: E402


def _pruned_model(functional):
    if functional:
        inputs = tf_keras.Input((12,))
        hidden = tf_keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
        outputs = tf_keras.layers.Dense(3, name="logits")(tf_keras.layers.Dropout(0.2)(hidden))
        model = tf_keras.Model(inputs, outputs)
    else:
        model = tf_keras.Sequential(
            [
                tf_keras.layers.Input((12,)),
                tf_keras.layers.Dense(16, activation="relu", name="hidden"),
                tf_keras.layers.Dense(3, name="logits"),
            ]
        )
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.75, begin_step=0, frequency=1)
    pruned = tf_keras.models.clone_model(
        model,
        clone_function=lambda layer: (
            tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
            if layer.name == "hidden"
            else layer.__class__.from_config(layer.get_config())
        ),
    )
    pruned.compile("adam", "mse")
    rng = np.random.default_rng(0)
    pruned.fit(
        rng.random((64, 12)),
        rng.random((64, 3)),
        epochs=2,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return pruned


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("strip", [False, True])
def test_from_tfmot_keeps_zero_pattern_and_outputs(functional, strip):
    pruned = _pruned_model(functional)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    model = from_tfmot(stripped if strip else pruned)
    hidden = model.get_layer("hidden")
    assert isinstance(hidden, SparseDense)
    assert not isinstance(model.get_layer("logits"), SparseDense)  # not pruned: stays Dense
    source_kernel = stripped.get_layer("hidden").get_weights()[0]
    np.testing.assert_array_equal(to_numpy(hidden.mask), (source_kernel != 0).astype("float32"))
    assert hidden.actual_density == pytest.approx(0.25, abs=0.01)
    x = np.random.default_rng(1).random((5, 12)).astype("float32")
    np.testing.assert_allclose(to_numpy(model(x)), stripped(x).numpy(), rtol=1e-5, atol=1e-6)


def test_from_tfmot_rejects_keras3_models():
    import keras

    with pytest.raises(TypeError, match="tf_keras"):
        from_tfmot(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
