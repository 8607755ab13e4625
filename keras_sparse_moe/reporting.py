"""`summary`: what sparsity saves in a model, layer by layer.

`model.summary()` counts a masked kernel in full, and its mask as well, so
it hides what sparsity saves; this table counts connections.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_sparse_moe.walk import find_layers, own_trainable_weights

__all__ = ["executed_flops", "summary", "summary_rows", "weights_used"]


def summary_rows(model) -> list[dict]:
    """One dict per sparse weight of `model`: every `SparseKernelLayer`
    (`SparseDense`, `SparseConv1D`, `SparseConv2D`, nested ones included) and
    every weight under a `MaskConstraint`.

    Keys: `layer`, `type`, `shape` (the kernel's), `storage` (`"masked"`,
    `"sparse"` or `"constraint"`), `connections`, `dense` (the parameters of
    the dense kernel it replaces), `density` and `pattern`: `"n:m"` for a
    layer whose every group of m inputs holds n connections, `"to n:m"` for
    an N:M layer not pruned to it yet, None for the others.
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
    for layer in find_layers(model, include_self=True):
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
                    pattern=_pattern(layer),
                )
            )
            kernels.append(id(layer.storage_variables[0]))
            continue
        for variable in own_trainable_weights(layer):
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
                        pattern=None,
                    )
                )
                kernels.append(id(variable))
    return rows, set(kernels)


def weights_used(model) -> int:
    """What `model` trains: the sparse layers' connections plus every other
    trainable parameter (biases, dense layers, gates); masked kernels count
    their connections only."""
    rows, kernels = _rows_and_kernels(model)
    other = sum(math.prod(v.shape) for v in model.trainable_weights if id(v) not in kernels)
    return sum(row["connections"] for row in rows) + other


