"""Gradual magnitude pruning inside `model.fit` (Zhu & Gupta 2017)."""

from __future__ import annotations

import keras
import numpy as np

from keras_sparse_moe import schedules, validation
from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.ops import rewiring

__all__ = ["MagnitudePruning"]

SCOPES = ("layer", "global")


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
    rest (never regrows). With `scope="global"` one threshold serves all the
    layers instead: the `round(density * total weights)` largest magnitudes of
    the whole model are kept, wherever they are (each layer keeps at least one
    connection). Start from dense layers (`SparseDense(..., density=1.0)`
    or `keras_sparse_moe.sparsify(model, density=1.0)`) for classic gradual
    pruning. Optimizer state is zeroed at pruned positions.

    Args:
        schedule: A `keras_sparse_moe.schedules.PolynomialDecay` /
            `ConstantSparsity`, or a tfmot `PruningSchedule` (with the `[tfmot]`
            extra installed).
        exclude: Layers (or names) left unchanged and outside a global budget,
            e.g. the first layer, which RigL's paper keeps dense.
        scope: `"layer"` (default: every layer at the scheduled density) or
            `"global"` (the model at the scheduled density, one threshold).

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

    def __init__(self, schedule, exclude=None, scope="layer"):
        super().__init__(exclude=exclude)
        self.scope = validation.check_choice("scope", scope, "MagnitudePruning", SCOPES)
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
            "scope": self.scope,
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
        layers = list(self.sparse_layers)
        if self.scope == "global":
            targets = _global_targets(layers, density)
        else:
            targets = [max(1, int(round(density * np.prod(x.kernel_shape)))) for x in layers]
        removed = 0
        for layer, target in zip(layers, targets):
            count = layer.num_connections - target
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


def _global_targets(layers, density):
    """Connections each layer keeps so that the model keeps the `round(density *
    total weights)` largest magnitudes over all `layers` (at least one a layer)."""
    magnitudes = [
        np.abs(np.asarray(keras.ops.convert_to_numpy(x.connection_values()))) for x in layers
    ]
    owner = np.concatenate([np.full(m.size, i) for i, m in enumerate(magnitudes)])
    budget = int(round(density * sum(int(np.prod(x.kernel_shape)) for x in layers)))
    # The largest first; ties keep the earlier layer's (a stable order).
    kept = owner[np.argsort(-np.concatenate(magnitudes), kind="stable")[:budget]]
    counts = np.bincount(kept, minlength=len(layers))
    return [max(1, int(c)) for c in counts]  # a layer's count never exceeds its own
