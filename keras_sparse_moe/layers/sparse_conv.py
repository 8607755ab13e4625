"""`SparseConv1D`, `SparseConv2D`: convolutions whose kernel connections follow a topology.

Same connection storage and contract as `SparseDense` (`SparseKernelLayer`):
the kernel `(*kernel_size, channels, filters)` is seen as the matrix
`(prod(kernel_size) * channels, filters)` whose entries are connections, so
SET, RigL and magnitude pruning evolve it as they evolve a dense kernel.
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

__all__ = ["SparseConv1D", "SparseConv2D"]


@with_connectivity_signature
class _SparseConv(SparseKernelLayer):
    """Shared body of the sparse convolutions (`rank` spatial axes)."""

    rank = None
    paddings = ("valid", "same")

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        groups=1,
        *args,
        **kwargs,
    ):
        owner = type(self).__name__
        filters = validation.check_size("filters", filters, owner)
        kernel_size = validation.check_int_tuple("kernel_size", kernel_size, owner, self.rank)
        super().__init__(filters, kernel_dims=kernel_size, **keras_positional(owner, args, kwargs))
        self.filters = int(filters)
        self.kernel_size = kernel_size
        self.strides = validation.check_int_tuple("strides", strides, owner, self.rank)
        self.dilation_rate = validation.check_int_tuple(
            "dilation_rate", dilation_rate, owner, self.rank
        )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                f"`{owner}` takes `strides` > 1 or `dilation_rate` > 1, not both. Received: "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        padding = padding.lower() if isinstance(padding, str) else padding
        self.padding = validation.check_choice("padding", padding, owner, self.paddings)
        data_format = keras.config.image_data_format() if data_format is None else data_format
        self.data_format = validation.check_choice(
            "data_format", data_format, owner, ("channels_last", "channels_first")
        )
        if groups != 1:
            raise ValueError(
                f"`{owner}` supports `groups=1` only (a sparse kernel already leaves most "
                f"channel pairs unconnected; `allowed` can forbid whole blocks). "
                f"Received: groups={groups!r}"
            )
        self.groups = 1
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2)

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"`{type(self).__name__}` needs a known number of input channels. Received: "
                f"input_shape={input_shape}"
            )
        self._build_kernel(int(channels))
        self.input_spec = keras.layers.InputSpec(
            ndim=self.rank + 2, axes={self._channel_axis: int(channels)}
        )
        self.built = True

    def call(self, inputs):
        padding = self.padding
        if padding == "causal":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            widths = [(0, 0), (left, 0), (0, 0)]
            if self.data_format == "channels_first":
                widths = [(0, 0), (0, 0), (left, 0)]
            inputs, padding = ops.pad(inputs, widths), "valid"
        outputs = ops.conv(
            inputs,
            self.dense_kernel(),
            strides=self.strides,
            padding=padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        return self._add_bias_and_activate(outputs, axis=self._channel_axis)

    def compute_output_shape(self, input_shape):
        input_shape = list(input_shape)
        spatial = input_shape[1:-1] if self.data_format == "channels_last" else input_shape[2:]
        out = []
        for size, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                out.append(None)
            elif self.padding == "valid":
                out.append((size - d * (k - 1) - 1) // s + 1)
            else:  # same, causal
                out.append(-(-size // s))
        if self.data_format == "channels_last":
            return (input_shape[0], *out, self.filters)
        return (input_shape[0], self.filters, *out)

    def get_config(self):
        config = super().get_config()
        return {
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
            **config,
        }


_ARGS = """
    Args:
        filters: Positive int, the number of output channels.
        kernel_size: An int or a tuple of {rank} ints.
        strides: An int or a tuple of {rank} ints (default 1).
        padding: {paddings}.
        data_format: `"channels_last"` (default: `keras.config.image_data_format()`)
            or `"channels_first"`.
        dilation_rate: An int or a tuple of {rank} ints (default 1).
        groups: Only 1 (grouped convolutions are refused with a `ValueError`).
        density, epsilon, topology, mask, connections, implementation,
        topology_kwargs, allowed, activation, use_bias, initializers,
        regularizers, constraints, density_aware_init, seed: As in
            `SparseDense`, over the kernel seen as a `(prod(kernel_size) *
            channels, filters)` matrix: a `mask` has the kernel's shape
            `{kernel}`; `epsilon` counts the kernel dimensions as ERK does
            (`p = epsilon * sum(shape) / prod(shape)`). `implementation="sparse"`
            stores only the connections (O(nnz) weights and optimizer state)
            and scatters them into the small dense kernel at each call.
"""


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SparseConv1D(_SparseConv):
    """1-D convolution (temporal) whose kernel has sparse, topology-defined connections.

    `keras.layers.Conv1D` with the connection contract of `SparseDense`:
    masked kernel entries are exactly zero and stay zero through `fit`
    (eager or XLA, TensorFlow or JAX), and `SETEvolution`, `RigL` and
    `MagnitudePruning` rewire it like a dense kernel.
    {args}
    Examples:

        >>> import numpy as np, keras_sparse_moe
        >>> conv = keras_sparse_moe.layers.SparseConv1D(
        ...     8, 3, density=0.25, padding="causal", seed=0)
        >>> y = conv(np.ones((2, 10, 4), "float32"))
        >>> tuple(y.shape), conv.weight_shape, conv.num_connections
        ((2, 10, 8), (3, 4, 8), 24)
    """

    rank = 1
    paddings = ("valid", "same", "causal")


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SparseConv2D(_SparseConv):
    """2-D convolution whose kernel has sparse, topology-defined connections.

    `keras.layers.Conv2D` with the connection contract of `SparseDense`:
    masked kernel entries are exactly zero and stay zero through `fit`
    (eager or XLA, TensorFlow or JAX), and `SETEvolution`, `RigL` and
    `MagnitudePruning` rewire it like a dense kernel. Convert an existing
    model's `Conv2D` layers with `keras_sparse_moe.sparsify`.
    {args}
    Examples:

        >>> import numpy as np, keras_sparse_moe
        >>> conv = keras_sparse_moe.layers.SparseConv2D(16, 3, density=0.1, padding="same", seed=0)
        >>> y = conv(np.ones((2, 8, 8, 3), "float32"))
        >>> tuple(y.shape), conv.weight_shape, conv.num_connections
        ((2, 8, 8, 16), (3, 3, 3, 16), 43)
    """

    rank = 2


SparseConv1D.__doc__ = SparseConv1D.__doc__.replace(
    "{args}",
    _ARGS.format(
        rank=1,
        paddings='`"valid"`, `"same"` or `"causal"`',
        kernel="(kernel_size, channels, filters)",
    ),
)
SparseConv2D.__doc__ = SparseConv2D.__doc__.replace(
    "{args}",
    _ARGS.format(
        rank=2, paddings='`"valid"` or `"same"`', kernel="(height, width, channels, filters)"
    ),
)
