"""`SparseDense`: a `Dense`-shaped layer whose connections follow a topology.

Two storages stand behind one connection interface (`SparseKernelLayer`):
`"masked"` (a dense kernel and a binary mask) and `"sparse"` (the nnz values
and their int32 positions: O(nnz) memory and time, for layers far wider than
a dense matrix allows).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sparse_moe import validation
from keras_sparse_moe.layers.sparse_kernel import (
    SparseKernelLayer,
    keras_positional,
    with_connectivity_signature,
)

__all__ = ["SparseDense"]


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
@with_connectivity_signature
class SparseDense(SparseKernelLayer):
    """Densely shaped layer with sparse, topology-defined connectivity.

    Computes `activation(inputs @ (kernel * mask) + bias)` where `mask` is a
    binary `(input_dim, units)` matrix drawn from a named topology at build
    time (or given). The mask is a non-trainable `float32` variable of the
    layer, so it is saved with the model and can be rewired in place by the
    dynamic-sparse-training callbacks. Masked kernel entries are exactly zero
    and stay zero through training: their gradient is masked, so optimizers
    never move them (tested for SGD, momentum, Adam, AdamW and RMSprop, eager
    and `jit_compile=True`, TensorFlow and JAX).

    Density is set by `density`, or by SET's `epsilon`
    (`p = epsilon * (n_in + n_out) / (n_in * n_out)`, Mocanu et al. 2018), or
    by an explicit `mask`. With none of them, `epsilon=20` (SET's default) is
    used, capped at a fully connected layer for small layers.

    Args:
        units: Positive int, dimensionality of the output space.
        density: Float in (0, 1], the fraction of connections kept.
        epsilon: Positive float, SET's sparsity parameter (instead of `density`).
        topology: Name of a builder in `keras_sparse_moe.topologies`:
            `"erdos_renyi"`, `"random_regular"`, `"pseudo_random_regular"`,
            `"structured_regular"`, `"fibonacci"` or `"small_world"`.
        mask: Optional binary array of shape `(input_dim, units)`; overrides
            `density`, `epsilon` and `topology` (small layers only: for
            larger ones pass `connections`).
        connections: Optional connection list `(rows, cols)` (two int arrays,
            or one `(nnz, 2)` array): input `rows[k]` feeds output `cols[k]`.
            Overrides `density`, `epsilon` and `topology`, like `mask`.
        implementation: `"masked"`: a dense kernel whose masked entries are
            zero (fastest for small layers, on accelerators, and above a few
            percent density). `"sparse"`: only the connections' values are
            stored (trainable) with their int32 positions (not trainable);
            memory and time grow with the number of connections, not with
            `input_dim * units`, and nothing of the kernel's dense shape is
            ever made. Both compute the same function and take the same
            callbacks.
        topology_kwargs: Optional dict of extra arguments for the topology
            builder, e.g. `{"num_clusters": 8}` for `"small_world"`.
        allowed: Where connections may exist: None (anywhere), a
            `keras_sparse_moe.topologies.BlockPattern`, or a binary
            `(input_dim, units)` array. The initial mask must lie inside it
            (`"erdos_renyi"` draws inside it), and SET and RigL grow only there.
        activation: Activation function (see `keras.activations`).
        use_bias: Whether the layer uses a bias vector.
        kernel_initializer: Initializer for the kernel (masked after drawing).
        bias_initializer: Initializer for the bias.
        kernel_regularizer, bias_regularizer, activity_regularizer: Optional
            regularizers, as in `keras.layers.Dense`.
        kernel_constraint, bias_constraint: Optional constraints.
        density_aware_init: If True (default) and `kernel_initializer` is a
            `keras.initializers.VarianceScaling` (Glorot, He, LeCun, ...), its
            fan-in and fan-out count only kept connections: the drawn kernel
            is scaled by `1 / sqrt(density)`, so activations keep the variance
            the initializer intends (Evci et al. 2020 use the same scaling).
        seed: Optional non-negative int making the topology reproducible.
        n_m: Optional N:M structured sparsity `(n, m)` along the input axis
            (tfmot's `sparsity_m_by_n`; 2:4 for sparse tensor cores): every
            group of `m` consecutive inputs keeps exactly `n` connections to
            each output. Alone, a random N:M pattern is drawn; with
            `density=1.0` the layer starts dense for `MagnitudePruning` to
            prune to N:M. SET and RigL then rewire inside each group, so
            every group keeps exactly `n`. `input_dim` must be a multiple of
            `m`; the other connectivity arguments are refused.
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(..., input_dim)`.

    Input shape:
        N-D tensor `(batch_size, ..., input_dim)`; the last axis is mixed.

    Output shape:
        N-D tensor `(batch_size, ..., units)`.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> layer = keras_sparse_moe.layers.SparseDense(64, density=0.1, seed=0)
        >>> y = layer(np.ones((2, 32), dtype="float32"))
        >>> tuple(y.shape), layer.num_connections
        ((2, 64), 205)

        A layer far too wide for a dense kernel (10^10 entries), storing only its
        4 million connections:

        >>> wide = keras_sparse_moe.layers.SparseDense(
        ...     100_000, epsilon=20, implementation="sparse", seed=0)
        >>> wide.build((None, 100_000))
        >>> wide.num_connections, [tuple(v.shape) for v in wide.storage_variables]
        (4000000, [(4000000,), (4000000,), (4000000,)])
    """

    def __init__(self, units, *args, **kwargs):
        units = validation.check_size("units", units, "SparseDense")
        super().__init__(units, **keras_positional("SparseDense", args, kwargs))
        self.units = int(units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "`SparseDense` needs a known last input dimension. Received: "
                f"input_shape={input_shape}"
            )
        input_dim = int(input_dim)
        self._build_kernel(input_dim)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.built = True

    def call(self, inputs):
        if len(inputs.shape) == 2:
            return self._add_bias_and_activate(self.storage.matmul(inputs))
        flat = ops.reshape(inputs, (-1, self.kernel_shape[0]))
        outputs = ops.reshape(self.storage.matmul(flat), (*ops.shape(inputs)[:-1], self.units))
        return self._add_bias_and_activate(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        return {"units": self.units, **config}
