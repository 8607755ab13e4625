"""`find_layers`: the one walk over a model's layers that the library makes.

The only module that reads Keras' private layer-tracking attributes.

Callbacks, `sparsify`, `summary`, the plots, the distribution helpers and the
activation-rate tables all find their layers here, so a layer nested in a
sub-model or inside another layer is found the same way everywhere.
"""

from __future__ import annotations

import keras

__all__ = ["find_layers", "own_trainable_weights"]


def find_layers(model, cls=None, *, include_self=False, recursive=True) -> list:
    """The layers of `model` that are instances of `cls` (any layer when None).

    Walks nested models and layers held by other layers (a mixture's experts
    and gate) in depth-first order, each layer once.

    Args:
        model: A Keras model or layer.
        cls: Optional class or tuple of classes to keep.
        include_self: Whether `model` itself may be returned.
        recursive: False: only `model`'s direct children.

    Examples:

        >>> import keras
        >>> import keras_sparse_moe as ksm
        >>> model = keras.Sequential([keras.Input((8,)), ksm.SparseDense(4, density=0.5, seed=0),
        ...                           keras.layers.Dense(2)])
        >>> [layer.name for layer in find_layers(model, ksm.layers.SparseKernelLayer)]
        ['sparse_dense...']
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`find_layers` expects a Keras model or layer. Received: model={model!r}")
    # Keras' own walk (nested models, layers tracked as attributes or in lists).
    layers = model._flatten_layers(include_self=include_self, recursive=recursive)
    return [layer for layer in layers if cls is None or isinstance(layer, cls)]


def own_trainable_weights(layer) -> list:
    """The trainable variables `layer` creates itself (not those of the layers it holds)."""
    return list(layer._trainable_variables)
