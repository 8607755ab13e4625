"""Activation-rate tables, their logger and plot: references and errors."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import OracleGate, SparseExpertMixture
from tests.test_case import to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 6)).astype("float32")


def _mixture(**kwargs):
    return SparseExpertMixture(units=2, num_experts=3, expert_units=4, seed=0, **kwargs)


def test_rates_are_mean_gate_values_per_dataset_and_class():
    mixture = _mixture(top_k=2)
    labels = RNG.integers(0, 2, 25)
    table = ksm.routing.activation_rates(
        mixture, {"a": X[:25], "b": X[25:]}, by_class={"a": labels}, batch_size=7, verbose=False
    )
    gates = to_numpy(mixture.gate_values(X))
    expected = [
        gates[:25][labels == 0].mean(0),
        gates[:25][labels == 1].mean(0),
        gates[25:].mean(0),
    ]
    np.testing.assert_allclose(table.values, expected, rtol=1e-5)
    assert table.rows == ["a/0", "a/1", "b"]
    assert np.all(np.count_nonzero(gates, axis=1) == 2)  # top-k weights, renormalised
    assert "expert 2" in str(table) and table.to_markdown().count("\n") == 4
    assert table.as_dict()["b"] == pytest.approx(list(expected[2]))


def test_rates_of_a_mixture_with_gate_inputs_and_of_a_gate():
    mixture = _mixture(gate=OracleGate(3))
    index = np.array([0, 2, 2, 1], dtype="int32")
    table = ksm.routing.activation_rates(mixture, {"x": (X[:4], index)}, verbose=False)
    np.testing.assert_allclose(table.values, [[0.25, 0.25, 0.5]])
    table = ksm.routing.activation_rates(OracleGate(3), {"x": index}, verbose=False)
    np.testing.assert_allclose(table.values, [[0.25, 0.25, 0.5]])


def test_activation_table_plot(tmp_path):
    table = ksm.routing.activation_rates(
        OracleGate(2), {"a": np.zeros(3, "int32"), "b": np.ones(2, "int32")}, verbose=False
    )
    path = tmp_path / "table.png"
    ax = ksm.plots.activation_table(table, path=str(path))
    assert path.stat().st_size > 0 and len(ax.texts) == 4


def test_errors():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, _mixture()(inputs) + _mixture()(inputs))
    with pytest.raises(ValueError, match="exactly one"):
        ksm.routing.activation_rates(model, {"x": X}, verbose=False)
    with pytest.raises(TypeError, match="dict"):
        ksm.routing.activation_rates(model, X, verbose=False)
    with pytest.raises(TypeError, match="model_or_gate"):
        ksm.routing.activation_rates("model", {"x": X}, verbose=False)
    with pytest.raises(ValueError, match="3 labels"):
        ksm.routing.activation_rates(_mixture(), {"x": X}, by_class={"x": [0, 1, 2]}, verbose=False)
    with pytest.raises(ValueError, match=r"Received: \['y'\]"):
        ksm.routing.activation_rates(_mixture(), {"x": X}, by_class={"y": [0]}, verbose=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        ksm.routing.activation_rates(_mixture(), {"x": X}, batch_size=0, verbose=False)
    with pytest.raises(ValueError, match="every=0"):
        ksm.callbacks.ActivationRateLogger(every=0)
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    plain.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no `SparseExpertMixture`"):
        plain.fit(X, X[:, :1], verbose=0, callbacks=[ksm.callbacks.ActivationRateLogger()])


@pytest.mark.tensorflow_only
def test_logger_reaches_tensorboard(tmp_path):
    import tensorflow as tf

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in [test])")
    mixture = _mixture(top_k=1, capacity_factor=1.0, balance_losses="entropy")
    model = keras.Sequential([keras.Input((6,)), mixture])
    model.compile("adam", "mse")
    callbacks = [
        ksm.callbacks.ActivationRateLogger({"x": X}, verbose=0),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path)),
    ]
    model.fit(X, X[:, :2], epochs=2, verbose=0, callbacks=callbacks)
    tags = set()
    for path in tmp_path.rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    name = mixture.name
    expected = {f"epoch_{name}/batch_entropy", f"epoch_{name}/overflow", "epoch_rate/x/0"}
    assert expected <= tags


def test_accuracy_curves_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    histories = {"a": {"val_accuracy": [0.5, 0.6, 0.7]}, "b": {"val_accuracy": [0.4, 0.8]}}
    path = tmp_path / "curves.png"
    ax = ksm.plots.accuracy_curves(histories, path=str(path))
    assert path.stat().st_size > 0
    assert [list(line.get_ydata()) for line in ax.lines] == [[0.5, 0.6, 0.7], [0.4, 0.8]]


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        table = ksm.routing.activation_rates(
            OracleGate(2), {"a": np.zeros(3, "int32")}, verbose=False
        )
        ksm.plots.activation_table(table, path=str(tmp_path / "t.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_metrics_is_a_deprecated_alias_of_routing():
    import importlib
    import sys

    sys.modules.pop("keras_sparse_moe.metrics", None)
    with pytest.warns(DeprecationWarning, match="keras_sparse_moe.routing"):
        old = importlib.import_module("keras_sparse_moe.metrics")
    assert old.activation_rates is ksm.routing.activation_rates
