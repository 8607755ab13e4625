"""SparseDense(implementation="sparse"): same function as the masked storage, O(nnz) state."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_sparse_moe import _runtime, callbacks, schedules, topologies
from keras_sparse_moe.layers import SparseDense, sparse_kernel, storage
from tests.test_case import (
    JIT_COMPILE,
    assert_config_covers_init,
    compiled_call,
    masked_layers,
    rewire_once,
    to_numpy,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 24)).astype("float32")
Y = RNG.standard_normal((64, 3)).astype("float32")


def _model(implementation, seed=0):
    return keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(16, activation="tanh"),
            SparseDense(
                40, density=0.2, activation="relu", seed=seed, implementation=implementation
            ),
            SparseDense(3, density=0.5, seed=seed + 1, implementation=implementation),
        ]
    )


def _copy_weights(source, target):
    """`target` (sparse storage) gets `source`'s (masked) weights and connections."""
    for a, b in zip(source.layers, target.layers):
        if isinstance(a, SparseDense):
            b.assign_connections(*a.connection_indices(), to_numpy(a.connection_values()))
            b.bias.assign(to_numpy(a.bias))
        else:
            b.set_weights(a.get_weights())


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_sparse_and_masked_give_equal_outputs_and_gradients(jit_compile):
    masked, sparse = _model("masked"), _model("sparse", seed=7)  # different draws, then copied
    _copy_weights(masked, sparse)
    np.testing.assert_allclose(to_numpy(sparse(X)), to_numpy(masked(X)), atol=1e-5)
    # One SGD step with rate 1: every weight moves by minus its gradient, the
    # Dense layer's through the sparse layers' input gradients.
    for model in (masked, sparse):
        model.compile(keras.optimizers.SGD(1.0), "mse", jit_compile=jit_compile)
        model.fit(X, Y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(
        to_numpy(sparse.layers[0].kernel), to_numpy(masked.layers[0].kernel), atol=1e-5
    )
    for a, b in zip(masked_layers(masked), masked_layers(sparse)):
        np.testing.assert_allclose(to_numpy(b.dense_kernel()), to_numpy(a.kernel), atol=1e-5)
        np.testing.assert_allclose(to_numpy(b.bias), to_numpy(a.bias), atol=1e-5)
        assert (b.dense_mask() == a.dense_mask()).all()


def test_same_arguments_draw_the_same_connections():
    for kwargs in ({"density": 0.1, "seed": 3}, {"topology": "fibonacci", "density": 0.2}):
        masked = SparseDense(30, **kwargs)
        sparse = SparseDense(30, implementation="sparse", **kwargs)
        masked.build((None, 50))
        sparse.build((None, 50))
        assert (masked.dense_mask() == sparse.dense_mask()).all()
        assert sparse.num_connections == masked.num_connections
        assert [v.name for v in sparse.weights] == ["values", "bias", "positions"]
        assert sparse.values.shape == (sparse.num_connections,)
        # One int32 position per connection: row * n_out + col.
        rows, cols = sparse.connection_indices()
        positions = to_numpy(sparse.positions)
        assert positions.dtype == np.int32
        np.testing.assert_array_equal(positions, rows * 30 + cols)


def test_kernels_too_large_for_int32_positions_keep_rows_and_columns(monkeypatch):
    # (n_in + 1) * n_out must fit in int32 for one packed position (a parked slot's
    # row is n_in); a lower limit stands in for a 50k x 50k kernel.
    small = SparseDense(30, density=0.1, seed=3, implementation="sparse")
    small.build((None, 50))
    monkeypatch.setattr(storage, "INT32_MAX", 51 * 30 - 1)
    pair = SparseDense(30, density=0.1, seed=3, implementation="sparse")
    pair.build((None, 50))
    assert [v.name for v in pair.weights] == ["values", "bias", "rows", "cols"]
    for got, expected in zip(pair.connection_indices(), small.connection_indices()):
        np.testing.assert_array_equal(got, expected)
    pair.values.assign(small.values)
    x = RNG.standard_normal((3, 50)).astype("float32")
    np.testing.assert_allclose(to_numpy(pair(x)), to_numpy(small(x)), atol=1e-6)


def test_density_aware_init_matches_the_masked_variance():
    masked = SparseDense(400, density=0.05, seed=0)
    sparse = SparseDense(400, density=0.05, seed=0, implementation="sparse")
    masked.build((None, 300))
    sparse.build((None, 300))
    expected = np.std(to_numpy(masked.connection_values()))
    # Glorot uniform over (300, 400), scaled by 1/sqrt(0.05): std sqrt(2 / 700 / 0.05).
    assert abs(expected / np.sqrt(2 / 700 / 0.05) - 1) < 0.05
    assert abs(np.std(to_numpy(sparse.values)) / expected - 1) < 0.05


def test_rank_3_inputs_and_mixed_precision():
    layer = SparseDense(6, density=0.5, seed=0, implementation="sparse")
    x = RNG.standard_normal((2, 5, 8)).astype("float32")
    y = to_numpy(layer(x))
    reference = x @ to_numpy(layer.dense_kernel()) + to_numpy(layer.bias)
    np.testing.assert_allclose(y, reference, atol=1e-5)
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model("sparse")
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    model.fit(X, Y, epochs=2, verbose=0)
    layer = model.layers[1]
    assert layer.values.dtype == "float32" and layer.positions.dtype == "int32"
    assert keras.backend.standardize_dtype(model(X).dtype) == "float16"
    assert np.isfinite(to_numpy(layer.values)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": 8, "density": 0.3, "seed": 4},
        {"units": 8, "connections": ([0, 1, 4], [7, 0, 3])},
        {
            "units": 8,
            "density": 0.2,
            "seed": 2,
            "allowed": topologies.BlockPattern.within_clusters(2),
        },
    ],
)
def test_config_round_trip(kwargs):
    layer = SparseDense(implementation="sparse", **kwargs)
    assert_config_covers_init(layer)
    assert "mask" not in layer.get_config() or layer.get_config()["mask"] is None
    clone = SparseDense.from_config(layer.get_config())
    layer.build((None, 5))
    clone.build((None, 5))
    assert (layer.dense_mask() == clone.dense_mask()).all()
    if "connections" in kwargs:
        assert sorted(zip(*layer.connection_indices())) == [(0, 7), (1, 0), (4, 3)]


