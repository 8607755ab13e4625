"""Backend plumbing in one place: compiling rewiring steps, stateless random numbers, the
optimizer's step, JAX state sync, optimizer slots, seeds. Everything else (layers,
rewiring ops, callbacks) is written in `keras.ops`.

Callbacks decide from `optimizer.iterations` and draw their randomness from
`(seed, step)`, so a resumed or restored run (`BackupAndRestore`,
`ModelCheckpoint` + `load_model`) decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

INT32_MAX = 2**31 - 1


def sync_model_state(model):
    """On JAX, `fit` keeps variables in its own state between steps: write them back
    into the model, so callbacks read current values and the next step reads theirs."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def optimizer_step(model) -> int:
    """Optimizer steps taken so far (`optimizer.iterations`), read without a full sync.

    Counts optimizer steps, not callback calls: with `steps_per_execution=4`
    Keras calls `on_train_batch_end` once per 4 steps.
    """
    optimizer = model.optimizer
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        values = state.get("optimizer_variables")
        if values:
            for variable, value in zip(optimizer.variables, values):
                if variable is optimizer.iterations:
                    return int(np.asarray(value))
    return int(ops.convert_to_numpy(optimizer.iterations))


def new_seed(seed) -> int:
    """`seed` itself, or a fresh random int for `None` (fixed for the object's life)."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().entropy % INT32_MAX)


def step_seed(seed: int, step: int, stream: int = 0) -> np.ndarray:
    """An int32 `(2,)` seed for stateless ops, a function of `(seed, step, stream)` only."""
    mixed = np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint32)
    return (mixed % INT32_MAX).astype("int32")


def step_uniform(seed: int, step: int, stream: int = 0) -> float:
    """A uniform float in [0, 1), a function of `(seed, step, stream)` only."""
    return float(np.random.default_rng([seed, stream, step]).random())


def optimizer_slots(optimizer, variable):
    """The optimizer's variables shaped like `variable` that belong to it (momenta, moments).

    Wrapped optimizers (loss scaling) list their inner optimizer's variables.
    """
    prefix = variable.path.replace("/", "_") + "_"
    variables = list(optimizer.variables)
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        variables += list(inner.variables)
    unique = {id(v): v for v in variables}.values()
    return [
        v for v in unique if v.name.startswith(prefix) and tuple(v.shape) == tuple(variable.shape)
    ]


# --------------------------------------------------------------------------- #
# Compiling rewiring steps and drawing their random numbers, per backend.
# --------------------------------------------------------------------------- #
def quiet_tracing(function):
    """Turns off TensorFlow's "frequent retracing" warning for `function`.

    The callbacks compile one function per layer and size, each traced once;
    TensorFlow counts the traces of all functions sharing one code object
    together and would warn of retracing after a few layers.
    """
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


def compile_function(fn):
    """Compiles a pure tensor function with the backend's XLA compiler."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return quiet_tracing(tf.function(fn, jit_compile=True, reduce_retracing=True))
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def compile_update(fn, variables):
    """Compiles `fn(state, *args) -> (new_state, aux)` to update `variables` in place.

    `state` is the list of the Keras `variables`' values, flattened;
    `new_state` (same shapes, flat) is written back to them without a full
    copy: inside the compiled function on TensorFlow (XLA aliases the
    resource update; the variables are captured, not passed, which makes each
    call cheaper), through buffer donation on JAX. Returns `run(*args) -> aux`.
    """
    variables = list(variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        resources = [v.value for v in variables]

        @tf.function(jit_compile=True, reduce_retracing=True)
        def tf_run(*args):
            flat = [tf.reshape(v, (-1,)) for v in resources]
            new_state, aux = fn(flat, *args)
            for variable, value in zip(resources, new_state):
                variable.assign(tf.reshape(tf.cast(value, variable.dtype), variable.shape))
            return aux

        return _concrete_calls(quiet_tracing(tf_run))
    if backend == "jax":
        import jax

        def jax_fn(values, *args):
            new_state, aux = fn([v.reshape(-1) for v in values], *args)
            shaped = [n.reshape(v.shape).astype(v.dtype) for n, v in zip(new_state, values)]
            return shaped, aux

        jitted = jax.jit(jax_fn, donate_argnums=(0,))

        def run(*args):
            new_state, aux = jitted([v.value for v in variables], *args)
            for variable, value in zip(variables, new_state):
                variable.assign(value)
            return aux

        return run
    raise NotImplementedError(f"Rewiring supports TensorFlow and JAX, not {backend}.")


def _concrete_calls(function):
    """Calls a `tf.function` through its concrete function for each input
    signature: `tf.function`'s own dispatch costs 0.25-0.5 ms a call.
    Calls with other than arrays (Python numbers trace as constants) go
    through the `tf.function`."""
    import tensorflow as tf

    concrete = {}

    def run(*args):
        if not all(isinstance(a, (tf.Tensor, np.ndarray, np.generic)) for a in args):
            return function(*args)
        args = [tf.convert_to_tensor(a) for a in args]
        key = tuple((a.dtype, tuple(a.shape)) for a in args)
        if key not in concrete:
            concrete[key] = function.get_concrete_function(*args)
        return concrete[key](*args)

    return run


def stateless_randint(seed, shape, maxval: int):
    """Uniform int32 in `[0, maxval)` from a `(2,)` int32 `seed` tensor.

    The backend's stateless generator, so it can run inside a compiled
    rewiring step (Keras' `SeedGenerator` keeps state in a variable, which a
    compiled pure function cannot advance).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Philox explicitly: the "auto_select" default compiles to a path ~30x
        # slower under XLA on CPU (14 ms vs 0.4 ms for 17k draws).
        return tf.random.stateless_uniform(
            shape, seed=seed, minval=0, maxval=maxval, dtype=tf.int32, alg="philox"
        )
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed[0]), seed[1])
        return jax.random.randint(key, shape, 0, maxval, dtype="int32")
    raise NotImplementedError(f"Rewiring supports TensorFlow and JAX, not {backend}.")
