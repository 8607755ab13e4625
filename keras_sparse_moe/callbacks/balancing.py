"""`BiasBalancing`: load balancing without an auxiliary loss (DeepSeek-V3)."""

from __future__ import annotations

import keras
import numpy as np

from keras_sparse_moe import _runtime, validation
from keras_sparse_moe.walk import find_layers

__all__ = ["BiasBalancing"]

OWNER = "BiasBalancing"


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class BiasBalancing(keras.callbacks.Callback):
    """Balances the experts' load by a bias on their selection, with no loss term.

    Every `SparseExpertMixture(selection_bias=True)` chooses each token's
    `top_k` experts by `gates + b`, a per-expert bias (its variable
    `expert_bias`), and weighs them by the gates alone, so the bias changes
    which experts a token visits but no gradient (DeepSeek-V3's
    auxiliary-loss-free balancing). The mixture counts the assignments each
    expert receives in training (`expert_load`); after every `every`-th
    training batch this callback moves the bias against the imbalance of the
    assignments counted since its last update:

        b_e <- b_e + rate * sign(mean(load) - load_e)

    An overloaded expert's bias falls, an idle expert's rises. The bias is
    layer state (saved with the model); the update rule is this callback's.

    The update runs between steps, on the counts of the whole global batch:
    under `tf.distribute` the replicas' counts are combined when read and the
    new bias is written to every replica, and under `keras.distribution` the
    step sees the global batch, so every replica chooses with the same bias.

    At the end of each epoch, `logs["<layer>/max_violation"]` is the epoch's
    `max_e load_e / mean(load) - 1` (0: perfect balance), in the progress
    bar, `History` and TensorBoard.

    Args:
        rate: Positive float, the bias step per update (DeepSeek-V3: 1e-3).
        every: Update after every this many training batches (positive int);
            with `steps_per_execution=n` a batch end comes every `n` steps.

    Examples:

        >>> import keras, numpy as np, keras_sparse_moe as ksm
        >>> model = keras.Sequential([keras.Input((8,)),
        ...     ksm.layers.SparseExpertMixture(units=2, num_experts=4, top_k=1,
        ...                                    selection_bias=True, seed=0, name="moe")])
        >>> model.compile("sgd", "mse")
        >>> x = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
        >>> history = model.fit(x, x[:, :2], epochs=1, batch_size=32, verbose=0,
        ...                     callbacks=[ksm.callbacks.BiasBalancing(rate=0.01)])
        >>> sorted(history.history)
        ['loss', 'moe/max_violation']
        >>> bias = keras.ops.convert_to_numpy(model.layers[0].expert_bias)
        >>> bool(np.abs(bias).max() > 0)  # two updates of +-0.01 (or 0) each
        True
    """

    def __init__(self, rate=1e-3, every=1):
        super().__init__()
        self.rate = validation.check_float("rate", rate, OWNER, "a float > 0", lambda r: r > 0)
        self.every = validation.check_int("every", every, OWNER, minimum=1)
        self._batches = 0

    def get_config(self):
        return {"rate": self.rate, "every": self.every}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_train_begin(self, logs=None):
        from keras_sparse_moe.layers import SparseExpertMixture

        mixtures = find_layers(self.model, SparseExpertMixture, include_self=True)
        self.mixtures = [m for m in mixtures if m.selection_bias]
        if not self.mixtures:
            raise ValueError(
                f"`{OWNER}` found no `SparseExpertMixture(selection_bias=True)` in model "
                f"'{self.model.name}'. Received mixtures: {[m.name for m in mixtures]}"
            )
        _runtime.sync_model_state(self.model)
        self._batches = 0
        self._seen = {m.name: self._count(m) for m in self.mixtures}
        self._epoch_load = {m.name: 0.0 for m in self.mixtures}

    @staticmethod
    def _count(mixture):
        return np.asarray(keras.ops.convert_to_numpy(mixture.expert_load), "float64")

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every:
            return
        _runtime.sync_model_state(self.model)
        for mixture in self.mixtures:
            # The count only grows, until something (`ActivationRateLogger`) resets it.
            count, seen = self._count(mixture), self._seen[mixture.name]
            load = count - seen if count.sum() >= seen.sum() else count
            self._seen[mixture.name] = count
            if not load.sum():
                continue
            step = self.rate * np.sign(load.mean() - load)
            bias = keras.ops.convert_to_numpy(mixture.expert_bias) + step.astype("float32")
            mixture.expert_bias.assign(bias)
            self._epoch_load[mixture.name] = self._epoch_load[mixture.name] + load

    def on_epoch_end(self, epoch, logs=None):
        for name, load in self._epoch_load.items():
            if logs is not None and np.sum(load):
                logs[f"{name}/max_violation"] = float(np.max(load) / np.mean(load) - 1.0)
            self._epoch_load[name] = 0.0
