"""Convert tfmot-pruned `tf_keras` models into Keras 3 models with `SparseDense` layers.

Needs the `[tfmot]` extra (tensorflow-model-optimization and tf_keras).
tfmot 0.8 prunes only `tf_keras` (Keras 2) models; this is the way across.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from keras_sparse_moe.conversion import replace_layers

__all__ = ["from_tfmot"]


def _import():
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as error:
        raise ImportError(
            "keras_sparse_moe.interop.tfmot needs tensorflow-model-optimization and tf_keras: "
            "pip install keras-sparse-moe[tfmot]"
        ) from error
    return tfmot, tf_keras


def from_tfmot(model):
    """Returns a Keras 3 copy of a tfmot-pruned `tf_keras` model.

    The model may still carry tfmot's pruning wrappers or be stripped
    (`strip_pruning`). Every `Dense` layer whose kernel has exact zeros (a pruned
    layer) becomes a `SparseDense` whose mask is the kernel's nonzero pattern;
    other layers are rebuilt from their config and keep their weights.
    Sequential and Functional models of built-in layers are supported.

    Examples:

            pruned = tfmot.sparsity.keras.prune_low_magnitude(tf_keras_model, ...)
            pruned.fit(..., callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
            model = keras_sparse_moe.interop.tfmot.from_tfmot(pruned)   # Keras 3
            model.fit(..., callbacks=[keras_sparse_moe.callbacks.SETEvolution()])
    """
    tfmot, tf_keras = _import()
    if not isinstance(model, tf_keras.Model):
        raise TypeError(
            "`from_tfmot` expects a tf_keras (Keras 2) model pruned with tfmot. "
            f"Received: model of type {type(model).__name__}"
        )
    stripped = tfmot.sparsity.keras.strip_pruning(model)
    config = json.loads(stripped.to_json())
    cls = keras.Sequential if config["class_name"] == "Sequential" else keras.Model
    inner = config["config"]
    for key in ("input_layers", "output_layers"):
        # tf_keras lists a single input/output as [[name, 0, 0]]; Keras 3 then
        # expects a list when the model is called: keep the single tensor form.
        value = inner.get(key)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            inner[key] = value[0]
    rebuilt = cls.from_config(inner)
    masks = {}
    for source in stripped.layers:
        weights = source.get_weights()
        if not weights:
            continue
        rebuilt.get_layer(source.name).set_weights(weights)
        if isinstance(source, tf_keras.layers.Dense) and np.any(weights[0] == 0):
            masks[source.name] = (weights[0] != 0).astype("float32")
    return replace_layers(
        rebuilt, lambda layer: {"mask": masks[layer.name]} if layer.name in masks else None
    )
