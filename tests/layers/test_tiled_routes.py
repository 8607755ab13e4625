"""Routes kept by tile (`implementation="tiles"`): O(connections) routes between visited experts."""

import os

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe import callbacks, schedules
from keras_sparse_moe.layers import SparseDense, SparseExpertMixture
from keras_sparse_moe.topologies import BlockPattern
from tests.test_case import compiled_call, rewire_once, to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((48, 10)).astype("float32")
Y = RNG.standard_normal((48, 3)).astype("float32")
# 4 experts x 8 hidden units: a (32, 32) route matrix of 12 (8, 8) tiles between experts.
BUILTIN = dict(units=3, num_experts=4, expert_units=8, expert_density=0.5, seed=0)


def _tiles_of_slots(layer):
    """Per slot: the tile its connection lies in (-1: parked), and the slot's own tile."""
    storage = layer.storage
    rows, cols = storage.slot_indices()
    th, tw = storage.tile_shape
    per_row = layer.allowed.blocks.shape[1]
    live = rows < layer.kernel_shape[0]
    blocks = (np.minimum(rows, layer.kernel_shape[0] - 1) // th) * per_row + cols // tw
    tiles = np.where(live, storage.tile_of_block()[blocks], -1)
    return tiles, np.arange(rows.size) // storage.capacity


def test_each_tile_owns_its_slots_and_the_product_is_the_dense_one():
    layer = SparseDense(
        16, density=0.3, implementation="tiles", allowed=BlockPattern.between_clusters(4), seed=1
    )
    x = RNG.standard_normal((5, 16)).astype("float32")
    y = to_numpy(layer(x))
    rows, cols = layer.connection_indices()
    kernel = np.zeros((16, 16), "float32")
    kernel[rows, cols] = to_numpy(layer.connection_values())
    np.testing.assert_allclose(y, x @ kernel + to_numpy(layer.bias), rtol=1e-5, atol=1e-6)
    assert layer.num_connections == round(0.3 * 16 * 16)  # 77 drawn among 192 allowed
    tiles, own = _tiles_of_slots(layer)
    assert np.all((tiles == own) | (tiles == -1))
    # The Erdős–Rényi draw is stratified: every tile gets 77 // 12 or one more.
    counts = np.bincount(tiles[tiles >= 0], minlength=12)
    assert sorted(set(counts.tolist())) == [6, 7] and layer.storage.capacity == 7
    assert np.all(to_numpy(layer.values)[tiles == -1] == 0)
    # Connections given in any order are laid out by tile, up to the capacity.
    layer.assign_connections(np.array([0, 13, 1]), np.array([4, 0, 15]), np.array([1.0, 2, 3]))
    tiles, own = _tiles_of_slots(layer)
    assert np.all((tiles == own) | (tiles == -1)) and (tiles >= 0).sum() == 3
    np.testing.assert_allclose(to_numpy(layer.dense_kernel())[[0, 13, 1], [4, 0, 15]], [1, 2, 3])
    with pytest.raises(ValueError, match="7 connection slots a tile"):  # 8 in tile (0, 1)
        layer.assign_connections(np.arange(8) // 2, 4 + np.arange(8) % 2, np.ones(8))


def test_tiles_need_a_block_pattern_that_divides_the_kernel():
    with pytest.raises(ValueError, match="give `allowed=BlockPattern"):
        SparseDense(8, density=0.3, implementation="tiles")
    layer = SparseDense(
        10, density=0.3, implementation="tiles", allowed=BlockPattern.between_clusters(4)
    )
    with pytest.raises(ValueError, match="divide its \\(10, 10\\) kernel evenly"):
        layer.build((None, 10))


def _mixture(dispatch="auto", **kwargs):
    layer = SparseExpertMixture(
        top_k=3, route_density=0.3, route_implementation="tiles", dispatch=dispatch, **BUILTIN
    )
    model = keras.Sequential([keras.Input((10,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse", **kwargs)
    return model


def test_grouped_tiled_routes_equal_numpy_and_every_expert_weighted():
    grouped, every = _mixture(), _mixture("all")
    every.set_weights(grouped.get_weights())
    mixture = grouped.layers[0]
    bank = mixture.expert_bank
    assert bank.route_form(48, 3) == "connections"
    # numpy: every expert on every token; a route carries a hidden state only
    # from an expert the token visited, and only a visited expert's output counts.
    gates = to_numpy(mixture.gate_values(X))
    top = np.argsort(-gates, axis=1)[:, :3]
    active = np.zeros_like(gates)
    np.put_along_axis(active, top, 1.0, axis=1)
    weights = gates * active / (gates * active).sum(1, keepdims=True)
    w1, b1 = (to_numpy(w) for w in (bank.expert_hidden.kernel, bank.expert_hidden.bias))
    w2, b2 = (to_numpy(w) for w in (bank.expert_output.kernel, bank.expert_output.bias))
    hidden = np.maximum(X @ w1 + b1, 0).reshape(48, 4, 8)
    source = (hidden * active[:, :, None]).reshape(48, 32)
    hidden = hidden + (source @ to_numpy(bank.expert_routes.dense_kernel())).reshape(48, 4, 8)
    outs = np.einsum("neh,heu->neu", hidden, w2.reshape(8, 4, 3)) + b2.reshape(4, 3)
    expected = np.einsum("ne,neu->nu", weights, outs)
    np.testing.assert_allclose(compiled_call(grouped, X), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        compiled_call(grouped, X), compiled_call(every, X), rtol=1e-5, atol=1e-5
    )
    alone = np.concatenate([compiled_call(grouped, X[i : i + 1]) for i in range(0, 48, 7)])
    np.testing.assert_allclose(alone, expected[::7], rtol=1e-4, atol=1e-5)
    # The same gradients: one SGD step leaves the same weights (parked slots get none).
    grouped.train_on_batch(X, Y)
    every.train_on_batch(X, Y)
    for a, b in zip(grouped.trainable_weights, every.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["set", "rigl", "pruning"])
def test_rewiring_keeps_every_tiles_count_and_a_rewired_model_saves(name, tmp_path):
    model = _mixture()
    model.train_on_batch(X, Y)  # builds the optimizer, whose slots a rewiring resets
    routes = model.layers[0].expert_bank.expert_routes
    tiles, _ = _tiles_of_slots(routes)
    counts = np.bincount(tiles[tiles >= 0], minlength=12)
    before = set(zip(*(a.tolist() for a in routes.connection_indices())))
    callback = {
        "set": lambda: callbacks.SETEvolution(zeta=0.5, seed=0),
        "rigl": lambda: callbacks.RigL(
            data=(X, Y), update_every=1, drop_fraction=0.5, end_step=10, seed=0
        ),
        "pruning": lambda: callbacks.MagnitudePruning(
            schedules.ConstantSparsity(0.9, begin_step=0, frequency=1)
        ),
    }[name]()
    assert rewire_once(model, callback, 0.1 if name == "pruning" else 0.5) > 0
    tiles, own = _tiles_of_slots(routes)
    assert np.all((tiles == own) | (tiles == -1))  # every connection in its slot's tile
    after = set(zip(*(a.tolist() for a in routes.connection_indices())))
    assert len(after) == routes.num_connections  # no position twice
    new_counts = np.bincount(tiles[tiles >= 0], minlength=12)
    if name == "pruning":
        assert after < before and routes.num_connections < sum(counts)
    else:
        np.testing.assert_array_equal(new_counts, counts)
        assert len(before - after) > 0.2 * len(before)
    assert np.all(to_numpy(routes.values)[tiles == -1] == 0)
    if name != "set":
        return
    path = os.path.join(tmp_path, "tiles.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        compiled_call(loaded, X), compiled_call(model, X), rtol=1e-5, atol=1e-6
    )


def test_routes_take_tiles_when_large_or_sparse_and_old_configs_keep_their_storage():
    def routes(**kwargs):
        layer = SparseExpertMixture(top_k=2, route_density=0.02, **{**BUILTIN, **kwargs})
        return layer.route_implementation, layer.expert_bank.expert_routes.implementation

    assert routes() == ("masked", "masked")
    assert routes(implementation="sparse") == ("tiles", "tiles")
    # 64 x 256 hidden units: a 16,384^2 route matrix would take 1 GB as a masked kernel.
    assert routes(num_experts=64, expert_units=256) == ("tiles", "tiles")
    assert routes(num_experts=64, expert_units=256, route_implementation="masked")[1] == "masked"
    assert SparseExpertMixture(top_k=2, **BUILTIN).route_implementation == "masked"  # no routes
    layer = SparseExpertMixture(top_k=2, route_density=0.02, implementation="sparse", **BUILTIN)
    config = layer.get_config()
    assert SparseExpertMixture.from_config(config).route_implementation == "tiles"
    del config["route_implementation"]  # saved before routes had a storage of their own
    assert SparseExpertMixture.from_config(config).route_implementation == "sparse"
    with pytest.raises(ValueError, match="route_implementation"):
        SparseExpertMixture(top_k=2, route_implementation="dense", **BUILTIN)
    with pytest.raises(ValueError, match="route_implementation"):
        SparseExpertMixture(experts=[keras.layers.Dense(3)] * 2, route_implementation="tiles")


def test_executed_flops_count_each_pair_by_its_tiles_slots():
    model = _mixture()
    mixture = model.layers[0]
    capacity = mixture.expert_bank.expert_routes.storage.capacity
    flops = ksm.reporting.executed_flops(model)["sparse_expert_mixture"]
    # batch 1: the gate, 3 experts, 3 * 2 ordered pairs reading a tile's slots, the combine.
    gate, experts = 2 * 10 * 4, 3 * 2 * (10 * 8 + 8 * 3)
    assert flops == gate + experts + 3 * 2 * 2 * capacity + 2 * 3 * 3


def test_capacity_dispatch_reads_the_visited_tiles_as_every_connection_does(monkeypatch):
    from keras_sparse_moe.layers.experts import SparseExperts

    def model():
        layer = SparseExpertMixture(
            top_k=3,
            capacity_factor=0.75,  # some assignments dropped: a dropped source sends nothing
            route_density=0.3,
            route_implementation="tiles",
            **BUILTIN,
        )
        m = keras.Sequential([keras.Input((10,)), layer])
        m.compile(keras.optimizers.SGD(0.1), "mse")
        return m

    tiled, every = model(), model()
    every.set_weights(tiled.get_weights())
    with_tiles = compiled_call(tiled, X, training=True)
    tiled.train_on_batch(X, Y)
    assert tiled.layers[0].overflow_fraction > 0
    # The reference: every connection, on the hidden states of the visited slots.
    monkeypatch.setattr(SparseExperts, "_tiled_routes", property(lambda self: False))
    np.testing.assert_allclose(
        with_tiles, compiled_call(every, X, training=True), rtol=1e-5, atol=1e-5
    )
    every.train_on_batch(X, Y)  # the same gradients: the same weights after a step
    for a, b in zip(tiled.trainable_weights, every.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)
