"""`ActivationRateLogger`: what the mixtures of a model did this epoch, into `logs`."""

from __future__ import annotations

import keras
import numpy as np

from keras_sparse_moe import _runtime, routing, validation
from keras_sparse_moe.walk import find_layers

__all__ = ["ActivationRateLogger"]


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class ActivationRateLogger(keras.callbacks.Callback):
    """Writes activation rates, balancing losses and dispatch overflow into `logs`.

    At the end of every `every`-th epoch:
    - for every `SparseExpertMixture` of the model, the epoch mean of each of its
      balancing losses (`"<layer>/<loss>"`, unweighted); with `top_k`, each
      expert's share of the epoch's assignments (`"<layer>/load/<expert>"`)
      and their entropy over `ln(num_experts)` (`"<layer>/load_entropy"`: 1
      when balanced, 0 when one expert takes all); with the capacity dispatch,
      the fraction of assignments dropped (`"<layer>/overflow"`);
    - with `data`, the activation-rate table of `keras_sparse_moe.routing.
      activation_rates` as scalars `"rate/<row>/<expert>"`, printed when
      `verbose`, kept in `self.tables` (one per logged epoch).

    Everything goes into the epoch's `logs`, hence the progress bar, `History`
    and the `TensorBoard` callback (list this callback before `TensorBoard`).

    Args:
        data: Optional dict `{name: inputs}` for the activation-rate table
            (see `activation_rates`).
        by_class: Optional dict `{name: labels}` for one row per class.
        layer: Name of the mixture to tabulate when the model has several.
        every: Log every this many epochs (positive int).
        batch_size: Batch size of the table's forward passes.
        verbose: Print the table (0 or 1).

    Examples:

        ```python
        logger = keras_sparse_moe.callbacks.ActivationRateLogger(
            {"mnist": x_mnist, "cifar": x_cifar})
        model.fit(x, y, epochs=5, callbacks=[logger])
        print(logger.tables[-1])
        ```
    """

    def __init__(self, data=None, by_class=None, layer=None, every=1, batch_size=256, verbose=1):
        super().__init__()
        if data is not None and (not isinstance(data, dict) or not data):
            raise TypeError(
                "`ActivationRateLogger` got an invalid `data`. Expected None or a "
                f"non-empty dict {{name: inputs}}. Received: {type(data).__name__}"
            )
        every = validation.check_int("every", every, "ActivationRateLogger", minimum=1)
        batch_size = validation.check_int("batch_size", batch_size, "ActivationRateLogger")
        self.data = data
        self.by_class = by_class
        self.layer = layer
        self.every = every
        self.batch_size = batch_size
        self.verbose = verbose
        self.tables = []

    def on_train_begin(self, logs=None):
        from keras_sparse_moe.layers import SparseExpertMixture

        self.mixtures = find_layers(self.model, SparseExpertMixture, include_self=True)
        if not self.mixtures:
            raise ValueError(
                f"`ActivationRateLogger` found no `SparseExpertMixture` in model "
                f"'{self.model.name}'."
            )
        self._sync()
        for mixture in self.mixtures:
            mixture.reset_statistics()

    def _sync(self):
        # The next step must read the reset statistics.
        _runtime.sync_model_state(self.model)

    def get_config(self):
        """Every argument but the arrays (`data`, `by_class`), which are not
        configuration: give them back in `from_config({**config, "data": ...})`."""
        layer = self.layer
        return {
            "layer": layer.name if isinstance(layer, keras.layers.Layer) else layer,
            "every": self.every,
            "batch_size": self.batch_size,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        logs = {} if logs is None else logs
        self._sync()
        for mixture in self.mixtures:
            for name, value in mixture.balance_loss_means.items():
                logs[f"{mixture.name}/{name}"] = value
            shares = mixture.load_fractions
            if shares is not None and shares.sum():
                for expert, share in enumerate(shares):
                    logs[f"{mixture.name}/load/{expert}"] = float(share)
                entropy = -np.sum(shares * np.log(np.where(shares > 0, shares, 1.0)))
                logs[f"{mixture.name}/load_entropy"] = float(entropy / np.log(len(shares)))
            if mixture.overflow_fraction is not None:
                logs[f"{mixture.name}/overflow"] = mixture.overflow_fraction
            mixture.reset_statistics()
        if self.data is None:
            return
        table = routing.activation_rates(
            self.model,
            self.data,
            by_class=self.by_class,
            layer=self.layer,
            batch_size=self.batch_size,
            verbose=False,
        )
        self.tables.append(table)
        for row, values in zip(table.rows, table.values):
            for expert, value in enumerate(values):
                logs[f"rate/{row}/{expert}"] = float(value)
        if self.verbose:
            print(f"\nActivation rates after epoch {epoch + 1}:\n{table}")
