"""SET, RigL and magnitude pruning inside model.fit: invariants, references, errors."""

import collections
import gc
import weakref

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe.callbacks import MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.layers import SparseKernelLayer
from keras_sparse_moe.schedules import ConstantSparsity, PolynomialDecay
from keras_sparse_moe.topologies import BlockPattern
from tests.test_case import JIT_COMPILE, assert_masked_weights_zero, masked_layers, to_numpy

RNG = np.random.default_rng(0)
X = RNG.random((128, 24), dtype=np.float32)
Y = (X[:, :3] @ RNG.standard_normal((3, 2))).astype("float32")


def _model(density=0.25, optimizer=None, jit_compile=True):
    model = keras.Sequential(
        [
            keras.Input((24,)),
            ksm.layers.SparseDense(32, density=density, activation="relu", seed=0, name="h1"),
            ksm.layers.SparseDense(32, density=density, activation="relu", seed=1, name="h2"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.compile(optimizer or keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    return model


def _state(model):
    return {
        layer.name: (to_numpy(layer.kernel).copy(), to_numpy(layer.mask).copy())
        for layer in masked_layers(model)
    }


def _slots(model, layer):
    prefix = layer.kernel.path.replace("/", "_") + "_"
    return [to_numpy(v) for v in model.optimizer.variables if v.name.startswith(prefix)]


# --------------------------------------------------------------------------- #
# SET
# --------------------------------------------------------------------------- #
@pytest.mark.keras_deferred_build
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_set_epoch_schedule_keeps_counts_and_zeros(jit_compile):
    model = _model(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit_compile)
    counts = {layer.name: layer.num_connections for layer in masked_layers(model)}
    callback = SETEvolution(zeta=0.3, seed=0)
    history = model.fit(X, Y, batch_size=32, epochs=3, verbose=0, callbacks=[callback])
    for layer in masked_layers(model):
        assert layer.num_connections == counts[layer.name]
    assert_masked_weights_zero(model)
    rewired = history.history["set/rewired"]
    # Each evolution runs as the next epoch begins: none before the first epoch,
    # none after the last.
    assert rewired[0] == 0 and rewired[1] > 0 and rewired[2] > 0
    assert "set/pruned" not in history.history
    assert history.history["density/h1"][-1] == pytest.approx(0.25, abs=1e-3)


class _Snapshot(keras.callbacks.Callback):
    """Each sparse layer's {position: weight} before the last epoch's callbacks run."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.before = layers, None

    def on_epoch_end(self, epoch, logs=None):
        self.before = {
            layer.name: dict(
                zip(
                    to_numpy(layer.connection_positions()).tolist(),
                    to_numpy(layer.connection_values()).tolist(),
                )
            )
            for layer in self.layers
        }


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_set_last_epoch_prune_removes_zeta_without_regrowth(implementation):
    # Seed 001: the last epoch removes the fraction zeta as every other one, and
    # regrows nothing.
    model = keras.Sequential(
        [
            keras.Input((24,)),
            ksm.layers.SparseDense(
                32, density=0.25, activation="relu", implementation=implementation, name="h1"
            ),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    layer = model.layers[0]
    count = layer.num_connections
    snapshot = _Snapshot([layer])
    callback = SETEvolution(zeta=0.3, last_epoch="prune", seed=0)
    history = model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[snapshot, callback])
    assert history.history["set/rewired"][1] > 0
    before = snapshot.before["h1"]
    values = np.array(list(before.values()))
    k_pos, k_neg = int(0.3 * (values >= 0).sum()), int(0.3 * (values < 0).sum())
    assert history.history["set/pruned"] == [k_pos + k_neg]
    assert layer.num_connections == count - k_pos - k_neg
    # The kept connections are the largest positive and the most negative ones.
    positions = to_numpy(layer.connection_positions()).tolist()
    assert set(positions) <= set(before)
    ranked_pos = sorted((v, p) for p, v in before.items() if v >= 0)[k_pos:]
    ranked_neg = sorted((-v, p) for p, v in before.items() if v < 0)[k_neg:]
    assert set(positions) == {p for _, p in ranked_pos} | {p for _, p in ranked_neg}
    np.testing.assert_array_equal(
        to_numpy(layer.connection_values()), [before[p] for p in positions]
    )
    if implementation == "masked":
        assert_masked_weights_zero(model)
        (momentum,) = _slots(model, layer)
        assert np.all(momentum[to_numpy(layer.mask) == 0] == 0)


def test_set_on_small_half_dense_layers():
    # Few positions, half of them kept: random candidates would mostly repeat,
    # so SET samples a permutation instead and still regrows exactly.
    model = _model(density=0.6)
    counts = {layer.name: layer.num_connections for layer in masked_layers(model)}
    callback = SETEvolution(zeta=0.5, update_every=2, seed=0)
    model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    assert {layer.name: layer.num_connections for layer in masked_layers(model)} == counts
    assert_masked_weights_zero(model)


def test_set_step_against_numpy_reference():
    model = _model(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    callback = SETEvolution(zeta=0.3, seed=0)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    before = _state(model)
    rewired = callback.evolve()
    after = _state(model)
    total = 0
    for layer in masked_layers(model):
        kernel, mask = before[layer.name]
        new_kernel, new_mask = after[layer.name]
        pos = np.flatnonzero((mask.ravel() > 0) & (kernel.ravel() >= 0))
        neg = np.flatnonzero((mask.ravel() > 0) & (kernel.ravel() < 0))
        k_pos, k_neg = int(0.3 * len(pos)), int(0.3 * len(neg))
        dropped = set(pos[np.argsort(kernel.ravel()[pos])][:k_pos]) | set(
            neg[np.argsort(-kernel.ravel()[neg])][:k_neg]
        )
        after_drop = mask.ravel().copy()
        after_drop[list(dropped)] = 0
        grown = np.flatnonzero((new_mask.ravel() > 0) & (after_drop == 0))
        # Kept connections are the old ones minus the dropped; as many are regrown.
        np.testing.assert_array_equal(new_mask.ravel() * after_drop, after_drop)
        assert len(grown) == len(dropped)
        assert new_mask.sum() == mask.sum()
        assert np.all(new_kernel.ravel()[grown] == 0)  # regrown start at zero
        survivors = (mask > 0) & (new_mask > 0)
        survivors.ravel()[list(dropped)] = False
        np.testing.assert_array_equal(new_kernel[survivors], kernel[survivors])
        # Momentum survives where the connection did, and is zero everywhere else.
        (momentum,) = _slots(model, layer)
        assert np.all(momentum.ravel()[list(dropped)] == 0)
        assert np.all(momentum[new_mask == 0] == 0)
        total += len(dropped)
    assert rewired == total


def test_set_resets_adam_moments_at_changed_positions():
    model = _model(optimizer=keras.optimizers.Adam(0.01))
    callback = SETEvolution(zeta=0.5, seed=3)
    model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    for layer in masked_layers(model):
        slots = _slots(model, layer)
        assert len(slots) == 2  # m and v
        mask = to_numpy(layer.mask)
        for slot in slots:
            assert np.all(slot[mask == 0] == 0)


def test_set_step_schedule_probability_and_reuse():
    model = _model()
    callback = SETEvolution(zeta=0.2, update_every=3, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert all(r > 0 for r in history.history["set/rewired"])  # 16 steps: evolutions at 3, 6, ...
    # The same callback on a second fit continues from optimizer.iterations.
    history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert history.history["set/rewired"][0] > 0
    assert_masked_weights_zero(model)

    model = _model()
    never = SETEvolution(probability=1e-9, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[never])
    assert history.history["set/rewired"] == [0, 0]
    always = SETEvolution(probability=0.999999, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[always])
    assert history.history["set/rewired"][0] > 0


def test_set_is_deterministic_by_seed_and_respects_exclude():
    masks = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        model = _model()
        model.fit(
            X,
            Y,
            batch_size=32,
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[SETEvolution(seed=5, exclude=["h2"])],
        )
        masks.append({k: v[1] for k, v in _state(model).items()})
        np.testing.assert_array_equal(masks[-1]["h2"], to_numpy(_model().layers[1].mask))
    np.testing.assert_array_equal(masks[0]["h1"], masks[1]["h1"])


def test_set_regrow_initializer():
    model = _model()
    callback = SETEvolution(zeta=0.3, regrow_initializer="ones", seed=0)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    before = _state(model)
    callback.evolve()
    for layer in masked_layers(model):
        kernel, mask = before[layer.name]
        new = to_numpy(layer.kernel)
        grown = (to_numpy(layer.mask) > 0) & (mask == 0)
        assert grown.any() and np.all(new[grown] == 1)


# --------------------------------------------------------------------------- #
# RigL
# --------------------------------------------------------------------------- #
def test_rigl_grows_where_dense_gradient_is_largest():
    model = _model(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    callback = RigL(data=(X, Y), update_every=1000, drop_fraction=0.3, batch_size=64, seed=0)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    before = _state(model)
    from keras_sparse_moe.callbacks.rigl import dense_kernel_gradients

    layers = masked_layers(model)
    grads = [np.abs(to_numpy(g)) for g in dense_kernel_gradients(model, layers, X[:64], Y[:64])]
    rewired = callback.update(0.3, step=0)  # step 0: the first 64 rows of data
    total = 0
    for layer, grad in zip(layers, grads):
        kernel, mask = before[layer.name]
        new_kernel, new_mask = (to_numpy(layer.kernel), to_numpy(layer.mask))
        count = int(0.3 * mask.sum())
        kept = np.flatnonzero(mask.ravel())
        dropped = kept[np.argsort(np.abs(kernel.ravel()[kept]))][:count]
        after_drop = mask.ravel().copy()
        after_drop[dropped] = 0
        empty = np.flatnonzero(mask.ravel() == 0)  # empty before the drop
        grown = empty[np.argsort(-grad.ravel()[empty], kind="stable")][:count]
        expected = after_drop.copy()
        expected[grown] = 1
        np.testing.assert_array_equal(new_mask.ravel(), expected)
        assert np.all(new_kernel.ravel()[grown] == 0)
        assert new_mask.sum() == mask.sum()
        total += count
    assert rewired == total


@pytest.mark.parametrize("routes", [0.0, 0.3])
def test_rigl_on_sparse_experts_grows_what_exact_rigl_grows_on_masked_experts(routes):
    """The growth probe reaches the expert bank's own contractions: RigL scoring every
    position of sparse-storage experts picks the connections the dense gradient picks."""

    def mixture_model(implementation):
        inputs = keras.Input((24,))
        mixture = ksm.SparseExpertMixture(
            units=2,
            num_experts=3,
            expert_units=8,
            expert_density=0.3,
            route_density=routes,
            seed=0,
            implementation=implementation,
            route_implementation=implementation,  # tiles regrow inside each tile
        )
        return keras.Model(inputs, mixture(inputs))

    masked, stored = mixture_model("masked"), mixture_model("sparse")
    for a, b in zip(
        ksm.find_layers(masked, SparseKernelLayer), ksm.find_layers(stored, SparseKernelLayer)
    ):
        b.assign_connections(*a.connection_indices(), to_numpy(a.connection_values()))
        if a.bias is not None:
            b.bias.assign(to_numpy(a.bias))
    gates = [ksm.find_layers(m, ksm.SparseExpertMixture)[0].gate for m in (masked, stored)]
    gates[1].set_weights(gates[0].get_weights())
    np.testing.assert_allclose(to_numpy(stored(X)), to_numpy(masked(X)), rtol=1e-5, atol=1e-6)
    connections = {}
    for name, model in (("masked", masked), ("sparse", stored)):
        model.compile(keras.optimizers.SGD(0.0), "mse")  # fit leaves the weights as they are
        callback = RigL(data=(X, Y), update_every=1000, batch_size=64, seed=0)
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
        before = {
            layer.name: set(zip(*layer.connection_indices())) for layer in callback.sparse_layers
        }
        assert callback.update(0.3, step=0) > 0
        connections[name] = {}
        for layer in callback.sparse_layers:
            after = set(zip(*layer.connection_indices()))
            assert len(after) == len(before[layer.name]) and after != before[layer.name]
            connections[name][layer.name] = after
    assert connections["sparse"] == connections["masked"]


def test_rigl_growth_is_exact_when_the_sampled_threshold_misses():
    # The growth threshold comes from a strided sample of the gradient; put the
    # largest gradients only where the sample never looks. The first attempt
    # must write nothing, and the exact retry must give the reference.
    x = RNG.random((16, 200), dtype=np.float32)
    model = keras.Sequential([keras.Input((200,)), ksm.layers.SparseDense(300, density=0.05)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    callback = RigL(data=(x, x[:, :1]), update_every=1000, seed=0)
    model.fit(x, np.zeros((16, 300), "float32"), epochs=1, verbose=0, callbacks=[callback])
    layer = model.layers[0]
    kernel, mask = to_numpy(layer.kernel).ravel(), to_numpy(layer.mask).ravel()
    stride = max(1, mask.size // 16384) | 1
    unseen = np.setdiff1d(np.flatnonzero(mask == 0), np.arange(0, mask.size, stride))
    grad = np.zeros(mask.size, "float32")
    grad[unseen[:2000]] = RNG.random(2000).astype("float32") + 1.0
    count = int(0.3 * mask.sum())
    attempts, update = [], callback._update_layer

    def spy(layer, grad, fraction, exact=False, salt=0):  # the retry calls it again
        attempts.append(exact)
        return update(layer, grad, fraction, exact, salt)

    callback._update_layer = spy
    assert callback._update_layer(layer, grad.reshape(200, 300), 0.3) == count
    assert attempts == [False, True]  # the sampled threshold missed, then the exact retry
    kept = np.flatnonzero(mask)
    expected = mask.copy()
    expected[kept[np.argsort(np.abs(kernel[kept]), kind="stable")][:count]] = 0
    expected[unseen[:2000][np.argsort(-grad[unseen[:2000]], kind="stable")][:count]] = 1
    np.testing.assert_array_equal(to_numpy(layer.mask).ravel(), expected)
    assert_masked_weights_zero(model)


def test_rigl_in_fit_with_cosine_decay_and_reuse():
    model = _model()
    counts = [layer.num_connections for layer in masked_layers(model)]
    callback = RigL(data=(X, Y), update_every=2, drop_fraction=0.3, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert history.history["rigl/rewired"][0] > 0
    assert [layer.num_connections for layer in masked_layers(model)] == counts
    assert_masked_weights_zero(model)
    assert callback.fraction(0) == pytest.approx(0.3)
    assert callback.fraction(callback._end_step // 2) == pytest.approx(0.15)
    assert callback.fraction(callback._end_step) == 0
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert_masked_weights_zero(model)


@pytest.mark.parametrize("name", ["set", "set_dense_candidates", "rigl"])
def test_growth_stays_inside_the_allowed_pattern(name):
    # Block-diagonal connectivity (4 clusters); growth must never leave it.
    pattern = ksm.topologies.BlockPattern.within_clusters(4)
    density = 0.6 if name == "set_dense_candidates" else 0.1  # 0.6: candidates = a permutation
    model = keras.Sequential(
        [
            keras.Input((24,)),
            ksm.layers.SparseDense(32, density=density / 4, allowed=pattern, seed=0, name="h"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    layer = model.layers[0]
    count = layer.num_connections
    if name == "rigl":
        callback = RigL(data=(X, Y), update_every=2, drop_fraction=0.5, seed=0)
    else:
        callback = SETEvolution(zeta=0.5, update_every=2, seed=0)
    history = model.fit(X, Y, batch_size=16, epochs=3, verbose=0, callbacks=[callback])
    assert sum(history.history[f"{callback.name}/rewired"]) > 0
    mask = to_numpy(layer.mask)
    assert not np.any((mask > 0) & ~pattern.dense(mask.shape))
    assert layer.num_connections == count
    assert_masked_weights_zero(model)


# --------------------------------------------------------------------------- #
# Magnitude pruning and schedules
# --------------------------------------------------------------------------- #
def test_polynomial_decay_matches_zhu_gupta():
    schedule = PolynomialDecay(0.1, 0.9, begin_step=10, end_step=110, power=3, frequency=10)
    for step in (10, 40, 60, 110, 500):
        progress = min(1.0, (step - 10) / 100)
        sparsity = 0.9 + (0.1 - 0.9) * (1 - progress) ** 3
        assert schedule.density(step) == pytest.approx(1 - sparsity)
    assert schedule.should_prune(20) and not schedule.should_prune(25)
    assert not schedule.should_prune(5) and not schedule.should_prune(120)
    assert PolynomialDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()
    constant = ConstantSparsity(0.75, begin_step=4, frequency=2)
    assert constant(6) == (True, 0.25) and constant(7) == (False, 0.25)


def test_magnitude_pruning_reaches_target_and_keeps_largest():
    model = _model(density=1.0, optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=8, frequency=2)
    callback = MagnitudePruning(schedule)
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    for layer in masked_layers(model):
        assert layer.actual_density == pytest.approx(0.2, abs=0.002)
        kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
        (momentum,) = _slots(model, layer)
        assert np.all(momentum[mask == 0] == 0)
    assert_masked_weights_zero(model)
    assert sum(history.history["pruning/rewired"]) == sum(
        round(0.8 * 24 * 32) if i == 0 else round(0.8 * 32 * 32) for i in range(2)
    )
    # One more pruning step keeps exactly the largest magnitudes.
    layer = masked_layers(model)[0]
    kernel = to_numpy(layer.kernel)
    callback.prune(0.1)
    keep = np.argsort(-np.abs(kernel.ravel()))[: round(0.1 * kernel.size)]
    expected = np.zeros(kernel.size)
    expected[keep] = 1
    np.testing.assert_array_equal(to_numpy(layer.mask).ravel(), expected)


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_global_magnitude_pruning_keeps_the_model_wide_largest(implementation):
    """One threshold over all layers: the layer of smaller weights loses more, the
    model keeps exactly round(density * total weights), and every kept magnitude is
    at least every removed one, across layers."""
    model = keras.Sequential(
        [
            keras.Input((24,)),
            ksm.layers.SparseDense(32, density=1.0, seed=0, implementation=implementation),
            ksm.layers.SparseDense(16, density=1.0, seed=1, implementation=implementation),
            ksm.layers.SparseDense(8, density=1.0, seed=2, implementation=implementation),
            keras.layers.Dense(2),
        ]
    )
    model.compile("sgd", "mse")
    model(X[:1])
    first, second, third = model.layers[:3]
    weights = second.storage_variables[0]  # the kernel, or the connections' values
    weights.assign(to_numpy(weights) * 0.5)
    before = {x.name: np.abs(to_numpy(x.dense_kernel())) for x in (first, second, third)}
    callback = MagnitudePruning(ConstantSparsity(0.5), scope="global", exclude=[third.name])
    callback.set_model(model)
    callback.set_params({"epochs": 1, "steps": 1})
    callback.on_train_begin()
    callback.prune(0.3)
    sizes = {first.name: 24 * 32, second.name: 32 * 16}
    assert first.num_connections + second.num_connections == round(0.3 * sum(sizes.values()))
    assert second.actual_density < 0.3 < first.actual_density  # smaller weights go first
    assert third.num_connections == 16 * 8  # excluded: unchanged, outside the budget
    kept, removed = [], []
    for layer in (first, second):
        mask = np.asarray(layer.dense_mask(), bool).reshape(before[layer.name].shape)
        kept.append(before[layer.name][mask])
        removed.append(before[layer.name][~mask])
        assert np.all(to_numpy(layer.dense_kernel()).reshape(mask.shape)[~mask] == 0)
    assert np.concatenate(kept).min() >= np.concatenate(removed).max()


@pytest.mark.tensorflow_only
def test_magnitude_pruning_accepts_tfmot_schedules():
    tfmot = pytest.importorskip(
        "tensorflow_model_optimization", reason="the [tfmot] extra is not installed"
    )
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    model = _model(density=1.0)
    model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[MagnitudePruning(schedule)])
    for layer in masked_layers(model):
        assert layer.actual_density == pytest.approx(0.5, abs=0.002)


# --------------------------------------------------------------------------- #
# sparsify and plots
# --------------------------------------------------------------------------- #
def test_sparsify_keeps_weights_where_the_mask_does():
    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Dropout(0.1)(hidden))
    dense = keras.Model(inputs, outputs)
    sparse = ksm.sparsify(dense, density=0.5, topology="random_regular", seed=0, exclude=["logits"])
    layer = sparse.get_layer("hidden")
    assert isinstance(layer, ksm.layers.SparseDense)
    assert isinstance(sparse.get_layer("logits"), keras.layers.Dense)
    assert np.all(to_numpy(layer.mask).sum(axis=1) == 8)
    np.testing.assert_array_equal(
        to_numpy(layer.kernel), to_numpy(dense.get_layer("hidden").kernel) * to_numpy(layer.mask)
    )
    x = RNG.random((4, 10), dtype=np.float32)
    full = ksm.sparsify(dense, density=1.0)
    np.testing.assert_allclose(to_numpy(full(x)), to_numpy(dense(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="Keras 3 model"):
        ksm.sparsify("model", density=0.5)
    with pytest.raises(ValueError, match=r"exclude=\['nope'\]"):
        ksm.sparsify(dense, density=0.5, exclude=["nope"])
    pooling = keras.Sequential([keras.Input((10, 1)), keras.layers.MaxPooling1D(2)])
    with pytest.raises(ValueError, match="found no layer to convert"):
        ksm.sparsify(pooling, density=0.5)


def test_input_connectivity_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    layer = ksm.layers.SparseDense(10, density=0.3, seed=0)
    layer.build((None, 36))
    path = tmp_path / "connectivity.png"
    counts = ksm.plots.input_connectivity(layer, (6, 6), path=str(path))
    np.testing.assert_array_equal(counts, to_numpy(layer.mask).sum(axis=1).reshape(6, 6))
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="image_shape"):
        ksm.plots.input_connectivity(layer, (5, 5))
    conv = ksm.layers.SparseConv2D(4, 3, density=0.5)
    conv.build((None, 6, 6, 1))
    with pytest.raises(TypeError, match="Received: SparseConv2D"):
        ksm.plots.input_connectivity(conv, (6, 6))


# --------------------------------------------------------------------------- #
# Configs and errors
# --------------------------------------------------------------------------- #
def test_callback_configs_cover_init():
    import inspect

    for callback in (
        SETEvolution(zeta=0.2, update_every=5, seed=1, exclude=["a"]),
        RigL(data=(X, Y), update_every=10, end_step=100),
        MagnitudePruning(ConstantSparsity(0.5), scope="global", exclude=["h1"]),
        MagnitudePruning(ConstantSparsity(0.5), n_m=(2, 4)),
        ksm.callbacks.ActivationRateLogger(layer="mixture", every=2, batch_size=64, verbose=0),
    ):
        arrays = {"data", "by_class"}  # arrays, not configuration
        params = set(inspect.signature(type(callback).__init__).parameters) - {"self"} - arrays
        config = callback.get_config()
        assert params <= set(config)
        extra = {"data": (X, Y)} if isinstance(callback, RigL) else {}
        clone = type(callback).from_config({**config, **extra})
        assert clone.get_config() == config


def test_callbacks_need_a_sparse_layer():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="found no `SparseDense` layer"):
        model.fit(np.ones((4, 4)), np.ones((4, 1)), verbose=0, callbacks=[SETEvolution()])
    with pytest.raises(ValueError, match=r"unknown: \['hidden'\]"):  # a typo is not ignored
        _model().fit(X, Y, verbose=0, callbacks=[SETEvolution(exclude=["hidden"])])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SETEvolution(zeta=0), ValueError, "zeta=0"),
        (lambda: SETEvolution(zeta=1.0), ValueError, "zeta=1.0"),
        (lambda: SETEvolution(update_every=0), ValueError, "update_every=0"),
        (lambda: SETEvolution(update_every="batch"), ValueError, "update_every='batch'"),
        (lambda: SETEvolution(probability=1.5), ValueError, "probability=1.5"),
        (lambda: SETEvolution(probability=0.1, update_every=5), ValueError, "not both"),
        (lambda: SETEvolution(last_epoch="drop"), ValueError, "last_epoch='drop'"),
        (lambda: SETEvolution(last_epoch="prune", update_every=5), ValueError, "epoch schedule"),
        (lambda: SETEvolution(exclude=[3]), TypeError, "exclude"),
        (lambda: SETEvolution(seed="x"), TypeError, "seed='x'"),
        (lambda: RigL(), TypeError, "data=\\(x, y\\)"),
        (lambda: RigL(data=(X, Y[:3])), ValueError, "mismatched"),
        (lambda: RigL(data=(X, Y), drop_fraction=1.2), ValueError, "drop_fraction=1.2"),
        (lambda: RigL(data=(X, Y), decay="linear"), ValueError, "decay='linear'"),
        (lambda: RigL(data=(X, Y), update_every=-2), ValueError, "update_every=-2"),
        (lambda: MagnitudePruning(0.5), TypeError, "schedule=0.5"),
        (
            lambda: MagnitudePruning(ConstantSparsity(0.5), scope="model"),
            ValueError,
            "scope='model'",
        ),
        (lambda: ConstantSparsity(1.0), ValueError, "target_sparsity=1.0"),
        (lambda: ConstantSparsity(0.5, frequency=0), ValueError, "frequency=0"),
        (lambda: PolynomialDecay(0.0, 1.2, 0, 10), ValueError, "final_sparsity=1.2"),
        (lambda: PolynomialDecay(0.0, 0.5, 10, 5), ValueError, "end_step >= begin_step"),
        (lambda: PolynomialDecay(0.0, 0.5, 0, 10, power=0), ValueError, "power=0"),
    ],
)
def test_invalid_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_invalid_target_density_changes_nothing():
    model = _model()
    callback = MagnitudePruning(ConstantSparsity(0.5))
    model.fit(X, Y, epochs=1, verbose=0, callbacks=[callback])
    before = _state(model)
    with pytest.raises(ValueError, match="density=1.5"):
        callback.prune(1.5)
    for name, (_kernel, mask) in _state(model).items():
        np.testing.assert_array_equal(mask, before[name][1])


def test_set_under_mixed_precision_resets_wrapped_optimizer_state():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model(optimizer=keras.optimizers.Adam(0.01))
    model.fit(X, Y, batch_size=32, epochs=3, verbose=0, callbacks=[SETEvolution(zeta=0.3, seed=0)])
    assert_masked_weights_zero(model)
    for layer in masked_layers(model):
        slots = [
            to_numpy(v)
            for v in model.optimizer.variables
            if v.name.startswith(layer.kernel.path.replace("/", "_") + "_")
        ]
        assert len(slots) >= 2
        mask = to_numpy(layer.mask)
        for slot in slots:
            assert np.all(slot[mask == 0] == 0)


def test_set_notices_a_mask_changed_elsewhere():
    model = _model()
    callback = SETEvolution(zeta=0.3, seed=0)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    callback.evolve()  # caches the connection list
    layer = masked_layers(model)[0]
    new_mask = ksm.topologies.random_regular(24, 32, degree=4, seed=9)
    layer.mask.assign(new_mask)
    layer.apply_mask()
    callback.evolve()
    assert layer.num_connections == int(new_mask.sum())
    assert_masked_weights_zero(model)


@pytest.mark.tensorflow_only
def test_logs_reach_tensorboard(tmp_path):
    import tensorflow as tf

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in [test])")

    model = _model()
    callbacks = [SETEvolution(seed=0), keras.callbacks.TensorBoard(log_dir=str(tmp_path))]
    model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=callbacks)
    tags = set()
    for path in tmp_path.rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_density/h1", "epoch_set/rewired"} <= tags


@pytest.mark.tensorflow_only
def test_many_layers_do_not_warn_of_retracing(caplog):
    # One rewiring function per layer signature, traced once per shape: TensorFlow
    # groups the traces by code object and would warn of "frequent retracing" otherwise.
    layers = [keras.Input((24,))]
    layers += [ksm.layers.SparseDense(8 + i, density=0.5, seed=i) for i in range(6)]
    model = keras.Sequential([*layers, keras.layers.Dense(2)])
    model.compile("adam", "mse")
    callback = RigL(data=(X, Y), update_every=2, seed=0)
    with caplog.at_level("WARNING", logger="tensorflow"):
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def _set_share(layer, zeta):
    """Connections SET replaces: the share `zeta` of the positive and of the negative."""
    values = to_numpy(layer.connection_values())
    return int(zeta * np.sum(values >= 0)) + int(zeta * np.sum(values < 0))


@pytest.mark.parametrize("implementation", ["masked", "sparse"])
def test_layers_of_one_shape_share_one_compiled_step(implementation, monkeypatch):
    # The variables are the compiled step's arguments: the three 16x16 layers
    # share one program (the 24x16 layer has its own), and each is rewired in its
    # own variables.
    from keras_sparse_moe.layers import storage

    monkeypatch.setattr(storage, "_COMPILED_STEPS", collections.OrderedDict())
    layers = [
        ksm.layers.SparseDense(16, density=0.5, seed=i, implementation=implementation)
        for i in range(4)
    ]
    model = keras.Sequential([keras.Input((24,)), *layers, keras.layers.Dense(2)])
    model.compile("adam", "mse")
    callback = SETEvolution(zeta=0.3, seed=0)
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    before = [layer.dense_mask() for layer in layers]
    counts = [layer.num_connections for layer in layers]
    replaced = sum(_set_share(layer, 0.3) for layer in layers)
    assert callback.evolve() == replaced
    assert len(storage._COMPILED_STEPS) == 2
    for layer, mask, count in zip(layers, before, counts):
        assert layer.num_connections == count
        assert (layer.dense_mask() != mask).any(), layer.name
    assert_masked_weights_zero(model)


def test_shared_steps_keep_each_callbacks_values_and_each_layers_pattern():
    # Same shapes, other zeta or other `allowed` pattern: another program. A step
    # shared by shape alone would regrow the first pattern's positions, or replace
    # the first zeta's share.
    within, between = BlockPattern.within_clusters(2), BlockPattern.between_clusters(2)
    for zeta, allowed in [(0.1, within), (0.4, within), (0.4, between)]:
        layer = ksm.layers.SparseDense(16, density=0.2, allowed=allowed, seed=0)
        model = keras.Sequential([keras.Input((16,)), layer, keras.layers.Dense(2)])
        model.compile("adam", "mse")
        callback = SETEvolution(zeta=zeta, seed=0)
        model.fit(X[:, :16], Y, batch_size=64, epochs=1, verbose=0, callbacks=[callback])
        for _ in range(3):
            count, replaced = layer.num_connections, _set_share(layer, zeta)
            assert callback.evolve() == replaced
            assert layer.num_connections == count
            assert not (layer.dense_mask() & ~allowed.dense((16, 16))).any(), (zeta, allowed)


def test_compiled_steps_do_not_keep_layers_alive():
    model = _model()
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[SETEvolution(seed=0)])
    layer = weakref.ref(model.layers[0])
    del model
    gc.collect()
    assert layer() is None
