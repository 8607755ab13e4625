"""Deprecated alias of `keras_sparse_moe.routing` (the activation-rate tables).

The module held no `keras.metrics`; its contents live in `routing` now.
"""

import warnings

from keras_sparse_moe.routing import ActivationTable, activation_rates, gate_values_fn

__all__ = ["ActivationTable", "activation_rates", "gate_values_fn"]

warnings.warn(
    "`keras_sparse_moe.metrics` is now `keras_sparse_moe.routing`; the old name will be "
    "removed in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
