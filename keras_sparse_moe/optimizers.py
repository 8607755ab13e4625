"""Per-variable-group learning rates on any Keras optimizer (a gate faster than its experts)."""

from __future__ import annotations

import math
import re

import keras
from keras import ops

__all__ = ["scale_learning_rates"]


def scale_learning_rates(optimizer, multipliers):
    """Scales the optimizer's learning rate per group of variables, in place.

    Keras optimizers have one learning rate. This gives the variables whose
    path matches a pattern their own multiple of it (e.g. a separate
    learning rate for the gate and for the experts): every step, a
    matching variable is updated with `multiplier * learning_rate`, with the
    optimizer's own rule (SGD, momentum, Adam, ...) and its schedule. Since
    every built-in update is linear in the learning rate, this is exactly a
    second optimizer of the same kind for that group, sharing the step count.
    A multiplier of 0 freezes the group.

    Args:
        optimizer: A `keras.optimizers.Optimizer`, not yet used.
        multipliers: Dict `{pattern: multiplier}`. A pattern is a regular
            expression searched in `variable.path` (e.g. `"gate"` or
            `"mixture/softmax_gate/"`); the first matching pattern, in the
            dict's order, decides. Each pattern must match at least one
            trainable variable (checked when the optimizer is built, at the
            first step), so a typo cannot go unnoticed.

    Returns:
        `optimizer`, changed. The multipliers are not part of its config:
        after `keras.models.load_model`, call this again on the loaded
        model's optimizer to go on training. Weight decay (`AdamW`,
        `weight_decay=`) is not scaled.

    Examples:

        >>> import numpy as np, keras, keras_sparse_moe
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="body"),
        ...                           keras.layers.Dense(1, name="head")])
        >>> optimizer = keras_sparse_moe.optimizers.scale_learning_rates(
        ...     keras.optimizers.SGD(0.1), {"head": 10.0, "body/bias": 0.0})
        >>> model.compile(optimizer, "mse")
        >>> bias = model.get_layer("body").bias.numpy().copy()
        >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
        >>> bool(np.all(model.get_layer("body").bias.numpy() == bias))   # frozen
        True
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`scale_learning_rates` got an invalid `optimizer`. Expected a "
            f"`keras.optimizers.Optimizer`. Received: optimizer={optimizer!r}"
        )
    if not isinstance(multipliers, dict) or not multipliers:
        raise TypeError(
            "`scale_learning_rates` got invalid `multipliers`. Expected a non-empty dict "
            f"{{pattern: multiplier}}. Received: multipliers={multipliers!r}"
        )
    if optimizer.built:
        raise ValueError(
            "`scale_learning_rates` needs an optimizer that has not taken a step yet "
            f"(its variables exist already). Received: optimizer={optimizer.name!r}"
        )
    groups = []
    for pattern, factor in multipliers.items():
        if not isinstance(pattern, str):
            raise TypeError(
                "`scale_learning_rates` got a pattern that is not a string. "
                f"Received: {pattern!r} in multipliers={multipliers!r}"
            )
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(
                f"`scale_learning_rates` got a multiplier that is not a number for "
                f"pattern {pattern!r}. Received: {factor!r}"
            )
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(
                f"`scale_learning_rates` got an invalid multiplier for pattern {pattern!r}. "
                f"Expected a finite number >= 0. Received: {factor!r}"
            )
        groups.append((re.compile(pattern), float(factor)))
    groups = tuple(groups)
    update_step, build = optimizer.update_step, optimizer.build
    factors = {}  # id of each variable and of what the backend hands `update_step`

    def factor_of(path):
        for pattern, factor in groups:
            if pattern.search(path):
                return factor
        return 1.0

    def checked_build(variables):
        unused = [p.pattern for p, _ in groups if not any(p.search(v.path) for v in variables)]
        if unused:
            raise ValueError(
                f"`scale_learning_rates`: the patterns {unused} match no trainable variable. "
                f"Variable paths look like {[v.path for v in variables[:4]]}."
            )
        for variable in variables:
            factor = factor_of(variable.path)
            # TensorFlow updates the backend variable (or its replicas), not the
            # Keras one.
            inner = getattr(variable, "_value", None)
            for v in (variable, inner, *getattr(inner, "values", ())):
                if v is not None:
                    factors[id(v)] = factor
        return build(variables)

    def scaled_update_step(gradient, variable, learning_rate):
        factor = factors.get(id(variable))
        if factor is None:
            raise RuntimeError(
                "`scale_learning_rates`: the optimizer updates a variable it was not built "
                f"with ({getattr(variable, 'name', variable)!r})."
            )
        if factor != 1.0:
            learning_rate = ops.multiply(learning_rate, factor)
        return update_step(gradient, variable, learning_rate)

    optimizer.update_step = scaled_update_step
    optimizer.build = checked_build
    optimizer.learning_rate_multipliers = tuple((p.pattern, f) for p, f in groups)
    return optimizer
