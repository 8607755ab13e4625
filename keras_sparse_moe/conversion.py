"""`sparsify`: turn the `Dense` layers of a Keras 3 model into `SparseDense`."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sparse_moe.layers import SparseDense

__all__ = ["convert_implementation", "sparsify"]

_SHARED = (
    "units",
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "name",
    "dtype",
    "trainable",
)


def sparsify(
    model,
    density=None,
    epsilon=None,
    topology="erdos_renyi",
    exclude=None,
    seed=None,
    implementation="masked",
):
    """Returns a copy of `model` whose `Dense` layers are `SparseDense`.

    Each converted layer keeps the `Dense` layer's weights wherever its mask
    (drawn from `topology` at `density` or SET's `epsilon`) keeps a connection
    and zero elsewhere; every other layer keeps its weights. The Keras 3
    counterpart of tfmot's `prune_low_magnitude`: follow it with
    `MagnitudePruning` (start from `density=1.0`), `SETEvolution` or `RigL`.
    Works for Sequential and Functional models (Keras' `clone_model`).

    Args:
        model: A built Sequential or Functional Keras model.
        density, epsilon, topology, implementation: As in `SparseDense`
            (`implementation="sparse"` stores only the kept connections).
        exclude: Names of `Dense` layers to leave dense.
        seed: Optional int; layer `i` uses `seed + i`.

    Example:
    >>> import keras, keras_sparse_moe
    >>> dense = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    >>> sparse = keras_sparse_moe.sparsify(dense, density=0.5, exclude=[dense.layers[-1].name])
    >>> [type(layer).__name__ for layer in sparse.layers]
    ['SparseDense', 'Dense']
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`sparsify` expects a Keras 3 model. Received: model of type {type(model).__name__}"
        )
    if isinstance(exclude, str):
        exclude = [exclude]
    excluded = set(exclude or ())
    dense = [layer.name for layer in model.layers if type(layer) is keras.layers.Dense]
    unknown = sorted(excluded - set(dense))
    if unknown:
        raise ValueError(
            f"`sparsify` got `exclude` names that are not Dense layers of model '{model.name}'. "
            f"Its Dense layers: {dense}. Received: exclude={sorted(excluded)}"
        )
    if not set(dense) - excluded:
        raise ValueError(
            f"`sparsify` found no `keras.layers.Dense` layer to convert in model "
            f"'{model.name}' (top-level layers: {[type(x).__name__ for x in model.layers]}, "
            f"excluded: {sorted(excluded) or 'none'})."
        )
    counter = iter(range(10**9))

    def make(layer):
        if layer.name in excluded:
            return None
        index = next(counter)
        return dict(
            density=density,
            epsilon=epsilon,
            topology=topology,
            seed=None if seed is None else seed + index,
            implementation=implementation,
        )

    return replace_dense_layers(model, make)


def convert_implementation(model, implementation):
    """Returns a copy of `model` whose `SparseDense` layers use `implementation`.

    Connections, weights and biases are kept exactly (masked to sparse and
    back); every other layer keeps its weights. A sparse layer has as many
    slots as its configuration draws, so a masked layer converted to sparse
    must not hold more connections than that (pruned layers hold fewer: the
    rest of the slots are parked). Top-level layers of Sequential and
    Functional models are converted (not those inside other layers).

    Example:
    >>> import keras, numpy as np, keras_sparse_moe
    >>> masked = keras.Sequential([keras.Input((8,)),
    ...     keras_sparse_moe.layers.SparseDense(16, density=0.25, seed=0)])
    >>> sparse = keras_sparse_moe.convert_implementation(masked, "sparse")
    >>> x = np.ones((2, 8), "float32")
    >>> sparse.layers[0].implementation, bool(np.allclose(sparse(x), masked(x), atol=1e-6))
    ('sparse', True)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`convert_implementation` expects a Keras 3 model. Received: model of type "
            f"{type(model).__name__}"
        )
    if implementation not in ("masked", "sparse"):
        raise ValueError(
            "`convert_implementation` got an invalid `implementation`. Expected 'masked' or "
            f"'sparse'. Received: implementation={implementation!r}"
        )

    def convert(layer):
        config = layer.get_config()
        if isinstance(layer, SparseDense):
            config["implementation"] = implementation
        return layer.__class__.from_config(config)

    clone = _clone(model, convert)
    for old, new in zip(
        model._flatten_layers(include_self=False), clone._flatten_layers(include_self=False)
    ):
        if isinstance(old, SparseDense) and isinstance(new, SparseDense):
            new.assign_connections(
                *old.connection_indices(), ops.convert_to_numpy(old.connection_values())
            )
            if old.use_bias:
                new.bias.assign(ops.convert_to_numpy(old.bias))
        elif old.weights:
            new.set_weights([np.asarray(ops.convert_to_numpy(w)) for w in old.weights])
    return clone


def _clone(model, clone_function):
    try:
        return keras.models.clone_model(model, clone_function=clone_function)
    except ValueError as error:
        raise ValueError(
            "Converting works on Sequential and Functional models; rebuild a subclassed "
            f"model with `SparseDense` layers instead. Keras said: {error}"
        ) from error


def replace_dense_layers(model, sparse_arguments):
    """Clones `model`, turning each `Dense` layer into a `SparseDense`.

    `sparse_arguments(layer)` returns the SparseDense-only arguments (density,
    mask, ...) for a Dense layer, or None to keep it dense. Weights are copied;
    converted kernels are multiplied by their mask.
    """

    def convert(layer):
        if type(layer) is keras.layers.Dense:
            arguments = sparse_arguments(layer)
            if arguments is not None:
                config = layer.get_config()
                kwargs = {k: config[k] for k in _SHARED if k in config}
                return SparseDense(density_aware_init=False, **arguments, **kwargs)
        return layer.__class__.from_config(layer.get_config())

    clone = _clone(model, convert)
    for old, new in zip(
        model._flatten_layers(include_self=False), clone._flatten_layers(include_self=False)
    ):
        if isinstance(new, SparseDense) and not isinstance(old, SparseDense):
            new.assign_dense_kernel(ops.convert_to_numpy(old.kernel))
            if old.use_bias:
                new.bias.assign(ops.convert_to_numpy(old.bias))
        elif old.weights:
            new.set_weights([np.asarray(ops.convert_to_numpy(w)) for w in old.weights])
    return clone
