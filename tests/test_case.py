"""Checks every public class of the library must pass, reused by the test files."""

from __future__ import annotations

import inspect
import weakref

import keras
import numpy as np
import pytest

# `jit_compile` for tests that fit both ways. Without jit, JAX runs every op one by
# one, the same ops as under jit (seconds a step for a mixture); TensorFlow's run
# covers its graph mode without XLA, the path that differs.
JIT_COMPILE = [
    pytest.param(
        False,
        marks=pytest.mark.skipif(
            keras.backend.backend() == "jax",
            reason="JAX without jit runs the same ops one by one (TensorFlow's run covers "
            "fitting without XLA)",
        ),
    ),
    True,
]


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def jitted_on_jax(fn):
    """`fn` compiled by `jax.jit` on JAX, as it is inside a model (its eager calls
    would compile each op for each new shape on its own); unchanged on TensorFlow,
    whose eager ops are cheap. Pass static arguments bound (`functools.partial`)."""
    if keras.backend.backend() != "jax":
        return fn
    import jax

    return jax.jit(fn)


def compiled_call(layer, inputs, training=False):
    """`layer(inputs, training=training)` as numpy, compiled on JAX (`jax.jit` of
    `stateless_call`, one per layer and `training`, traced once per input shape),
    eager on TensorFlow.

    For tests that only need a layer's or a model's outputs: JAX's eager calls
    compile every op for every new shape on its own, seconds for a mixture.
    """
    if keras.backend.backend() != "jax":
        return keras.tree.map_structure(to_numpy, layer(inputs, training=training))
    import jax

    functions = _JITTED.setdefault(layer, {})
    if training not in functions:
        held = weakref.ref(layer)  # a strong reference here would keep the key alive

        def call(trainable, non_trainable, inputs):
            return held().stateless_call(trainable, non_trainable, inputs, training=training)[0]

        functions[training] = jax.jit(call)
    outputs = functions[training](
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        inputs,
    )
    return keras.tree.map_structure(to_numpy, outputs)


_JITTED = weakref.WeakKeyDictionary()  # layer -> {training: jitted stateless call}


def assert_config_covers_init(instance):
    """Every `__init__` argument of `type(instance)` appears in `get_config()`."""
    cls = type(instance)
    params = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    config = instance.get_config()
    missing = [name for name in params if name not in config]
    assert not missing, f"{cls.__name__}.get_config() lacks {missing}"
    # The config must rebuild an equivalent object.
    clone = cls.from_config(config)
    assert clone.get_config() == config


def masked_layers(model):
    from keras_sparse_moe.layers import SparseKernelLayer

    return [layer for layer in model._flatten_layers() if isinstance(layer, SparseKernelLayer)]


def assert_masked_weights_zero(model):
    layers = masked_layers(model)
    assert layers, "the model has no sparse layer"
    for layer in layers:
        if not layer.storage.stores_dense:  # sparse: parked slots hold zero, no slot twice
            rows, cols = layer.storage.slot_indices()
            parked = rows == layer.kernel_shape[0]
            assert np.all(to_numpy(layer.values)[parked] == 0), f"{layer.name}: parked slots moved"
            kept = set(zip(rows[~parked].tolist(), cols[~parked].tolist()))
            assert len(kept) == int((~parked).sum()), f"{layer.name}: a position held twice"
            continue
        kernel, mask = to_numpy(layer.kernel), to_numpy(layer.mask)
        assert np.all(kernel[mask == 0] == 0), f"{layer.name}: masked weights moved"


def rewire_once(model, callback, fraction):
    """Runs `callback` once on `model` now, outside `fit` (the optimizer built):
    `SETEvolution` evolves, `RigL` drops and grows `fraction`, `MagnitudePruning`
    prunes to density `fraction`. Returns the count it changed."""
    from keras_sparse_moe import callbacks

    callback.set_model(model)
    callback.set_params({"epochs": 2, "steps": 4})
    callback.on_train_begin()
    if isinstance(callback, callbacks.SETEvolution):
        return callback.evolve()
    if isinstance(callback, callbacks.MagnitudePruning):
        return callback.prune(fraction)
    return callback.update(fraction)
