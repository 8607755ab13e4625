"""Backend plumbing in one place: compiling rewiring steps and loss gradients,
stateless random numbers, the optimizer's step, JAX state sync, optimizer slots,
seeds, and the replicas of distributed variables. Everything else (layers,
rewiring ops, callbacks) is written in `keras.ops`.

Callbacks decide from `optimizer.iterations` and draw their randomness from
`(seed, step)`, so a resumed or restored run (`BackupAndRestore`,
`ModelCheckpoint` + `load_model`) decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging

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
    """`seed` itself, or for `None` a random int drawn from NumPy's global generator.

    `keras.utils.set_random_seed` seeds that generator, so under one global
    seed every default seed of the library (topologies, callbacks, samplers) is
    repeatable; without one it differs from run to run.
    """
    if seed is not None:
        return int(seed)
    return int(np.random.randint(INT32_MAX))


def rng(seed) -> np.random.Generator:
    """A NumPy generator seeded by `new_seed(seed)`."""
    return np.random.default_rng(new_seed(seed))


def check_strategy(owner, model):
    """Raises a ValueError naming `owner` and the strategy when `model` trains under a
    `tf.distribute` strategy whose variables rewiring cannot update in place.

    Supported: none, `OneDeviceStrategy`, `MirroredStrategy`,
    `MultiWorkerMirroredStrategy`, `CentralStorageStrategy`. Not:
    `ParameterServerStrategy` (variables sharded over parameter servers,
    callbacks on a coordinator) and `TPUStrategy` (untested).
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    unsupported = (
        tf.distribute.ParameterServerStrategy,
        tf.distribute.experimental.ParameterServerStrategy,
        tf.distribute.TPUStrategy,
        tf.distribute.experimental.TPUStrategy,
    )
    if not isinstance(strategy, unsupported):
        return
    raise ValueError(
        f"`{owner}` cannot rewire a model trained under `{type(strategy).__name__}`: "
        "rewiring updates each layer's variables in place on every replica, which it "
        "supports under OneDeviceStrategy, MirroredStrategy, MultiWorkerMirroredStrategy "
        f"and CentralStorageStrategy. Received: model '{model.name}' under "
        f"{type(strategy).__name__}"
    )