def test_keras_save_load_after_training_and_rewiring(tmp_path):
    model = _model("sparse")
    model.compile("adam", "mse", jit_compile=True)
    model.fit(X, Y, epochs=2, verbose=0, callbacks=[callbacks.SETEvolution(zeta=0.3, seed=0)])
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X)), to_numpy(model(X)), atol=1e-6)
    for a, b in zip(masked_layers(model), masked_layers(loaded)):
        assert (a.dense_mask() == b.dense_mask()).all()
    loaded.fit(X, Y, epochs=1, verbose=0)


def _unique_positions(layer):
    rows, cols = layer.connection_indices()
    return len(set(zip(rows.tolist(), cols.tolist())))


def _slot_state(model, layer):
    """Per slot: (row, col, value, Adam moments) of a sparse layer."""
    slots = _runtime.optimizer_slots(model.optimizer, layer.values)
    rows, cols = layer.storage.slot_indices()
    return [rows, cols, *(to_numpy(v) for v in (layer.values, *slots))]


@pytest.mark.parametrize("layout", ["positions", "rows_and_cols"])
@pytest.mark.parametrize("name", ["set", "rigl", "rigl_exact", "pruning"])
def test_callbacks_keep_counts_and_reset_state_at_changed_slots(name, layout, monkeypatch):
    if layout == "rows_and_cols":  # as a kernel of 2**31 entries or more keeps them
        monkeypatch.setattr(storage, "INT32_MAX", 0)
    model = _model("sparse")
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    layers = masked_layers(model)
    counts = [layer.num_connections for layer in layers]
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    before = [_slot_state(model, layer) for layer in layers]
    callback = {
        "set": lambda: callbacks.SETEvolution(zeta=0.3, seed=0),
        "rigl": lambda: callbacks.RigL(data=(X, Y), update_every=2, end_step=100, seed=0),
        "rigl_exact": lambda: callbacks.RigL(
            data=(X, Y), update_every=2, end_step=100, growth_candidates=None, seed=0
        ),
        "pruning": lambda: callbacks.MagnitudePruning(
            schedules.ConstantSparsity(0.9, begin_step=0, frequency=1)
        ),
    }[name]()
    assert rewire_once(model, callback, 0.1 if name == "pruning" else 0.3) > 0
    for layer, count, old in zip(layers, counts, before):
        new = _slot_state(model, layer)
        moved = (new[0] != old[0]) | (new[1] != old[1])
        assert moved.any()
        if name == "pruning":
            assert layer.num_connections == round(0.1 * np.prod(layer.kernel_shape))
            assert np.all(new[0][moved] == layer.kernel_shape[0])  # parked
        else:
            assert layer.num_connections == count == _unique_positions(layer)
        # A changed slot starts afresh: zero optimizer moments, zero (or parked) value.
        for state in new[2:]:
            assert np.all(state[moved] == 0)
        # (SET may regrow a slot where it dropped it: same position, reset state.)
        unchanged = ~(moved | (new[2] != old[2]))
        assert np.all(new[2][~unchanged] == 0)
        assert name == "pruning" or unchanged.sum() >= 0.5 * unchanged.size
        np.testing.assert_array_equal(new[2][unchanged], old[2][unchanged])
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)  # trains on
    for layer in layers:
        parked = layer.storage.slot_indices()[0] == layer.kernel_shape[0]
        assert np.all(to_numpy(layer.values)[parked] == 0)


