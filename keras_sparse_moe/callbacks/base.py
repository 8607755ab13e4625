"""Shared machinery of the connectivity callbacks: finding layers, counting steps, reporting."""

from __future__ import annotations

import keras

from keras_sparse_moe import _runtime
from keras_sparse_moe.walk import find_layers

__all__ = ["SparseTrainingCallback", "find_sparse_layers"]


def find_sparse_layers(model, exclude=(), owner="callback"):
    """The sparse layers of `model` (`SparseDense`, the sparse convolutions: any
    `SparseKernelLayer`, nested ones included), minus `exclude`."""
    from keras_sparse_moe.layers import SparseKernelLayer

    excluded = {x if isinstance(x, str) else x.name for x in exclude}
    names = {layer.name for layer in find_layers(model)}
    if excluded - names:
        raise ValueError(
            f"`{owner}` got `exclude` names that match no layer of model '{model.name}'. "
            f"Received: exclude={sorted(excluded)}; unknown: {sorted(excluded - names)}"
        )
    found = [layer for layer in find_layers(model, SparseKernelLayer) if layer.name not in excluded]
    if not found:
        raise ValueError(
            f"`{owner}` found no `SparseDense` layer to act on in model "
            f"'{model.name}' (excluded: {sorted(excluded) or 'none'}). Build the model "
            "with `keras_sparse_moe.layers.SparseDense` (or `SparseConv1D`/`SparseConv2D`) "
            "or convert it with "
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

    Subclasses decide when and what to rewire; the layer runs their compiled
    step on its own storage (`SparseDense.rewire`), in place, resetting the
    optimizer state where connections changed.
    """

    name = "sparse_training"

    def __init__(self, exclude=None, seed=None):
        super().__init__()
        from keras_sparse_moe.validation import check_seed

        self.exclude = _check_exclude(exclude, type(self).__name__)
        self.seed = check_seed(seed, type(self).__name__)
        # Randomness is a function of (this seed, the optimizer step): a resumed
        # run draws what the uninterrupted one drew.
        self._seed = _runtime.new_seed(self.seed)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ #
    def on_train_begin(self, logs=None):
        self.sparse_layers = find_sparse_layers(self.model, self.exclude, type(self).__name__)
        _runtime.check_strategy(type(self).__name__, self.model)
        if self.seed is None:  # every worker of a multi-worker run must draw alike
            self._seed = _runtime.shared_seed(self.model, self._seed)
        self._step = _runtime.optimizer_step(self.model)
        self._epochs = self.params.get("epochs") or 1
        self._steps_per_epoch = self.params.get("steps")
        self._epoch = 0
        self._rewired_in_epoch = 0
        for layer in self.sparse_layers:
            layer.refresh_connections()  # weights may have been set since the last fit

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._rewired_in_epoch = 0
        # The optimizer's counter, read once an epoch (after `BackupAndRestore`
        # restored it in `on_train_begin`); batch ends count from it without a
        # host read per step, which would stall asynchronous dispatch.
        self._epoch_start = self._step = _runtime.optimizer_step(self.model)

    def _advance(self, batch):
        """`(previous, current)` optimizer steps: the steps run since the last call.

        Keras calls `on_train_batch_end` once per `steps_per_execution` steps,
        with `batch` the index of the last step run in this epoch, so schedules
        count optimizer steps, not calls.
        """
        previous, self._step = self._step, self._epoch_start + batch + 1
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