def _pattern(layer):
    """The summary's `pattern` of a sparse layer (see `summary_rows`)."""
    if layer.n_m is None:
        return None
    n, m = layer.n_m
    fan_in = math.prod(layer.weight_shape[:-1])
    counts = layer.dense_mask().reshape(fan_in // m, m, -1).sum(axis=1)
    return f"{n}:{m}" if (counts == n).all() else f"to {n}:{m}"


def summary(model, print_fn=None):
    """Prints, for every sparse layer of `model`, its connections, density and
    the dense parameter count it replaces, then the model's totals: the global
    density of its sparse kernels, the FLOPs per example its inference code runs
    (`executed_flops`: a masked kernel is a dense matmul), and the weights used.

    The totals add the other trainable parameters (biases, dense layers) to
    the connections: "weights used" is what a sparse model trains, "dense
    equivalent" what the same model with dense kernels would train.

    Args:
        model: A built Keras model (or layer).
        print_fn: Callable taking one line (default `print`).

    Examples:

        >>> import keras, keras_sparse_moe as ksm
        >>> model = keras.Sequential([keras.Input((32,)),
        ...     ksm.layers.SparseDense(64, density=0.1, seed=0, name="hidden"),
        ...     keras.layers.Dense(2, name="out")], name="mlp")
        >>> ksm.summary(model)
        Sparse layers of 'mlp'
        layer   type         kernel    storage  connections  density  dense params
        hidden  SparseDense  (32, 64)  masked           205   0.1001         2,048
        Global density 0.1001 (205 of 2,048 kernel entries); 4,352 FLOPs per example
        Weights used: 205 connections + 194 other = 399, 17.8 % of the dense equivalent (2,242)
    """
    print_fn = print if print_fn is None else print_fn
    rows, kernels = _rows_and_kernels(model)
    other = sum(math.prod(v.shape) for v in model.trainable_weights if id(v) not in kernels)
    patterned = any(row["pattern"] for row in rows)  # the N:M column, where there is one
    table = [("layer", "type", "kernel", "storage", "connections", "density", "dense params")]
    table[0] += ("N:M",) * patterned
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
            + (row["pattern"] or "-",) * patterned
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    right = {4, 5, 6, 7}
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
    kernels_dense = sum(row["dense"] for row in rows)
    dense = kernels_dense + other
    try:
        flops = f"{executed_flops(model)['total']:,} FLOPs per example"
    except (AttributeError, ValueError):  # a conv never called symbolically has no output shape
        flops = "FLOPs per example unknown (a layer without an output shape)"
    print_fn(
        f"Global density {connections / max(kernels_dense, 1):.4g} ({connections:,} of "
        f"{kernels_dense:,} kernel entries); {flops}"
    )
    print_fn(
        f"Weights used: {connections:,} connections + {other:,} other = {used:,}, "
        f"{100 * used / max(dense, 1):.3g} % of the dense equivalent ({dense:,})"
    )


def executed_flops(model, batch_size: int = 1) -> dict:
    """FLOPs per example that `model`'s inference code executes, layer by layer.

    Counts the matmuls and convolutions the forward pass runs (2 FLOPs per
    multiply-add; elementwise ops, softmax and top-k selection are left out),
    as the code runs them, not as the sparsity promises:
    - `Dense` / masked `SparseDense`: `2 * n_in * units` (a masked kernel is a
      dense matmul); sparse storage: `2 * slots` (one multiply-add a stored slot).
    - Convolutions (`Conv*`, `SparseConv*`, either storage): the dense
      convolution, `2 * kernel entries * output positions`.
    - `SparseExpertMixture`: its gate's network (recursively; `NoisyTopKGate`
      its clean logits, `PTSNEGate` its map network and distances), then the
      experts by the path inference takes (`dispatch_path(False)`): the grouped
      dispatch runs `k` experts a token plus the padding rows of its static
      layout (which depends on `batch_size`), and routes only between visited
      experts (as `(h, h)` tiles, folded into the output kernels, or, with
      tile storage, the connections of each visited tile: see
      `SparseExperts.route_form`); expert choice runs each expert on its
      `capacity` tokens of the batch; the all-experts path runs every expert
      and the whole route matrix. Shared experts run on every token.
    - Any other layer: the sum of its sublayers.

    Args:
        model: A built Keras model or layer.
        batch_size: The batch the grouped dispatch is laid out for (its padding
            per example shrinks as the batch grows).

    Returns:
        Dict `{layer name: FLOPs per example}` for the counted layers, in model
        order, plus `"total"`.

    Examples:

        >>> import keras, keras_sparse_moe as ksm
        >>> model = keras.Sequential([keras.Input((32,)),
        ...     ksm.layers.SparseDense(64, density=0.1, seed=0, name="hidden"),
        ...     keras.layers.Dense(2, name="out")])
        >>> ksm.reporting.executed_flops(model)
        {'hidden': 4096, 'out': 256, 'total': 4352}
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`executed_flops` expects a Keras model or layer. Received: {type(model).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`executed_flops` needs an int `batch_size`. Received: batch_size={batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(
            f"`executed_flops` needs `batch_size` >= 1. Received: batch_size={batch_size!r}"
        )
    batch_size = int(batch_size)
    if not model.built:
        raise ValueError(f"`executed_flops` needs a built model: '{model.name}' is not built yet.")
    counts = {}
    _count(model, batch_size, counts, top=True)
    counts["total"] = sum(counts.values())
    return counts


def _positions(layer):
    """Positions per example a layer's last axis is applied at (1 for rank-2 inputs)."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):
        return 1
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    middle = shape[1:-1]
    return math.prod(int(d) for d in middle) if all(d is not None for d in middle) else 1


def _count(layer, batch_size, counts, top=False):
    from keras_sparse_moe.layers import SparseDense, SparseExpertMixture, SparseKernelLayer

    if isinstance(layer, SparseExpertMixture):
        counts[layer.name] = _mixture_flops(layer, batch_size)
    elif isinstance(layer, SparseDense):
        counts[layer.name] = 2 * layer.storage.macs_per_row * _positions(layer)
    elif isinstance(
        layer, (SparseKernelLayer, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    ):
        kernel = math.prod(
            layer.weight_shape if isinstance(layer, SparseKernelLayer) else layer.kernel.shape
        )
        output = layer.output.shape
        channel_axis = 1 if getattr(layer, "data_format", None) == "channels_first" else -1
        spatial = [d for i, d in enumerate(output[1:], 1) if i != channel_axis % len(output)]
        counts[layer.name] = 2 * kernel * math.prod(int(d) for d in spatial)
    elif isinstance(layer, keras.layers.Dense):
        counts[layer.name] = 2 * math.prod(layer.kernel.shape) * _positions(layer)
    else:
        for child in find_layers(layer, recursive=False):
            _count(child, batch_size, counts)


def _gate_flops(gate) -> int:
    from keras_sparse_moe.layers import NoisyTopKGate, PTSNEGate

    if isinstance(gate, NoisyTopKGate):  # the clean logits; the noise is training-only
        return 2 * math.prod(gate.gate_kernel.shape)
    counts = {}
    for child in find_layers(gate, recursive=False):
        _count(child, 1, counts)
    flops = sum(counts.values())
    if isinstance(gate, PTSNEGate):  # squared distances from the map to each expert's place
        flops += 3 * gate.n_components * gate.num_experts
    return flops


def _mixture_flops(mixture, batch_size) -> int:
    """Gate + experts (by the inference path) + routes + combine, per example."""
    from keras_sparse_moe.ops import dispatch

    bank, e = mixture.expert_bank, mixture.num_experts
    path = mixture.dispatch_path(training=False, num_tokens=batch_size * _positions(mixture))
    if not hasattr(bank, "expert_hidden"):  # user experts: every sample a token
        counts = {}
        for expert in bank.expert_list:
            _count(expert, batch_size, counts)
        experts = sum(counts.values())
        if path == "expert_choice":  # each expert on its `capacity` samples of the batch
            experts = int(round(experts * _chosen_share(mixture, batch_size)))
        return _gate_flops(mixture.gate) + experts + _shared_flops(mixture, 1)
    tokens = _positions(mixture)
    d, h, u = bank.input_dim, bank.hidden_units, bank.units
    layers = [bank.expert_hidden, bank.expert_output]
    if path == "expert_choice":  # each expert on its `capacity` tokens of the batch
        share = _chosen_share(mixture, batch_size * tokens)
        per_token = e * share * (2 * (d * h + h * u) + 2 * u)
    elif path == "grouped":
        k = mixture.top_k
        count = batch_size * tokens * k
        rows = dispatch._num_rows(count, e, bank.group_block(batch_size * tokens, k))
        per_token = rows / (batch_size * tokens) * 2 * (d * h + h * u)
        form = bank.route_form(batch_size * tokens, k)
        if form == "tiles":  # the ordered pairs of visited experts, by (h, h) tile
            pairs = batch_size * tokens * k * (k - 1)
            block = bank.route_block(batch_size * tokens, k)
            pair_rows = dispatch._num_rows(pairs, e * e, block)
            per_token += pair_rows / (batch_size * tokens) * 2 * h * h
        elif form == "connections":  # each ordered pair reads its tile's slots
            pairs = batch_size * tokens * k * (k - 1)
            per_token += pairs / (batch_size * tokens) * 2 * bank.expert_routes.storage.capacity
        elif form == "folded":  # each row by its (h, E * u) block, after folding once a call
            per_token += rows / (batch_size * tokens) * 2 * h * e * u
            per_token += 2 * e * e * h * h * u / (batch_size * tokens)
        per_token += 2 * k * u  # the weighted combine
    else:
        if bank.has_routes:
            layers.append(bank.expert_routes)
        per_token = sum(2 * layer.storage.macs_per_row for layer in layers)
        per_token += 2 * e * u  # the gate weighting of every expert's output
    flops = _gate_flops(mixture.gate) * tokens + int(round(per_token * tokens))
    return flops + _shared_flops(mixture, tokens)


def _chosen_share(mixture, num_tokens) -> float:
    """Under expert choice, the fraction of a batch's tokens each expert computes."""
    from keras_sparse_moe.ops import dispatch

    factor = mixture.capacity_factor or 1.0
    return dispatch.expert_capacity(num_tokens, mixture.num_experts, mixture.top_k, factor) / (
        num_tokens
    )


def _shared_flops(mixture, tokens) -> int:
    """Every shared expert on every token, their outputs summed."""
    shared = mixture.shared_bank
    if shared is None:
        return 0
    if not hasattr(shared, "expert_hidden"):  # user layers
        counts = {}
        for expert in shared.expert_list:
            _count(expert, 1, counts)
        return sum(counts.values())
    layers = (shared.expert_hidden, shared.expert_output)
    per_token = sum(2 * layer.storage.macs_per_row for layer in layers)
    return tokens * (per_token + 2 * shared.num_experts * shared.units)