def test_exact_sparse_rigl_grows_what_masked_rigl_grows():
    masked = _model("masked")
    masked.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    masked.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    sparse = _model("sparse", seed=5)
    sparse.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    sparse.optimizer.build(sparse.trainable_variables)
    _copy_weights(masked, sparse)
    grown = []
    for model, candidates in ((masked, 10), (sparse, None)):
        rigl = callbacks.RigL(data=(X, Y), batch_size=64, growth_candidates=candidates, seed=0)
        rigl.set_model(model)
        rigl.set_params({"epochs": 1, "steps": 100})
        rigl.on_train_begin()
        before = [layer.dense_mask() for layer in masked_layers(model)]
        rigl.update(0.3, step=0)
        grown.append([x.dense_mask() & ~b for x, b in zip(masked_layers(model), before)])
    for a, b in zip(*grown):
        assert a.sum() > 0
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, shape, error, match",
    [
        ({"connections": ([0, 1], [0, 9])}, (None, 4), ValueError, r"cols in \[0, 9\]"),
        ({"connections": ([0, -1], [0, 1])}, (None, 4), ValueError, "out-of-range"),
        ({"connections": ([0, 5], [0, 1])}, (None, 4), ValueError, "rows up to 5"),
        ({"connections": ([0, 1, 0], [2, 2, 2])}, (None, 4), ValueError, r"duplicate.*\(0, 2\)"),
        ({"connections": ([0.5], [1])}, (None, 4), TypeError, "integer"),
        ({"connections": np.zeros((3, 3), int)}, (None, 4), ValueError, r"\(nnz, 2\)"),
        ({"connections": ([0], [1]), "density": 0.5}, (None, 4), ValueError, "not both"),
        ({"kernel_constraint": "max_norm"}, (None, 4), ValueError, "NonNeg"),
    ],
)
def test_invalid_arguments(kwargs, shape, error, match):
    with pytest.raises(error, match=match):
        layer = SparseDense(8, implementation="sparse", **kwargs)
        layer.build(shape)


