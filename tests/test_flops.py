"""`executed_flops` against hand counts of what the inference code runs."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import NoisyTopKGate, PTSNEGate, SparseDense, SparseExpertMixture
from keras_sparse_moe.ops import dispatch
from tests.test_case import to_numpy

D, E, H, U = 10, 4, 8, 3


def _model(*layers, shape=(D,)):
    model = keras.Sequential([keras.Input(shape), *layers])
    model(np.zeros((1, *shape), "float32"))
    return model


def test_dense_and_sparse_dense_storage():
    sparse = SparseDense(6, density=0.3, implementation="sparse", seed=0, name="sparse")
    model = _model(
        keras.layers.Dense(16, name="dense"),
        SparseDense(12, density=0.1, seed=0, name="masked"),
        sparse,
        keras.layers.Softmax(),
    )
    slots = sparse.storage_variables[0].shape[0]
    assert slots >= sparse.num_connections
    # A masked kernel runs as a dense matmul; sparse storage one multiply-add a slot.
    expected = {"dense": 2 * D * 16, "masked": 2 * 16 * 12, "sparse": 2 * slots}
    assert ksm.reporting.executed_flops(model) == {**expected, "total": sum(expected.values())}


def test_convolution_counts_output_positions():
    model = _model(
        keras.layers.Conv2D(3, 3, name="conv"),
        ksm.layers.SparseConv2D(4, 2, density=0.5, seed=0, name="sparse_conv"),
        shape=(8, 8, 2),
    )
    flops = ksm.reporting.executed_flops(model)
    assert flops["conv"] == 2 * (3 * 3 * 2 * 3) * (6 * 6)
    assert flops["sparse_conv"] == 2 * (2 * 2 * 3 * 4) * (5 * 5)


def _mixture(**kwargs):
    return SparseExpertMixture(
        units=U, num_experts=E, expert_units=H, expert_density=0.5, seed=0, name="moe", **kwargs
    )


@pytest.mark.parametrize("routes", [None, 0.3])
def test_grouped_mixture_at_batch_one_runs_k_experts(routes):
    model = _model(_mixture(top_k=2, route_density=routes))
    gate, experts, combine = 2 * D * E, 2 * 2 * (D * H + H * U), 2 * 2 * U
    pair_routes = 2 * 1 * 2 * H * H if routes else 0  # k (k - 1) ordered pairs, an (h, h) tile each
    assert ksm.reporting.executed_flops(model)["moe"] == gate + experts + pair_routes + combine


@pytest.mark.parametrize("routes", [None, 0.3])
def test_all_experts_path_runs_every_expert_and_the_route_matrix(routes):
    model = _model(_mixture(top_k=2, route_density=routes, dispatch="all"))
    expected = 2 * D * E + 2 * (D * E * H + E * H * U) + 2 * E * U
    if routes:
        expected += 2 * (E * H) ** 2
    assert ksm.reporting.executed_flops(model)["moe"] == expected


def test_grouped_padding_matches_the_layout_the_code_builds():
    mixture = _mixture(top_k=2)
    model = _model(mixture)
    x = np.random.default_rng(0).standard_normal((512, D)).astype("float32")
    _, index = dispatch.top_k_weights(mixture.gate_values(x), 2)
    block = mixture.expert_bank.group_block(512, 2)
    rows = to_numpy(dispatch.group_plan(index, E, block).token_of_row).shape[0]
    expected = 2 * D * E + rows / 512 * 2 * (D * H + H * U) + 2 * 2 * U
    assert ksm.reporting.executed_flops(model, batch_size=512)["moe"] == round(expected)


def test_folded_routes_count_each_row_by_its_block_and_the_fold():
    mixture = _mixture(top_k=2, route_density=0.3)
    model = _model(mixture)
    assert mixture.expert_bank.route_form(512, 2) == "folded"
    x = np.random.default_rng(0).standard_normal((512, D)).astype("float32")
    _, index = dispatch.top_k_weights(mixture.gate_values(x), 2)
    block = mixture.expert_bank.group_block(512, 2)
    rows = to_numpy(dispatch.group_plan(index, E, block).token_of_row).shape[0]
    # Each row: its expert, then its (H, E * U) folded route block; once a call:
    # the fold R[s -> t] @ W_t of the E^2 tiles.
    per_row = 2 * (D * H + H * U) + 2 * H * E * U
    expected = 2 * D * E + rows / 512 * per_row + 2 * E * E * H * H * U / 512 + 2 * 2 * U
    assert ksm.reporting.executed_flops(model, batch_size=512)["moe"] == round(expected)


def test_gates_and_positions():
    noisy = _model(_mixture(gate=NoisyTopKGate(E, top_k=1)))
    assert ksm.reporting.executed_flops(noisy)["moe"] == 2 * D * E + 2 * (D * H + H * U) + 2 * U
    net = keras.Sequential([keras.layers.Dense(5), keras.layers.Dense(2)])
    ptsne = _model(_mixture(gate=PTSNEGate(E, embedding=net, perplexity=2.0, seed=0), top_k=1))
    gate = 2 * (D * 5 + 5 * 2) + 3 * 2 * E
    assert ksm.reporting.executed_flops(ptsne)["moe"] == gate + 2 * (D * H + H * U) + 2 * U
    # Rank-3 inputs: every position is a token.
    tokens = _model(_mixture(top_k=1), shape=(7, D))
    assert (
        ksm.reporting.executed_flops(tokens)["moe"]
        == 7 * ksm.reporting.executed_flops(_model(_mixture(top_k=1)))["moe"]
    )


def test_invalid_arguments():
    model = _model(keras.layers.Dense(2))
    with pytest.raises(TypeError, match="batch_size=1.5"):
        ksm.reporting.executed_flops(model, batch_size=1.5)
    with pytest.raises(ValueError, match="batch_size=0"):
        ksm.reporting.executed_flops(model, batch_size=0)
    with pytest.raises(TypeError, match="ndarray"):
        ksm.reporting.executed_flops(np.zeros(3))
    with pytest.raises(ValueError, match="not built"):
        ksm.reporting.executed_flops(keras.Sequential([keras.layers.Dense(2)]))


def test_weights_used_counts_connections_and_other_weights():
    sparse = SparseDense(12, density=0.25, seed=0)
    model = _model(sparse, keras.layers.Dense(2))
    assert ksm.reporting.weights_used(model) == sparse.num_connections + 12 + 12 * 2 + 2
