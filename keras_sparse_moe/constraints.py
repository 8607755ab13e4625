"""`MaskConstraint`: a fixed binary mask on any Keras layer's weight.

Use it to keep a static connection pattern on a layer of any type
(`Dense`, `Conv2D`, `EinsumDense`, ...) without changing the layer: pass it
as `kernel_constraint=` and the optimizer zeroes the masked entries after
every step. Use the sparse layers (`SparseDense`, `SparseConv1D`,
`SparseConv2D`) instead when the pattern should change during training (SET,
RigL, pruning), when masked entries must stay zero in the optimizer's state
too (their gradient is masked, not only their value), or for storage that
grows with the connections only (`implementation="sparse"`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sparse_moe.ops.masking import decode_mask, encode_mask

__all__ = ["MaskConstraint", "apply_mask_constraints"]


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class MaskConstraint(keras.constraints.Constraint):
    """Keeps a weight exactly zero wherever a static binary `mask` is 0.

    Keras applies a constraint after each optimizer step (on TensorFlow and
    JAX, eagerly or under `jit_compile`), so after every step the masked
    entries are exactly zero; the mask is saved in the layer's config (bit
    packed) and survives `.keras` saving. The freshly initialised weight is
    not masked yet: call `apply_mask_constraints(model)` once after building
    (it also checks every mask's shape against its weight).

    A masked entry still receives gradients, so the optimizer's state
    (momentum, Adam moments) moves there; the constraint zeroes the weight
    itself. The sparse layers mask the gradient instead and can be rewired:
    see the module's docstring for when to use which.

    Args:
        mask: Binary array of the weight's shape (e.g. `(input_dim, units)`
            for a `Dense` kernel, `(height, width, channels, filters)` for a
            `Conv2D` kernel).

    Examples:

        >>> import numpy as np, keras, keras_sparse_moe as ksm
        >>> mask = np.eye(4, 3)
        >>> layer = keras.layers.Dense(3, kernel_constraint=ksm.constraints.MaskConstraint(mask))
        >>> model = keras.Sequential([keras.Input((4,)), layer])
        >>> ksm.constraints.apply_mask_constraints(model)
        1
        >>> model.compile("sgd", "mse")
        >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 3)), verbose=0)
        >>> bool(np.all(keras.ops.convert_to_numpy(layer.kernel)[mask == 0] == 0))
        True
    """

    def __init__(self, mask):
        try:
            array = np.asarray(decode_mask(mask), dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise TypeError(
                "`MaskConstraint` got an invalid `mask`. Expected a binary array. "
                f"Received: mask of type {type(mask).__name__} ({error})"
            ) from None
        if array.ndim == 0 or array.size == 0:
            raise ValueError(
                "`MaskConstraint` needs a mask with at least one axis and one entry. "
                f"Received: mask.shape={array.shape}"
            )
        if not np.all((array == 0) | (array == 1)):
            bad = np.unique(array[(array != 0) & (array != 1)])[:5]
            raise ValueError(
                "`MaskConstraint` got a non-binary `mask`. Expected only 0 and 1. "
                f"Received values such as {bad.tolist()}"
            )
        self.mask = array

    @property
    def num_connections(self) -> int:
        """Entries the mask keeps."""
        return int(np.count_nonzero(self.mask))

    def check(self, shape, name="the weight"):
        """Raises a `ValueError` unless the mask has `shape`."""
        if tuple(shape) != self.mask.shape:
            raise ValueError(
                f"`MaskConstraint` on {name}: the mask's shape {self.mask.shape} differs from "
                f"the weight's {tuple(shape)}. Give a mask of the weight's shape."
            )

    def __call__(self, w):
        self.check(w.shape)
        w = ops.convert_to_tensor(w)
        mask = ops.convert_to_tensor(self.mask)
        # A select, not a product: a masked entry is zero whatever it held (NaN included).
        return ops.where(mask > 0, w, ops.zeros_like(w))

    def get_config(self):
        return {"mask": encode_mask(self.mask)}


def apply_mask_constraints(model) -> int:
    """Applies every `MaskConstraint` of `model`'s (or a layer's) weights now.

    Keras applies constraints only after optimizer steps; call this once
    after building so the initial weights follow their masks too. Checks
    each mask's shape against its weight (a `ValueError` names the weight).
    Returns the number of weights masked.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`apply_mask_constraints` expects a Keras model or layer. Received: "
            f"{type(model).__name__}"
        )
    count = 0
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        if isinstance(constraint, MaskConstraint):
            constraint.check(variable.shape, f"weight '{variable.path}'")
            variable.assign(constraint(variable))
            count += 1
    return count
