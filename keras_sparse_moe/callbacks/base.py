"""Shared machinery of the connectivity callbacks: finding layers, applying a rewiring."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import _runtime
from keras_sparse_moe.ops import rewiring

__all__ = ["SparseTrainingCallback", "find_sparse_layers"]


def find_sparse_layers(model, exclude=(), owner="callback"):
    """The `SparseDense` layers of `model` (nested ones included), minus `exclude`."""
    from keras_sparse_moe.layers import SparseDense

    excluded = {x if isinstance(x, str) else x.name for x in exclude}
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    if excluded - names:
        raise ValueError(
            f"`{owner}` got `exclude` names that match no layer of model '{model.name}'. "
            f"Received: exclude={sorted(excluded)}; unknown: {sorted(excluded - names)}"
        )
    found = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, SparseDense) and layer.name not in excluded
    ]
    if not found:
        raise ValueError(
            f"`{owner}` found no `SparseDense` layer to act on in model "
            f"'{model.name}' (excluded: {sorted(excluded) or 'none'}). Build the model "
            "with `keras_sparse_moe.layers.SparseDense` or convert it with "
            "`keras_sparse_moe.sparsify(model, ...)`."
        )
    return found


def _check_exclude(exclude, owner):
    if exclude is None:
        return ()
    if isinstance(exclude, (str, keras.layers.Layer)):
        exclude = (exclude,)
    exclude = tuple(exclude)
    for item in exclude:
        if not isinstance(item, (str, keras.layers.Layer)):
            raise TypeError(
                f"`{owner}` got an invalid `exclude`. Expected layer names or layers. "
                f"Received: exclude={exclude!r}"
            )
    return exclude


class SparseTrainingCallback(keras.callbacks.Callback):
    """Base class: policy lives here, state (mask, kernel) lives in the layers.

    Subclasses decide when and what to rewire; `rewiring.rewire`, compiled by
    `_apply_function`, writes the result into the layer in place and resets the
    optimizer state where connections changed.
    """

    name = "sparse_training"

    def __init__(self, exclude=None, seed=None):
        super().__init__()
        from keras_sparse_moe.topologies import check_seed

        self.exclude = _check_exclude(exclude, type(self).__name__)
        self.seed = check_seed(seed, type(self).__name__)
        # Randomness is a function of (this seed, the optimizer step): a resumed
        # run draws what the uninterrupted one drew.
        self._seed = _runtime.new_seed(self.seed)
        self._functions = {}
        self._slots = {}
        self._indices = {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ #
    def on_train_begin(self, logs=None):
        self.sparse_layers = find_sparse_layers(self.model, self.exclude, type(self).__name__)
        self._step = _runtime.optimizer_step(self.model)
        self._epochs = self.params.get("epochs") or 1
        self._steps_per_epoch = self.params.get("steps")
        self._epoch = 0
        self._rewired_in_epoch = 0
        self._indices = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._rewired_in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        # Read here, not only in `on_train_begin`: `BackupAndRestore` may load
        # the weights (and the optimizer's counter) after that ran.
        self._step = _runtime.optimizer_step(self.model)

    def _advance(self):
        """`(previous, current)` optimizer steps: the steps run since the last call.

        Keras calls `on_train_batch_end` once per `steps_per_execution` steps,
        so schedules read the optimizer's counter instead of counting calls.
        """
        previous, self._step = self._step, _runtime.optimizer_step(self.model)
        return previous, self._step

    @staticmethod
    def _boundary(previous, current, every):
        """The last multiple of `every` in `(previous, current]`, or None."""
        last = current // every * every
        return last if last > previous else None

    def _is_last_step(self, batch):
        return (
            self._steps_per_epoch is not None
            and self._epoch == self._epochs - 1
            and batch == self._steps_per_epoch - 1
        )

    def _sync_model_state(self):
        _runtime.sync_model_state(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self._report(logs, self._rewired_in_epoch)

    def _record_step(self, logs, rewired):
        """Counts a mid-epoch rewiring and shows it in the step's logs."""
        self._rewired_in_epoch += rewired
        if logs is not None:
            logs[f"{self.name}/rewired"] = rewired

    def _report(self, logs, rewired=None):
        """Adds per-layer density and the rewired count to `logs` (progress bar, History)."""
        if logs is None:
            return
        for layer in self.sparse_layers:
            logs[f"density/{layer.name}"] = layer.actual_density
        if rewired is not None:
            logs[f"{self.name}/rewired"] = rewired

    # ------------------------------------------------------------------ #
    def _function(self, layer, key, make):
        """Compiled per layer (static sizes), reused across calls and fits."""
        cache_key = (id(layer), key)
        if cache_key not in self._functions:
            self._functions[cache_key] = make()
        return self._functions[cache_key]

    def _optimizer_slots(self, layer):
        """Optimizer variables shaped like the kernel that belong to it (momenta, moments)."""
        optimizer = self.model.optimizer
        key = (id(layer), id(optimizer), len(optimizer.variables))
        if key not in self._slots:
            self._slots[key] = _runtime.optimizer_slots(optimizer, layer.kernel)
        return self._slots[key]

    def _state_variables(self, layer):
        """Variables a rewiring writes: kernel, mask and the kernel's optimizer slots."""
        return [layer.kernel, layer.mask, *self._optimizer_slots(layer)]

    def _apply_function(self, layer, fn, key=()):
        """`fn(state, *args)` compiled to update the layer's variables in place.

        Returns `run(*args)`; the state is read from and written to
        `_state_variables(layer)`.
        """
        variables = self._state_variables(layer)
        # A partial's bound values must be covered by `key`; its function names the
        # cache entry. The variables are part of the key: a new optimizer has new slots.
        name = getattr(fn, "func", fn)
        return self._function(
            layer,
            ("apply", name, tuple(id(v) for v in variables), key),
            lambda: rewiring.compile_update(fn, variables),
        )

    def _current_indices(self, layer):
        """int32 positions of the layer's connections (a cache of its mask).

        The mask is the source of truth: the cache is rebuilt at every
        `on_train_begin`, and each selection step also checks it against the
        mask (`connection_list_is_current`) so a change made elsewhere is
        noticed and the step redone (`_forget_indices`).
        """
        indices = self._indices.get(id(layer))
        if indices is None:
            mask = np.asarray(ops.convert_to_numpy(layer.mask)).ravel()
            indices = ops.convert_to_tensor(np.flatnonzero(mask).astype("int32"))
            self._indices[id(layer)] = indices
        return indices

    def _forget_indices(self, layer):
        self._indices.pop(id(layer), None)
