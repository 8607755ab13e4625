"""Gradual magnitude pruning inside `model.fit` (Zhu & Gupta 2017)."""

from __future__ import annotations

import functools
import math

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
        n_m: Optional `(n, m)`: prune every layer to N:M structured sparsity
            along the input axis (tfmot's `sparsity_m_by_n`), as layers built
            with `n_m` are anyway. Each group of `m` consecutive inputs of an
            output keeps its `ceil(density * m)` largest magnitudes, never
            fewer than `n`, so a gradual schedule passes through (m-1):m
            on its way; the schedule must end at density `n / m` (sparsity
            `1 - n / m`). Only with `scope="layer"`.

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

        To 2:4, as for sparse tensor cores:

        >>> model = keras.Sequential([keras.Input((16,)),
        ...     keras_sparse_moe.layers.SparseDense(8, density=1.0), keras.layers.Dense(1)])
        >>> model.compile("adam", "mse")
        >>> to_2_4 = keras_sparse_moe.callbacks.MagnitudePruning(
        ...     keras_sparse_moe.schedules.ConstantSparsity(0.5, frequency=1), n_m=(2, 4))
        >>> _ = model.fit(np.ones((32, 16)), np.ones((32, 1)), verbose=0, callbacks=[to_2_4])
        >>> model.layers[0].dense_mask().reshape(4, 4, 8).sum(axis=1).min(), model.layers[0].n_m
        (np.int64(2), (2, 4))
    """

    name = "pruning"

    def __init__(self, schedule, exclude=None, scope="layer", n_m=None):
        super().__init__(exclude=exclude)
        self.scope = validation.check_choice("scope", scope, "MagnitudePruning", SCOPES)
        self.n_m = None if n_m is None else validation.check_n_m(n_m, "MagnitudePruning")
        if self.n_m is not None and self.scope == "global":
            raise ValueError(
                "`MagnitudePruning` prunes N:M group by group, not to one global threshold. "
                f"Received: scope='global', n_m={n_m}"
            )
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
            "n_m": None if self.n_m is None else list(self.n_m),
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

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for layer in self.sparse_layers:
            if self.n_m is None:
                continue
            if layer.n_m not in (None, self.n_m):
                raise ValueError(
                    f"`MagnitudePruning(n_m={self.n_m})` cannot prune layer '{layer.name}', "
                    f"built with n_m={layer.n_m}, to another pattern."
                )
            if layer.weight_shape[-2] % self.n_m[1]:
                raise ValueError(
                    f"`MagnitudePruning(n_m={self.n_m})` needs input sizes that are multiples "
                    f"of m={self.n_m[1]}. Received: layer '{layer.name}' with input size "
                    f"{layer.weight_shape[-2]}; exclude it or choose another m."
                )
        for layer in self.sparse_layers:  # from now on the layers keep the pattern
            layer.n_m = layer.n_m or self.n_m
        patterned = [x.name for x in self.sparse_layers if x.n_m is not None]
        if self.scope == "global" and patterned:
            raise ValueError(
                "`MagnitudePruning(scope='global')` cannot keep the N:M pattern of "
                f"{patterned}: exclude them or prune layer by layer."
            )

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
            if layer.n_m is not None:
                removed += _prune_groups(layer, density, self.model.optimizer)
                continue
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


_prune.reads_positions = False  # it removes only (see `SparseKernelLayer.rewire`)


def _prune_groups(layer, density, optimizer):
    """Prunes an N:M layer to `ceil(density * m)` connections a group (at least
    n): its largest magnitudes. Returns the connections removed."""
    n, m = layer.n_m
    if density < n / m - 1e-6:
        raise ValueError(
            f"`MagnitudePruning` got a target density of {density:.4g} from its schedule, "
            f"below the N:M pattern {n}:{m} of layer '{layer.name}' (density {n / m:.4g}). "
            f"End the schedule at sparsity {1 - n / m:.4g}."
        )
    keep = min(m, max(n, math.ceil(density * m - 1e-6)))
    if layer.num_connections <= keep * int(np.prod(layer.kernel_shape)) // m:
        return 0  # every group holds `keep` or fewer already
    step = functools.partial(_prune_to_groups, m, keep)
    removed = layer.rewire(step, optimizer, ("prune_n_m", m, keep))
    return int(keras.ops.convert_to_numpy(removed))


def _prune_to_groups(m, keep, storage, state, positions):
    """Removes all but the `keep` largest magnitudes of every group of `m`."""
    from keras_sparse_moe.ops import groups

    values, active = storage.all_weights(state)
    flat, occupied = storage.flat_positions(state, None)
    drop = groups.keep_largest(values, active, flat, occupied, storage.shape, m, keep)
    return storage.remove(state, drop), None, keras.ops.sum(keras.ops.cast(drop, "int32"))


_prune_to_groups.reads_positions = False  # it removes only (see `SparseKernelLayer.rewire`)


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
