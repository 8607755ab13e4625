"""Callbacks count optimizer steps and draw from (seed, step): `steps_per_execution`, resuming."""

import functools

import keras
import numpy as np
import pytest

import keras_sparse_moe as ksm
from keras_sparse_moe import _runtime
from keras_sparse_moe.callbacks import MagnitudePruning, RigL, SETEvolution
from keras_sparse_moe.schedules import PolynomialDecay
from tests.test_case import assert_masked_weights_zero, masked_layers, to_numpy

RNG = np.random.default_rng(3)
X = RNG.random((64, 48), dtype=np.float32)
Y = keras.utils.to_categorical(RNG.integers(0, 5, 64), 5)


def _model(density=0.3, steps_per_execution=1, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((48,)),
            # One sparse layer: what is tested is when and from what the callbacks
            # rewire, which a second layer would only repeat (and compile again).
            ksm.layers.SparseDense(96, density=density, activation="relu", seed=0, name="h1"),
            keras.layers.Dense(5, activation="softmax", name="out"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        "categorical_crossentropy",
        steps_per_execution=steps_per_execution,
        jit_compile=True,
    )
    return model


CALLBACKS = {
    "set_steps": lambda: SETEvolution(zeta=0.3, update_every=4, seed=1),
    "set_epoch": lambda: SETEvolution(zeta=0.3, seed=1),
    "set_probability": lambda: SETEvolution(zeta=0.3, probability=0.3, seed=1),
    "rigl": lambda: RigL(data=(X, Y), update_every=4, drop_fraction=0.3, batch_size=16, seed=1),
    "pruning": lambda: MagnitudePruning(PolynomialDecay(0.0, 0.8, 0, 16, frequency=4)),
}


def _fit(model, *callbacks, epochs=3, **kwargs):
    return model.fit(
        X,
        Y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def _final(model):
    return [(to_numpy(layer.mask), to_numpy(layer.kernel)) for layer in masked_layers(model)]


def _density(name):
    return 1.0 if name == "pruning" else 0.3


@functools.cache
def _uninterrupted(name):
    """Final masks and kernels of the plain seeded run (one step per call), and its rewiring total."""
    model = _model(_density(name))
    history = _fit(model, CALLBACKS[name]())
    return _final(model), sum(history.history[f"{CALLBACKS[name]().name}/rewired"])


def _assert_same(a, b):
    for (mask_a, kernel_a), (mask_b, kernel_b) in zip(a, b):
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_allclose(kernel_a, kernel_b, rtol=1e-5, atol=1e-6)


def test_pruning_schedule_counts_optimizer_steps():
    # 8 steps an epoch x 3 epochs; pruning steps 4, 8, 12, 16 reach density 0.2.
    # Counting callback calls (one per 4 steps) ended at 0.538.
    model = _model(density=1.0, steps_per_execution=4)
    _fit(model, CALLBACKS["pruning"]())
    for layer in masked_layers(model):
        assert layer.actual_density == pytest.approx(0.2, abs=1e-3)
    assert_masked_weights_zero(model)


@pytest.mark.parametrize("name", ["set_steps", "set_epoch", "rigl", "pruning"])
def test_steps_per_execution_decides_as_single_steps(name):
    # The updates fall on optimizer steps that are multiples of 4 and draw from
    # (seed, step): four steps per call must end exactly where single steps do.
    expected, rewired = _uninterrupted(name)
    assert rewired > 0
    model = _model(_density(name), steps_per_execution=4)
    _fit(model, CALLBACKS[name]())
    _assert_same(_final(model), expected)


def test_probability_draws_follow_the_step():
    # With probability p, the steps that evolve are those whose (seed, step) draw is below p.
    callback = CALLBACKS["set_probability"]()
    steps = np.arange(1, 24)
    due = [s for s in steps if _runtime.step_uniform(callback._seed, int(s)) < 0.3]
    assert 0 < len(due) < len(steps)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if logs.get("set/rewired", 0) > 0:
                seen.append(_runtime.optimizer_step(self.model))

    model = _model()
    _fit(model, callback, Spy())
    assert seen == due  # step 24, the last, never evolves


class _Crash(keras.callbacks.Callback):
    """Raises after optimizer step `at`, as a killed process would stop."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if _runtime.optimizer_step(self.model) >= self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("backup_first", [False, True])
@pytest.mark.parametrize("name", ["set_epoch", "set_steps", "set_probability", "rigl", "pruning"])
def test_backup_and_restore_resumes_to_the_uninterrupted_result(name, backup_first, tmp_path):
    # Whatever the order of the callbacks: the backup at the end of epoch 0 holds
    # the network before the evolution due then, and the resumed run replays it.
    density = _density(name)
    expected, _ = _uninterrupted(name)
    backup = str(tmp_path / "backup")

    def callbacks(*extra):
        pair = [CALLBACKS[name](), keras.callbacks.BackupAndRestore(backup)]
        return [*(pair[::-1] if backup_first else pair), *extra]

    model = _model(density)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, *callbacks(_Crash(13)))
    # A new process: a fresh model (other initial weights) and a fresh callback.
    model = _model(density, seed=99)
    _fit(model, *callbacks())
    _assert_same(_final(model), expected)
    assert_masked_weights_zero(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["set_epoch", "rigl"])
def test_model_checkpoint_load_and_continue_is_exact(name, tmp_path):
    expected, _ = _uninterrupted(name)
    path = str(tmp_path / "model.keras")
    model = _model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, CALLBACKS[name](), keras.callbacks.ModelCheckpoint(path), _Crash(10))
    restored = keras.saving.load_model(path)  # saved at the end of epoch 0, before SET's evolution
    _fit(restored, CALLBACKS[name](), initial_epoch=1)
    _assert_same(_final(restored), expected)
