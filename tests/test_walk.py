"""`find_layers`: the one model walk every callback, converter and report uses."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import SparseDense, SparseExpertMixture, SparseKernelLayer


def _nested():
    inner = keras.Sequential([keras.Input((6,)), SparseDense(5, density=0.5, seed=0, name="a")])
    inputs = keras.Input((6,))
    hidden = inner(inputs)
    mixed = SparseExpertMixture(num_experts=2, units=3, expert_units=4, seed=0, name="moe")(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(mixed), name="outer"), inner


def test_finds_nested_models_and_layers_inside_layers():
    model, inner = _nested()
    names = [layer.name for layer in ksm.find_layers(model, SparseKernelLayer)]
    # The nested model's layer, then the mixture's expert bank, each once.
    assert names[0] == "a"
    assert {"expert_hidden", "expert_output"} <= set(names)
    assert len(names) == len(set(names))
    assert ksm.find_layers(model, SparseExpertMixture)[0].name == "moe"
    everything = ksm.find_layers(model)
    assert inner in everything and model not in everything
    assert ksm.find_layers(model, keras.Model, include_self=True)[0] is model


def test_direct_children_only_and_tuple_of_classes():
    model, inner = _nested()
    children = ksm.find_layers(model, recursive=False)
    assert inner in children
    assert not any(layer.name == "a" for layer in children)
    found = ksm.find_layers(model, (keras.layers.Dense, SparseExpertMixture))
    # Depth first: the mixture, the Dense inside its default gate, then the head.
    assert [layer.name for layer in found] == ["moe", "logits", "head"]


def test_walk_agrees_with_the_callbacks_and_summary():
    model, _ = _nested()
    model(np.zeros((1, 6), "float32"))
    sparse = ksm.find_layers(model, SparseKernelLayer)
    rows = ksm.reporting.summary_rows(model)
    assert [row["layer"] for row in rows if "connections" in row][: len(sparse)] == [
        layer.name for layer in sparse
    ]


def test_rejects_what_is_not_a_layer():
    with pytest.raises(TypeError, match="model="):
        ksm.find_layers("model")