def test_too_large_to_densify(monkeypatch):
    monkeypatch.setattr(sparse_kernel, "DENSE_LIMIT", 1000)
    with pytest.raises(ValueError, match="connections=.*implementation='sparse'"):
        SparseDense(50, mask=np.ones((40, 50)))
    with pytest.raises(ValueError, match="implementation='sparse'"):
        SparseDense(50, density=0.1).build((None, 40))
    with pytest.raises(ValueError, match="'fibonacci' builds a dense mask"):
        SparseDense(50, density=0.1, topology="fibonacci", implementation="sparse").build(
            (None, 40)
        )
    layer = SparseDense(50, density=0.1, implementation="sparse", seed=0)
    layer.build((None, 40))
    assert layer.num_connections == 200
    with pytest.raises(ValueError, match="connection_indices"):
        layer.dense_kernel()


_NO_DENSE_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    import numpy as np, keras
    import keras_sparse_moe as ksm
    n = 200_000  # a dense kernel would take n * n * 4 bytes = 160 GB
    layer = ksm.layers.SparseDense(n, epsilon=2, seed=0, implementation="sparse")
    model = keras.Sequential([keras.Input((n,)), layer, keras.layers.Dense(2)])
    model.compile("adam", "mse", jit_compile=True)
    x = np.zeros((4, n), "float32"); x[:, :50] = 1
    set_cb = ksm.callbacks.SETEvolution(zeta=0.2, update_every=1, seed=0)
    model.fit(x, np.ones((4, 2)), batch_size=4, epochs=1, steps_per_epoch=2, verbose=0,
              callbacks=[set_cb])
    model.save(os.path.join(sys.argv[1], "wide.keras"))
    print(layer.num_connections, set_cb.history if hasattr(set_cb, "history") else "")
    # This process's own peak: VmHWM. ru_maxrss would report the parent's peak too
    # (Linux folds the forking process's peak into it at exec).
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK_KB", peak)
    """
)


@pytest.mark.slow
def test_a_layer_too_large_to_densify_builds_trains_rewires_and_saves(tmp_path):
    # 200k x 200k at epsilon 2: 800k connections. Anything of the kernel's dense
    # shape would need 40 G entries (160 GB); the whole run stays within 5 GB (it
    # peaks at 1.1 GB). The peak is the process's own (VmHWM): its ru_maxrss took in
    # the pytest worker's peak, which Linux folds in at exec (3.6-5.0 GB in the suite).
    script = os.path.join(tmp_path, "wide.py")
    with open(script, "w") as f:
        f.write(_NO_DENSE_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_gb = int(done.stdout.split("PEAK_KB")[1]) / 2**20
    assert peak_gb < 5.0, f"peak resident memory {peak_gb:.2f} GB"
    assert int(done.stdout.split()[0]) == 800_000
    assert os.path.getsize(os.path.join(tmp_path, "wide.keras")) < 50 * 2**20


def test_conversion_keeps_weights_exactly_both_ways():
    import keras_sparse_moe as ksm

    masked = _model("masked")
    masked.compile("adam", "mse")
    masked.fit(X, Y, epochs=1, verbose=0)
    schedule = schedules.ConstantSparsity(0.9, begin_step=0, frequency=1)
    pruning = callbacks.MagnitudePruning(schedule, exclude=[masked.layers[2].name])
    pruning.set_model(masked)
    pruning.set_params({"epochs": 1, "steps": 1})
    pruning.on_train_begin()
    pruning.prune(0.1)  # fewer connections than slots: the rest are parked
    sparse = ksm.convert_implementation(masked, "sparse")
    back = ksm.convert_implementation(sparse, "masked")
    for a, b, c in zip(masked_layers(masked), masked_layers(sparse), masked_layers(back)):
        assert b.implementation == "sparse" and c.implementation == "masked"
        np.testing.assert_array_equal(to_numpy(b.dense_kernel()), to_numpy(a.kernel))
        np.testing.assert_array_equal(to_numpy(c.kernel), to_numpy(a.kernel))
        assert b.num_connections == a.num_connections == c.num_connections
    np.testing.assert_allclose(to_numpy(sparse(X)), to_numpy(masked(X)), atol=1e-5)
    dense = keras.Sequential([keras.Input((24,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    converted = ksm.sparsify(dense, density=0.5, seed=0, implementation="sparse")
    layer = converted.layers[0]
    assert layer.implementation == "sparse"
    kernel = to_numpy(dense.layers[0].kernel)
    np.testing.assert_array_equal(
        to_numpy(layer.dense_kernel()), np.where(layer.dense_mask(), kernel, 0)
    )
    with pytest.raises(ValueError, match="implementation='csr'"):
        ksm.convert_implementation(masked, "csr")


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_mixture_experts_on_sparse_storage_compute_what_masked_ones_do(capacity_factor):
    from keras_sparse_moe.layers import SparseExpertMixture

    kwargs = dict(
        units=6, num_experts=4, expert_units=8, expert_density=0.3, route_density=0.2, seed=0
    )
    kwargs.update(top_k=2, capacity_factor=capacity_factor)
    masked = SparseExpertMixture(**kwargs)
    # Routes on the same storage (their default with sparse experts keeps them by tile).
    sparse = SparseExpertMixture(
        implementation="sparse", route_implementation="sparse", **{**kwargs, "seed": 3}
    )
    x = RNG.standard_normal((16, 10)).astype("float32")
    masked(x)
    sparse(x)
    bank, other = masked.expert_bank, sparse.expert_bank
    for name in ("expert_hidden", "expert_output", "expert_routes"):
        a, b = getattr(bank, name), getattr(other, name)
        assert b.implementation == "sparse"
        b.assign_connections(*a.connection_indices(), to_numpy(a.connection_values()))
        if a.bias is not None:
            b.bias.assign(to_numpy(a.bias))
    for a, b in zip(masked.gate.weights, sparse.gate.weights):
        b.assign(to_numpy(a))
    for training in (False, True):
        np.testing.assert_allclose(
            compiled_call(sparse, x, training=training),
            compiled_call(masked, x, training=training),
            atol=1e-5,
        )
    config = sparse.get_config()
    assert config["implementation"] == "sparse"
    assert SparseExpertMixture.from_config(config).get_config() == config


def test_set_on_sparse_storage_when_the_membership_table_is_at_its_cap(monkeypatch):
    # The table at its cap and half full (as for 3M x 3M layers at full size,
    # where a fixed candidate margin failed): more candidates, none repeated.
    from keras_sparse_moe.ops import rewiring

    monkeypatch.setattr(rewiring, "TABLE_CAP", 1 << 14)
    layer = SparseDense(300, density=0.05, seed=0, implementation="sparse")
    model = keras.Sequential([keras.Input((400,)), layer])
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    count = layer.num_connections
    assert rewiring.membership_table_size(layer.kernel_shape, count) == 1 << 14 < 4 * count
    evolution = callbacks.SETEvolution(zeta=0.3, regrow_initializer="glorot_uniform", seed=0)
    evolution.set_model(model)
    evolution.set_params({"epochs": 2, "steps": 1})
    evolution.on_train_begin()
    before = to_numpy(layer.values).copy()
    assert abs(evolution.evolve() - 0.3 * count) <= 2  # zeta of each sign, floored
    assert layer.num_connections == count == _unique_positions(layer)
    grown = to_numpy(layer.values) != before
    # Regrown weights come from the initializer with the kernel's fans.
    limit = np.sqrt(6 / (400 + 300))
    assert grown.sum() > 0.25 * count and np.all(np.abs(to_numpy(layer.values)[grown]) <= limit)


def test_new_arguments_reject_bad_values():
    from keras_sparse_moe.layers import SparseExpertMixture

    with pytest.raises(ValueError, match="implementation='csr'"):
        SparseExpertMixture(units=4, num_experts=2, implementation="csr")
    with pytest.raises(ValueError, match="implementation"):
        SparseExpertMixture(experts=[keras.layers.Dense(4)], implementation="sparse")
    for bad, error in ((0.5, ValueError), ("all", TypeError), (True, TypeError)):
        with pytest.raises(error, match="growth_candidates"):
            callbacks.RigL(data=(X, Y), growth_candidates=bad)
    rigl = callbacks.RigL(data=(X, Y), growth_candidates=None)
    assert (
        callbacks.RigL.from_config({**rigl.get_config(), "data": (X, Y)}).growth_candidates is None
    )