def shared_seed(model, seed: int) -> int:
    """`seed`, made the same in every process training `model`: the first replica's.

    A seed drawn at random (`seed=None`) differs between the workers of a
    multi-worker run, whose rewiring must decide alike; one small all-reduce
    per `fit` fixes that. A no-op on one process.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync > 1:

            def first_replica_only():
                first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
                return tf.where(first, tf.constant(seed, tf.int64), tf.constant(0, tf.int64))

            with strategy.scope():  # the first replica's seed, summed with zeros
                return int(strategy.reduce("SUM", strategy.run(first_replica_only), axis=None))
    elif backend == "jax":
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return int(multihost_utils.broadcast_one_to_all(np.int64(seed)))
    return seed


def step_seed(seed: int, step: int, stream: int = 0) -> np.ndarray:
    """An int32 `(2,)` seed for stateless ops, a function of `(seed, step, stream)` only."""
    mixed = np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint32)
    return (mixed % INT32_MAX).astype("int32")


def step_uniform(seed: int, step: int, stream: int = 0) -> float:
    """A uniform float in [0, 1), a function of `(seed, step, stream)` only."""
    return float(np.random.default_rng([seed, stream, step]).random())


def add_statistic(layer, name, shape, initializer="zeros"):
    """A float32 non-trainable variable of `layer` that its training steps update (running
    statistics, loss sums), kept like a metric's state.

    Under `tf.distribute` each replica updates its own copy inside the step,
    with no cross-replica synchronisation there (a sync point in the forward
    pass lets replica threads see each other's `add_loss` losses); reading it
    outside the step (callbacks, `get_weights`, saving) gives the replicas'
    mean, and assigning it sets every copy. Elsewhere a plain variable.
    """
    from keras import initializers

    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(
            initializer=initializers.get(initializer),
            shape=shape,
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="mean",
            synchronization="on_read",
            name=name,
        )
    layer._track_variable(variable)
    return variable


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

    The callbacks compile one function per step and layer signature, each
    traced once per shape; TensorFlow counts the traces of all functions
    sharing one code object together and would warn of retracing after a
    few layers.
    """
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


class _DropRetracingWarnings(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def quiet_retracing():
    """Drops TensorFlow's "frequent retracing" warning inside the block.

    For Keras' own functions traced afresh by design (a new model's `predict`
    in each `ParametricTSNE.fit`), which TensorFlow counts together.
    """
    logger = logging.getLogger("tensorflow")
    drop = _DropRetracingWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def compile_function(fn):
    """Compiles a pure tensor function with the backend's XLA compiler."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # No AutoGraph: a pure tensor function (it runs under `jax.jit` too) has no
        # Python control flow to convert, and converting it costs tracing time.
        compiled = tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)
        return quiet_tracing(compiled)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def compile_update(fn):
    """Compiles `fn(state, *args) -> (new_state, aux)` into `run(variables, *args) -> aux`,
    which updates the Keras `variables` in place.

    `state` is the list of the `variables`' values, flattened; `new_state`
    (same shapes, flat) is written back to them without a full copy: inside
    the compiled function on TensorFlow (XLA aliases the resource update),
    through buffer donation on JAX. The variables are arguments, so one
    program serves every list of variables of the same shapes and dtypes:
    `fn` is traced once per such signature (and device), however many
    layers share it.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)  # pure, as above
        def tf_run(resources, *args):
            flat = [tf.reshape(v, (-1,)) for v in resources]
            new_state, aux = fn(flat, *args)
            for variable, value in zip(resources, new_state):
                variable.assign(tf.reshape(tf.cast(value, variable.dtype), variable.shape))
            return aux

        run = _concrete_calls(quiet_tracing(tf_run))

        def run_and_broadcast(variables, *args):
            # Runs where the variables live (XLA cannot reach a variable on
            # another device): on the first local replica under a strategy,
            # whose result is then copied to the others (bit-identical replicas).
            replicas = local_replicas(variables)
            resources = replicas[0]
            with tf.device(resources[0].device):
                aux = run(resources, *args)
            for copies in replicas[1:]:
                for copy, source in zip(copies, resources):
                    copy.assign(source.read_value())
            return aux

        return run_and_broadcast
    if backend == "jax":
        import jax

        def jax_fn(values, *args):
            new_state, aux = fn([v.reshape(-1) for v in values], *args)
            shaped = [n.reshape(v.shape).astype(v.dtype) for n, v in zip(new_state, values)]
            return shaped, aux

        jitted = jax.jit(jax_fn, donate_argnums=(0,))

        def run(variables, *args):
            new_state, aux = jitted([v.value for v in variables], *args)
            for variable, value in zip(variables, new_state):
                variable.assign(value)
            return aux

        return run
    raise NotImplementedError(f"Rewiring supports TensorFlow and JAX, not {backend}.")


def local_replicas(variables):
    """The Keras `variables`' backing variables, one list per local replica.

    One list of plain variables outside `tf.distribute`; under a strategy
    (`MirroredStrategy`, `MultiWorkerMirroredStrategy`), one list per device of
    this worker, the first on the primary device.
    """
    import tensorflow as tf

    values = [v.value for v in variables]
    if not any(isinstance(v, tf.distribute.DistributedValues) for v in values):
        return [values]
    components = [
        v.values if isinstance(v, tf.distribute.DistributedValues) else None for v in values
    ]
    count = {len(c) for c in components if c is not None}
    if None in components or len(count) != 1:
        raise ValueError(
            "Rewiring needs a layer's variables and their optimizer slots created under the "
            "same `tf.distribute` strategy. Create the model and compile it inside "
            "`strategy.scope()`. Received variables: "
            f"{[(v.path, type(r).__name__) for v, r in zip(variables, values)]}"
        )
    return [list(replica) for replica in zip(*components)]


def _concrete_calls(function):
    """Calls a `tf.function` of `(resources, *args)` through its concrete function for
    each signature (device, variables' and arguments' dtypes and shapes):
    `tf.function`'s own dispatch costs 0.25-0.5 ms a call. Calls with other
    than arrays (Python numbers trace as constants) go through the
    `tf.function`."""
    import tensorflow as tf

    concrete = {}

    def run(resources, *args):
        if not all(isinstance(a, (tf.Tensor, np.ndarray, np.generic)) for a in args):
            return function(resources, *args)
        args = [tf.convert_to_tensor(a) for a in args]
        key = (
            resources[0].device,
            tuple((v.dtype, tuple(v.shape)) for v in resources),
            tuple((a.dtype, tuple(a.shape)) for a in args),
        )
        if key not in concrete:
            concrete[key] = function.get_concrete_function(resources, *args)
        return concrete[key](resources, *args)

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


def compile_loss_gradients(model, variables, draw, probing):
    """A compiled `(x, y, seeds) -> list`: gradients of `model`'s training loss on `(x, y)`.

    One entry per item of `variables`: a model variable gives `dL/dv` (the
    full array), None gives `(dL/dprobe, rows, cols)` for zero-valued probes
    at the positions `draw` picks. `draw(seeds)` (a list of `(2,)` int32
    seeds, one per entry) returns per entry None or the `(rows, cols)` of
    its probes; the loss is traced inside `probing(probes)`, a context
    manager given per entry None or `(zeros, rows, cols)`, which lets layers
    add the probes to their connections. `seeds` is `(len(variables), 2)`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True, reduce_retracing=True)
        def scores(x, y, seeds):
            drawn = draw(tf.unstack(seeds, num=len(variables)))
            probes = [None if d is None else (tf.zeros(d[0].shape), *d) for d in drawn]
            targets = [v if p is None else p[0] for v, p in zip(variables, probes)]
            with probing(probes), tf.GradientTape() as tape:
                tape.watch([p[0] for p in probes if p is not None])
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred)
            grads = tape.gradient(loss, targets)
            return [g if d is None else (g, *d) for g, d in zip(grads, drawn)]

        scores = quiet_tracing(scores)
        device = local_replicas(model.trainable_variables[:1])[0][0].device

        def run(x, y, seeds):
            with tf.device(device):  # where the model's variables (first replica) live
                return scores(x, y, seeds)

        return run
    if backend == "jax":
        import jax

        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        positions = [None if v is None else index[id(v)] for v in variables]

        def loss_fn(probe_values, trainable, non_trainable, metrics, optimizer, x, y, drawn):
            probes = [None if d is None else (v, *d) for v, d in zip(probe_values, drawn)]
            with probing(probes):
                loss, _ = model.compute_loss_and_updates(
                    trainable,
                    non_trainable,
                    metrics,
                    x,
                    y,
                    None,
                    training=True,
                    optimizer_variables=optimizer,
                )
            return loss

        grad_fn = jax.grad(loss_fn, argnums=(0, 1))

        @jax.jit
        def compute(trainable, non_trainable, metrics, optimizer, x, y, seeds):
            drawn = draw(list(seeds))
            zeros = [None if d is None else jax.numpy.zeros(d[0].shape) for d in drawn]
            probe_grads, grads = grad_fn(
                zeros, trainable, non_trainable, metrics, optimizer, x, y, drawn
            )
            return [
                grads[i] if d is None else (g, *d) for i, g, d in zip(positions, probe_grads, drawn)
            ]

        def run(x, y, seeds):
            return compute(
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                [v.value for v in model.metrics_variables],
                [v.value for v in model.optimizer.variables],
                x,
                y,
                seeds,
            )

        return run
    raise NotImplementedError(f"Loss gradients support TensorFlow and JAX, not {backend}.")
