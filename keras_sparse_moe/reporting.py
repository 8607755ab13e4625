"""`summary`: what sparsity saves in a model, layer by layer.

`model.summary()` counts a masked kernel in full, and its mask as well, so
it hides what sparsity saves; this table counts connections.
"""

from __future__ import annotations

import math

import keras

__all__ = ["summary", "summary_rows"]


def summary_rows(model) -> list[dict]:
    """One dict per sparse weight of `model`: every `SparseKernelLayer`
    (`SparseDense`, `SparseConv1D`, `SparseConv2D`, nested ones included) and
    every weight under a `MaskConstraint`.

    Keys: `layer`, `type`, `shape` (the kernel's), `storage` (`"masked"`,
    `"sparse"` or `"constraint"`), `connections`, `dense` (the parameters of
    the dense kernel it replaces) and `density`.
    """
    return _rows_and_kernels(model)[0]


def _rows_and_kernels(model):
    """`(summary rows, ids of the kernel variables they count)`."""
    from keras_sparse_moe.constraints import MaskConstraint
    from keras_sparse_moe.layers import SparseKernelLayer

    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`summary` expects a Keras model or layer. Received: {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`summary` needs a built model: '{model.name}' is not built yet. Call it on "
            "an input or build it first."
        )
    rows, kernels = [], []
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, SparseKernelLayer) and layer.built:
            dense = math.prod(layer.weight_shape)
            rows.append(
                dict(
                    layer=layer.name,
                    type=type(layer).__name__,
                    shape=tuple(layer.weight_shape),
                    storage=layer.implementation,
                    connections=layer.num_connections,
                    dense=dense,
                    density=layer.num_connections / dense,
                )
            )
            kernels.append(id(layer.storage_variables[0]))
            continue
        for variable in layer._trainable_variables:
            constraint = getattr(variable, "constraint", None)
            if isinstance(constraint, MaskConstraint):
                dense = math.prod(variable.shape)
                rows.append(
                    dict(
                        layer=f"{layer.name}/{variable.name}",
                        type=type(layer).__name__,
                        shape=tuple(variable.shape),
                        storage="constraint",
                        connections=constraint.num_connections,
                        dense=dense,
                        density=constraint.num_connections / dense,
                    )
                )
                kernels.append(id(variable))
    return rows, set(kernels)


def summary(model, print_fn=None):
    """Prints, for every sparse layer of `model`, its connections, density and
    the dense parameter count it replaces, then the model's totals.

    The totals add the other trainable parameters (biases, dense layers) to
    the connections: "weights used" is what a sparse model trains, "dense
    equivalent" what the same model with dense kernels would train.

    Args:
        model: A built Keras model (or layer).
        print_fn: Callable taking one line (default `print`).

    Example:

    >>> import keras, keras_sparse_moe as ksm
    >>> model = keras.Sequential([keras.Input((32,)),
    ...     ksm.layers.SparseDense(64, density=0.1, seed=0, name="hidden"),
    ...     keras.layers.Dense(2, name="out")], name="mlp")
    >>> ksm.summary(model)
    Sparse layers of 'mlp'
    layer   type         kernel    storage  connections  density  dense params
    hidden  SparseDense  (32, 64)  masked           205   0.1001         2,048
    Weights used: 205 connections + 194 other = 399, 17.8 % of the dense equivalent (2,242)
    """
    print_fn = print if print_fn is None else print_fn
    rows, kernels = _rows_and_kernels(model)
    other = sum(math.prod(v.shape) for v in model.trainable_weights if id(v) not in kernels)
    table = [("layer", "type", "kernel", "storage", "connections", "density", "dense params")]
    for row in rows:
        table.append(
            (
                row["layer"],
                row["type"],
                str(row["shape"]),
                row["storage"],
                f"{row['connections']:,}",
                f"{row['density']:.4g}",
                f"{row['dense']:,}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    right = {4, 5, 6}
    print_fn(f"Sparse layers of '{model.name}'")
    if not rows:
        print_fn("(none: no SparseKernelLayer and no MaskConstraint)")
    else:
        for line in table:
            cells = [
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths))
            ]
            print_fn("  ".join(cells).rstrip())
    connections = sum(row["connections"] for row in rows)
    used = connections + other
    dense = sum(row["dense"] for row in rows) + other
    print_fn(
        f"Weights used: {connections:,} connections + {other:,} other = {used:,}, "
        f"{100 * used / max(dense, 1):.3g} % of the dense equivalent ({dense:,})"
    )
