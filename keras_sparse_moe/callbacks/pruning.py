"""Gradual magnitude pruning inside `model.fit` (Zhu & Gupta 2017)."""

from __future__ import annotations

import keras
import numpy as np

from keras_sparse_moe import schedules
from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.ops import rewiring

__all__ = ["MagnitudePruning"]


def _is_tfmot_schedule(schedule):
    return any(
        cls.__module__.startswith("tensorflow_model_optimization")
        and cls.__name__ == "PruningSchedule"
        for cls in type(schedule).__mro__
    )


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class MagnitudePruning(SparseTrainingCallback):
    """Removes the smallest-magnitude connections of `SparseDense` layers on a schedule.

    Whenever `schedule(step)` says so, each layer keeps its
    `round(density * n_in * n_out)` largest-magnitude connections and drops the
    rest (never regrows). Start from dense layers (`SparseDense(..., density=1.0)`
    or `keras_sparse_moe.sparsify(model, density=1.0)`) for classic gradual
    pruning. Optimizer state is zeroed at pruned positions.

    Args:
        schedule: A `keras_sparse_moe.schedules.PolynomialDecay` /
            `ConstantSparsity`, or a tfmot `PruningSchedule` (with the `[tfmot]`
            extra installed).
        exclude: Layers (or names) left unchanged.

    Logs: `density/<layer>` and `pruning/rewired` (connections removed).

    Examples:

        >>> import numpy as np, keras, keras_sparse_moe
        >>> model = keras.Sequential([keras.Input((20,)),
        ...     keras_sparse_moe.layers.SparseDense(32, density=1.0), keras.layers.Dense(1)])
        >>> model.compile("adam", "mse")
        >>> schedule = keras_sparse_moe.schedules.PolynomialDecay(0.0, 0.8, 0, 4, frequency=2)
        >>> _ = model.fit(np.ones((64, 20)), np.ones((64, 1)), batch_size=16, verbose=0,
        ...     callbacks=[keras_sparse_moe.callbacks.MagnitudePruning(schedule)])
        >>> round(model.layers[0].actual_density, 2)
        0.2
    """

    name = "pruning"

    def __init__(self, schedule, exclude=None):
        super().__init__(exclude=exclude)
        if not isinstance(schedule, schedules.PruningSchedule) and not _is_tfmot_schedule(schedule):
            raise TypeError(
                "`MagnitudePruning` got an invalid `schedule`. Expected a "
                "`keras_sparse_moe.schedules.PruningSchedule` (PolynomialDecay, "
                "ConstantSparsity) or a tfmot `PruningSchedule`. "
                f"Received: schedule={schedule!r} of type {type(schedule).__name__}"
            )
        self.schedule = schedule

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "exclude": [x if isinstance(x, str) else x.name for x in self.exclude],
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)

    def _target(self, step):
        should_prune, value = self.schedule(step)
        if isinstance(self.schedule, schedules.PruningSchedule):
            return should_prune, value
        # tfmot schedules return tensors and speak of sparsity.
        return bool(np.asarray(should_prune)), 1.0 - float(np.asarray(value))

    def on_train_batch_end(self, batch, logs=None):
        # Every optimizer step since the last call is asked (`steps_per_execution`
        # may run several per call); the latest that prunes sets the density.
        previous, current = self._advance(batch)
        density = None
        for step in range(previous + 1, current + 1):
            should_prune, value = self._target(step)
            if should_prune:
                density = value
        if density is not None:
            self._record_step(logs, self.prune(density))

    def prune(self, density):
        """Prunes every layer to `density` now; returns the connections removed."""
        if not 0.0 < density <= 1.0:
            raise ValueError(
                f"`MagnitudePruning` got a target density outside (0, 1] from its "
                f"schedule. Received: density={density}"
            )
        self._sync_model_state()
        removed = 0
        for layer in self.sparse_layers:
            size = int(np.prod(layer.kernel_shape))
            count = layer.num_connections - max(1, int(round(density * size)))
            if count <= 0:
                continue
            layer.rewire(_prune, self.model.optimizer, (), np.asarray(count, np.int32))
            removed += count
        return removed


def _prune(storage, state, positions, count):
    """Removes the `count` smallest-magnitude connections (over all stored weights:
    pruning is rare and changes the number of connections)."""
    values, active = storage.all_weights(state)
    drop = rewiring.select_smallest(rewiring.magnitude_keys(values), active, count)
    return storage.remove(state, drop), None, count  # None: the layer rebuilds its list
