"""N:M structured sparsity: the topology, the layers' `n_m`, and SET, RigL and
magnitude pruning keeping every group at exactly n (checked after every step,
against numpy references, for both storages and the convolutions)."""

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe import _runtime
from keras_sparse_moe.callbacks import MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.ops import groups
from keras_sparse_moe.schedules import ConstantSparsity, PolynomialDecay
from tests.test_case import assert_masked_weights_zero, to_numpy

RNG = np.random.default_rng(0)
X = RNG.standard_normal((96, 32)).astype("float32")
Y = (X[:, :4] @ RNG.standard_normal((4, 2))).astype("float32")


def group_counts(layer, m):
    """Connections per (group of m inputs, output) of `layer`'s kernel matrix."""
    mask = layer.dense_mask().reshape(-1, layer.weight_shape[-1])
    return mask.reshape(mask.shape[0] // m, m, -1).sum(axis=1)


def _model(implementation="masked", **layer_kwargs):
    layer_kwargs = {"n_m": (2, 4), **layer_kwargs}
    model = keras.Sequential(
        [
            keras.Input((32,)),
            ksm.layers.SparseDense(
                24,
                activation="relu",
                implementation=implementation,
                seed=0,
                name="h1",
                **layer_kwargs,
            ),
            ksm.layers.SparseDense(2, density=0.5, seed=1, name="out"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _begin(callback, model):
    """Starts `callback` on `model` outside `fit` (to drive its steps by hand)."""
    callback.set_model(model)
    callback.set_params({"epochs": 1, "steps": 6})
    callback.on_train_begin()


class GroupCheck(keras.callbacks.Callback):
    """After every step (after the rewiring callbacks listed before it): every
    group of the N:M layers holds exactly n connections."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.steps, self.connections = layers, 0, []

    def on_train_batch_end(self, batch, logs=None):
        _runtime.sync_model_state(self.model)  # JAX keeps the state outside the variables
        for layer in self.layers:
            n, m = layer.n_m
            counts = group_counts(layer, m)
            assert (counts == n).all(), (layer.name, self.steps, np.unique(counts))
        self.steps += 1
        self.connections.append([set(zip(*x.connection_indices())) for x in self.layers])


# --------------------------------------------------------------------------- #
# Topology and layers
# --------------------------------------------------------------------------- #
def test_n_m_topology_keeps_n_of_every_m_and_is_seeded():
    mask = ksm.topologies.n_m(12, 7, n=3, m=4, seed=5)
    assert mask.shape == (12, 7) and set(np.unique(mask)) == {0.0, 1.0}
    assert (mask.reshape(3, 4, 7).sum(axis=1) == 3).all()
    np.testing.assert_array_equal(mask, ksm.topologies.n_m(12, 7, n=3, m=4, seed=5))
    assert not np.array_equal(mask, ksm.topologies.n_m(12, 7, n=3, m=4, seed=6))
    # Every position of a group is equally likely.
    draws = np.mean([ksm.topologies.n_m(4, 1, 1, 4, seed=s)[:, 0] for s in range(400)], 0)
    np.testing.assert_allclose(draws, 0.25, atol=0.08)
    with pytest.raises(ValueError, match="multiple of m=4"):
        ksm.topologies.n_m(10, 3, n=2, m=4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        ksm.topologies.n_m(8, 3, n=0, m=4)


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_n_m_layers_draw_the_pattern_and_round_trip(implementation, tmp_path):
    inputs = keras.Input((6, 6, 8))
    conv = ksm.layers.SparseConv2D(
        5, 3, n_m=(1, 4), implementation=implementation, seed=0, name="conv"
    )
    hidden = keras.layers.Flatten()(conv(inputs))
    dense = ksm.layers.SparseDense(4, topology="n_m", topology_kwargs={"n": 2, "m": 8}, seed=1)
    model = keras.Model(inputs, dense(hidden))
    assert conv.n_m == (1, 4) and dense.n_m == (2, 8)
    # The conv's groups are 4 consecutive input channels of one tap.
    counts = conv.dense_mask().reshape(3, 3, 2, 4, 5).sum(axis=3)
    assert (counts == 1).all() and conv.actual_density == 0.25
    assert (group_counts(dense, 8) == 2).all()
    path = tmp_path / "n_m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for before, after in zip(model.layers[1:], loaded.layers[1:]):
        if isinstance(before, ksm.layers.SparseKernelLayer):
            assert after.n_m == before.n_m
            np.testing.assert_array_equal(after.dense_mask(), before.dense_mask())
    x = RNG.standard_normal((2, 6, 6, 8)).astype("float32")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_m": (4, 4)}, ValueError, "1 <= n < m"),
        ({"n_m": "2:4"}, TypeError, "pair of ints"),
        ({"n_m": (2, 4), "density": 0.3}, ValueError, "density=1.0"),
        ({"n_m": (2, 4), "epsilon": 10}, ValueError, "epsilon"),
        ({"n_m": (2, 4), "topology": "fibonacci"}, ValueError, "leave `topology`"),
        ({"topology": "n_m"}, ValueError, "exactly `n` and `m`"),
        (
            {"n_m": (1, 4), "topology": "n_m", "topology_kwargs": {"n": 2, "m": 4}},
            ValueError,
            "differs",
        ),
    ],
)
def test_n_m_layer_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        ksm.layers.SparseDense(4, **kwargs)


def test_n_m_layer_needs_a_multiple_of_m_inputs():
    with pytest.raises(ValueError, match="multiple of m=4.*input size 6"):
        ksm.layers.SparseDense(3, n_m=(2, 4))(np.ones((1, 6), "float32"))


def test_group_rank_matches_numpy():
    shape, m = (12, 5), 4
    scores = RNG.integers(0, 3, 60).astype("float32")  # many ties: broken by position
    eligible = RNG.random(60) < 0.7
    rank = to_numpy(groups.group_rank(scores, eligible, shape, m))
    expected = np.full((3, 4, 5), m)
    s, e = scores.reshape(3, 4, 5), eligible.reshape(3, 4, 5)
    for g in range(3):
        for c in range(5):
            members = [i for i in range(4) if e[g, i, c]]
            order = sorted(members, key=lambda i: (-s[g, i, c], i))
            for r, i in enumerate(order):
                expected[g, i, c] = r
    np.testing.assert_array_equal(rank, expected.ravel())


# --------------------------------------------------------------------------- #
# SET and RigL keep every group at n
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_set_rewires_inside_groups_after_every_step(implementation):
    model = _model(implementation)
    layer = model.layers[0]
    check = GroupCheck([layer])
    start = set(zip(*layer.connection_indices()))
    callback = SETEvolution(zeta=0.3, update_every=1, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[callback, check])
    assert check.steps == 12 and sum(history.history["set/rewired"]) > 0
    assert check.connections[-1][0] != start  # it did rewire, and every group kept 2
    assert layer.num_connections == 32 * 24 // 2
    assert_masked_weights_zero(model)


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_rigl_rewires_inside_groups_after_every_step(implementation):
    model = _model(implementation)
    layer = model.layers[0]
    check = GroupCheck([layer])
    callback = RigL(data=(X, Y), update_every=1, drop_fraction=0.4, end_step=100, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[callback, check])
    assert check.steps == 12 and sum(history.history["rigl/rewired"]) > 0
    assert_masked_weights_zero(model)


def test_set_on_an_n_m_conv_keeps_its_groups():
    model = keras.Sequential(
        [
            keras.Input((8, 8)),
            ksm.layers.SparseConv1D(6, 3, n_m=(2, 4), seed=0, name="conv"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", "mse")
    check = GroupCheck([model.layers[0]])
    x = RNG.standard_normal((32, 8, 8)).astype("float32")
    callback = SETEvolution(zeta=0.5, update_every=1, seed=1)
    model.fit(x, x[:, 0, :2], batch_size=8, verbose=0, callbacks=[callback, check])
    assert check.steps == 4 and check.connections[0] != check.connections[-1]


def _rigl_reference(kernel, mask, gradient, count, m):
    """Group RigL in numpy: drop the `count` smallest magnitudes (ties: earlier
    position), keeping in each group at most as many drops as it has empty
    positions (its smallest), then grow each group's largest-gradient empty
    positions, as many as it dropped."""
    flat_k, flat_m, flat_g = kernel.ravel(), mask.ravel() > 0, np.abs(gradient.ravel())
    n_out = kernel.shape[-1]
    connected = np.flatnonzero(flat_m)
    order = sorted(connected, key=lambda p: (abs(flat_k[p]), p))[:count]
    group = lambda p: (p // n_out // m, p % n_out)  # noqa: E731
    empty_in = {}
    for p in np.flatnonzero(~flat_m):
        empty_in.setdefault(group(p), []).append(p)
    drops = {}
    for p in sorted(order, key=lambda p: (abs(flat_k[p]), p)):
        g = group(p)
        if len(drops.get(g, [])) < len(empty_in.get(g, [])):
            drops.setdefault(g, []).append(p)
    new = flat_m.copy()
    for g, dropped in drops.items():
        grown = sorted(empty_in[g], key=lambda p: (-flat_g[p], p))[: len(dropped)]
        new[dropped] = False
        new[grown] = True
    return new.reshape(mask.shape)


def test_rigl_n_m_step_matches_the_numpy_reference():
    model = _model(n_m=(1, 4))  # 3 empty positions a group: drops are never capped
    layer = model.layers[0]
    callback = RigL(data=(X, Y), update_every=1, drop_fraction=0.5, decay="constant", seed=0)
    _begin(callback, model)
    kernel = RNG.standard_normal(layer.weight_shape).astype("float32")
    layer.assign_dense_kernel(kernel)
    kernel, mask = to_numpy(layer.kernel), layer.dense_mask()
    gradient = RNG.standard_normal(layer.weight_shape).astype("float32")
    count = int(0.5 * layer.num_connections)
    replaced = callback.update(0.5, gradients=[gradient, np.zeros((24, 2), "float32")])
    # The output layer (density 0.5, not N:M) is rewired too; h1 follows the reference.
    np.testing.assert_array_equal(
        layer.dense_mask(), _rigl_reference(kernel, mask, gradient, count, 4)
    )
    assert replaced >= count


def test_rigl_n_m_caps_drops_at_the_empty_positions_of_a_group():
    model = _model(n_m=(3, 4))  # one empty position a group: at most one drop each
    layer = model.layers[0]
    callback = RigL(data=(X, Y), update_every=1, drop_fraction=0.9, decay="constant", seed=0)
    _begin(callback, model)
    kernel, mask = to_numpy(layer.kernel), layer.dense_mask()
    gradient = RNG.standard_normal(layer.weight_shape).astype("float32")
    # RigL grows at most the empty positions before the drop (a quarter of the kernel).
    count = min(int(0.9 * layer.num_connections), 32 * 24 // 4)
    callback.update(0.9, gradients=[gradient, np.zeros((24, 2), "float32")])
    expected = _rigl_reference(kernel, mask, gradient, count, 4)
    np.testing.assert_array_equal(layer.dense_mask(), expected)
    assert (group_counts(layer, 4) == 3).all()


# --------------------------------------------------------------------------- #
# Magnitude pruning to N:M
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_pruning_to_n_m_keeps_the_largest_of_every_group(implementation):
    model = _model(implementation, n_m=None, density=1.0)
    layer = model.layers[0]
    callback = MagnitudePruning(ConstantSparsity(0.5, frequency=1), n_m=(2, 4), exclude="out")
    _begin(callback, model)
    assert layer.n_m == (2, 4)
    kernel = RNG.standard_normal((32, 24)).astype("float32")
    kernel[4:8, 3] = 0.5  # a tie: the earlier positions stay
    layer.assign_dense_kernel(kernel)
    assert callback.prune(0.75) == 32 * 24 // 4  # gradual: 3 of 4 first
    assert (group_counts(layer, 4) == 3).all()
    callback.prune(0.5)
    grouped = np.abs(kernel).reshape(8, 4, 24)
    ranks = np.argsort(np.argsort(-grouped, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(layer.dense_mask(), (ranks < 2).reshape(32, 24))
    assert callback.prune(0.5) == 0  # already 2:4
    assert_masked_weights_zero(model)
    assert layer.get_config()["n_m"] == [2, 4]


def test_pruning_to_n_m_inside_fit_then_set_keeps_it():
    model = _model(n_m=None, density=1.0)
    layer = model.layers[0]
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    pruning = MagnitudePruning(schedule, n_m=(2, 4), exclude="out")
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[pruning])
    assert (group_counts(layer, 4) == 2).all()
    check = GroupCheck([layer])
    model.fit(X, Y, batch_size=16, verbose=0, callbacks=[SETEvolution(update_every=1), check])
    assert check.steps == 6


def test_n_m_errors_of_the_callbacks():
    with pytest.raises(ValueError, match="not to one global threshold"):
        MagnitudePruning(ConstantSparsity(0.5), scope="global", n_m=(2, 4))
    model = _model(n_m=(2, 4))
    pruning = MagnitudePruning(ConstantSparsity(0.5), n_m=(1, 4), exclude="out")
    with pytest.raises(ValueError, match="built with n_m=\\(2, 4\\)"):
        _begin(pruning, model)
    pruning = MagnitudePruning(ConstantSparsity(0.8), exclude="out")
    _begin(pruning, model)
    with pytest.raises(ValueError, match="below the N:M pattern 2:4"):
        pruning.prune(0.2)
    pruning = MagnitudePruning(ConstantSparsity(0.5), n_m=(2, 4))  # "out" has 24 inputs: fine
    small = keras.Sequential([keras.Input((6,)), ksm.layers.SparseDense(2)])
    small.compile("sgd", "mse")
    with pytest.raises(ValueError, match="multiples of m=4"):
        _begin(pruning, small)
    with pytest.raises(ValueError, match="break the N:M pattern"):
        model.fit(X, Y, verbose=0, callbacks=[SETEvolution(last_epoch="prune")])


def test_summary_shows_the_n_m_pattern():
    model = _model(n_m=None, density=1.0)
    lines = []
    ksm.summary(model, print_fn=lines.append)
    assert "N:M" not in lines[1]  # no column without a pattern
    pruning = MagnitudePruning(ConstantSparsity(0.5), n_m=(2, 4), exclude="out")
    _begin(pruning, model)
    lines = []
    ksm.summary(model, print_fn=lines.append)
    assert lines[1].split()[-1] == "N:M" and lines[2].endswith("to 2:4") and lines[3].endswith("-")
    pruning.prune(0.5)
    lines = []
    ksm.summary(model, print_fn=lines.append)
    assert lines[2].split()[-1] == "2:4" and "0.5" in lines[2].split()
