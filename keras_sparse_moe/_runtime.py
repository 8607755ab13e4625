"""Backend plumbing in one place: the optimizer's step, JAX state sync, optimizer slots, seeds.

Callbacks decide from `optimizer.iterations` and draw their randomness from
`(seed, step)`, so a resumed or restored run (`BackupAndRestore`,
`ModelCheckpoint` + `load_model`) decides exactly as the uninterrupted one.
"""

from __future__ import annotations

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
