"""`SparseDense`: a `Dense`-shaped layer whose connections follow a topology.

Two storages stand behind one connection interface: `"masked"` (a dense
kernel and a binary mask) and `"sparse"` (the nnz values and their int32
positions: O(nnz) memory and time, for layers far wider than a dense matrix
allows).
"""

from __future__ import annotations

import base64
import copy
import functools

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

from keras_sparse_moe import topologies
from keras_sparse_moe.ops.masking import decode_mask, encode_mask, mask_gradient
from keras_sparse_moe.ops.sparse_matmul import sparse_matmul

__all__ = ["SparseDense"]

IMPLEMENTATIONS = ("masked", "sparse")
_DEFAULT_EPSILON = 20.0
# Largest number of entries (input_dim * units) for which a dense array of the
# kernel's shape is made (a masked kernel, a dense mask, a dense view): 2**28
# float32 entries take 1 GiB.
DENSE_LIMIT = 1 << 28


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SparseDense(keras.layers.Layer):
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
            `"erdos_renyi"`, `"random_regular"`, `"structured_regular"`,
            `"fibonacci"` or `"small_world"`.
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
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(..., input_dim)`.

    Input shape:
        N-D tensor `(batch_size, ..., input_dim)`; the last axis is mixed.

    Output shape:
        N-D tensor `(batch_size, ..., units)`.

    Example:

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

    def __init__(
        self,
        units,
        density=None,
        epsilon=None,
        topology="erdos_renyi",
        mask=None,
        implementation="masked",
        topology_kwargs=None,
        allowed=None,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        density_aware_init=True,
        seed=None,
        connections=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        owner = "SparseDense"
        units = topologies.check_size("units", units, owner)
        if density is not None and epsilon is not None:
            raise ValueError(
                f"`{owner}` takes either `density` or `epsilon`, not both. "
                f"Received: density={density}, epsilon={epsilon}"
            )
        if density is not None:
            density = topologies.check_density(density, owner)
        if epsilon is not None:
            epsilon = topologies.check_epsilon(epsilon, owner)
        topologies.get(topology)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"`{owner}` got an invalid `implementation`. Expected one of "
                f"{IMPLEMENTATIONS}. Received: implementation={implementation!r}"
            )
        if topology_kwargs is not None and not isinstance(topology_kwargs, dict):
            raise TypeError(
                f"`{owner}` got an invalid `topology_kwargs`. Expected a dict "
                f"or None. Received: topology_kwargs={topology_kwargs!r}"
            )
        self.seed = topologies.check_seed(seed, owner)
        if (
            topology_kwargs
            and "degree" in topology_kwargs
            and (
                density is not None
                or epsilon is not None
                or mask is not None
                or connections is not None
            )
        ):
            raise ValueError(
                f"`{owner}` takes a `degree` in `topology_kwargs` or a "
                "`density`/`epsilon`/`mask`/`connections`, not both. Received: "
                f"topology_kwargs={topology_kwargs}, density={density}, "
                f"epsilon={epsilon}"
            )
        if connections is not None:
            if density is not None or epsilon is not None or mask is not None:
                raise ValueError(
                    f"`{owner}` takes `connections` or a `mask`/`density`/`epsilon`, not "
                    f"both. Received: density={density}, epsilon={epsilon}, "
                    f"mask={'given' if mask is not None else None} with connections"
                )
            connections = _check_connections(connections, units, owner)
        if mask is not None:
            if density is not None or epsilon is not None:
                raise ValueError(
                    f"`{owner}` takes a `mask` or a `density`/`epsilon`, not "
                    f"both. Received: density={density}, epsilon={epsilon} with "
                    "a mask"
                )
            mask = decode_mask(mask)
            if mask.size > DENSE_LIMIT:
                raise ValueError(
                    f"`{owner}` got a dense `mask` of shape {mask.shape}, too large to "
                    f"densify (more than {DENSE_LIMIT} entries). Pass the positions "
                    "instead: `connections=(rows, cols)` with implementation='sparse'."
                )
            if mask.ndim != 2 or mask.shape[1] != units:
                raise ValueError(
                    f"`{owner}` got a `mask` of the wrong shape. Expected "
                    f"(input_dim, units={units}). Received: mask.shape="
                    f"{mask.shape}"
                )
            if not np.all((mask == 0) | (mask == 1)):
                bad = np.unique(mask[(mask != 0) & (mask != 1)])[:5]
                raise ValueError(
                    f"`{owner}` got a non-binary `mask`. Expected only 0 and 1. "
                    f"Received values such as {bad.tolist()}"
                )
            mask = mask.astype(np.float32)
        if allowed is not None and not isinstance(allowed, topologies.BlockPattern):
            try:
                allowed = topologies.BlockPattern(decode_mask(allowed))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"`{owner}` got an invalid `allowed`. Expected None, a "
                    "`keras_sparse_moe.topologies.BlockPattern` or a binary 2-D array. "
                    f"Received: allowed={allowed!r} ({error})"
                ) from None
        self.allowed = allowed
        self.units = int(units)
        self.density = density
        self.epsilon = epsilon
        self.topology = topology
        self.mask_value = mask
        self.connections_value = connections
        self.implementation = implementation
        self.topology_kwargs = dict(topology_kwargs or {})
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        if not isinstance(density_aware_init, bool):
            raise TypeError(
                f"`{owner}` got an invalid `density_aware_init`. Expected a bool. "
                f"Received: density_aware_init={density_aware_init!r}"
            )
        self.density_aware_init = density_aware_init
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        self._dense_gradient = False
        # RigL's growth scores on the sparse storage: (values, rows, cols) of
        # zero-valued probe connections, set only while its function is traced.
        self._probe = None
        # Storage-side caches behind the connection interface (not configuration):
        # the connection list and the compiled rewiring functions.
        self._positions = None
        self._num_active = None
        self._rewire_functions = {}
        if implementation == "sparse" and kernel_constraint is not None:
            if not isinstance(self.kernel_constraint, constraints.NonNeg):
                raise ValueError(
                    f"`{owner}` with implementation='sparse' takes only elementwise kernel "
                    "constraints (`NonNeg`): the others act on rows or columns of a dense "
                    f"kernel. Received: kernel_constraint={kernel_constraint!r}"
                )

    # ------------------------------------------------------------------ #
    def _density_for(self, input_dim):
        if self.density is not None:
            return self.density
        if self.epsilon is not None:
            return topologies.density_from_epsilon(self.epsilon, input_dim, self.units)
        return min(1.0, _DEFAULT_EPSILON * (input_dim + self.units) / (input_dim * self.units))

    def _draw_connections(self, input_dim):
        """int32 `(rows, cols)` of the connections this layer's arguments define for
        `input_dim` inputs. Erdős–Rényi and given lists make no dense array; the
        other topologies build their mask (refused above `DENSE_LIMIT` entries)."""
        shape = (input_dim, self.units)
        size = input_dim * self.units
        if self.connections_value is not None:
            rows, cols = self.connections_value
            if rows.size and int(rows.max()) >= input_dim:
                raise ValueError(
                    f"`SparseDense` '{self.name}' got `connections` with rows up to "
                    f"{int(rows.max())}, out of range for {input_dim} inputs. Expected rows "
                    f"in [0, {input_dim})."
                )
            return rows, cols
        if self.mask_value is not None:
            if self.mask_value.shape[0] != input_dim:
                raise ValueError(
                    "`SparseDense` got a `mask` that does not match its input. "
                    f"Expected shape ({input_dim}, {self.units}). Received: "
                    f"mask.shape={self.mask_value.shape}"
                )
            rows, cols = np.nonzero(self.mask_value)
            return rows.astype(np.int32), cols.astype(np.int32)
        if self.topology == "erdos_renyi" and "degree" not in self.topology_kwargs:
            density = self._density_for(input_dim)
            count = max(1, int(round(density * size)))
            if self.allowed is not None:
                self.allowed.check(shape, "SparseDense")
                room = self.allowed.count(shape)
                if count > room:
                    raise ValueError(
                        f"`SparseDense` '{self.name}' asks for {count} connections but its "
                        f"`allowed` pattern has room for {room} of the {size}. Lower "
                        f"`density`. Received: density={density:.4g}"
                    )
            return topologies.erdos_renyi_positions(
                input_dim, self.units, count, seed=self.seed, allowed=self.allowed
            )
        if size > DENSE_LIMIT:
            raise ValueError(
                f"`SparseDense` '{self.name}': topology {self.topology!r} builds a dense mask, "
                f"and a {shape} kernel is too large to densify (more than {DENSE_LIMIT} "
                "entries). Use topology='erdos_renyi' or pass `connections=(rows, cols)`."
            )
        builder = topologies.get(self.topology)
        if "degree" in self.topology_kwargs:
            mask = builder(input_dim, self.units, seed=self.seed, **self.topology_kwargs)
        else:
            mask = builder(
                input_dim,
                self.units,
                density=self._density_for(input_dim),
                seed=self.seed,
                **self.topology_kwargs,
            )
        rows, cols = np.nonzero(mask)
        return rows.astype(np.int32), cols.astype(np.int32)

    def _check_inside_allowed(self, rows, cols, shape):
        if self.allowed is None:
            return
        self.allowed.check(shape, "SparseDense")
        outside = int(np.count_nonzero(~self.allowed.allows(rows, cols, shape)))
        if outside:
            if self.connections_value is not None:
                source = "its `connections`"
            elif self.mask_value is not None:
                source = "its `mask`"
            else:
                source = f"topology {self.topology!r}"
            raise ValueError(
                f"`SparseDense` '{self.name}': {outside} connections of {source} lie outside "
                f"its `allowed` pattern ({self.allowed!r}). Give connections inside it, or use "
                "topology='erdos_renyi', which draws inside it."
            )

    @property
    def num_allowed(self) -> int:
        """Positions where a connection may exist (all of the kernel without `allowed`)."""
        shape = self.kernel_shape
        return int(np.prod(shape)) if self.allowed is None else self.allowed.count(shape)

    @property
    def allowed_positions(self):
        """None (anywhere), or `f(flat_positions) -> bool tensor`: where `allowed`
        lets a connection exist. `keras.ops` only: growth steps call it compiled."""
        if self.allowed is None:
            return None
        return functools.partial(self.allowed.contains, shape=self.kernel_shape)

    @property
    def allowed_indices(self):
        """None (anywhere), or `f(rows, cols) -> bool tensor`, as `allowed_positions`."""
        if self.allowed is None:
            return None
        return functools.partial(self.allowed.contains_indices, shape=self.kernel_shape)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "`SparseDense` needs a known last input dimension. Received: "
                f"input_shape={input_shape}"
            )
        input_dim = int(input_dim)
        shape = (input_dim, self.units)
        if self.implementation == "masked" and input_dim * self.units > DENSE_LIMIT:
            raise ValueError(
                f"`SparseDense` '{self.name}' with implementation='masked' would store a dense "
                f"{shape} kernel (more than {DENSE_LIMIT} entries). Use implementation='sparse'."
            )
        rows, cols = self._draw_connections(input_dim)
        self._check_inside_allowed(rows, cols, shape)
        self._kernel_shape = shape
        count = len(rows)
        scale = 1.0
        if self.density_aware_init and isinstance(
            self.kernel_initializer, initializers.VarianceScaling
        ):
            scale = float(np.sqrt(input_dim * self.units / max(1, count)))
        if self.implementation == "masked":
            self._build_masked(shape, rows, cols, scale)
        else:
            self._build_sparse(shape, rows, cols, scale)
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.built = True

    def _build_masked(self, shape, rows, cols, scale):
        mask = np.zeros(shape, np.float32)
        mask[rows, cols] = 1.0
        self.mask = self.add_weight(
            name="mask",
            shape=shape,
            initializer=initializers.Constant(mask),
            dtype="float32",
            trainable=False,
            autocast=False,
        )
        self.kernel = self.add_weight(
            name="kernel",
            shape=shape,
            # Masked at creation: `build` may run in a stateless scope where an
            # `assign` would be dropped.
            initializer=lambda shape, dtype: ops.multiply(
                self.kernel_initializer(shape, dtype), ops.cast(mask * scale, dtype)
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    def _build_sparse(self, shape, rows, cols, scale):
        count = len(rows)
        self.values = self.add_weight(
            name="values",
            shape=(count,),
            initializer=initial_values(self.kernel_initializer, shape, count, scale),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        for name, array in (("rows", rows), ("cols", cols)):
            variable = self.add_weight(
                name=name,
                shape=(count,),
                initializer=lambda _, dtype, array=array: ops.convert_to_tensor(array, "int32"),
                dtype="int32",
                trainable=False,
            )
            setattr(self, name, variable)

    def apply_mask(self):
        """Restores the storage invariant after an external assign: masked, the kernel
        is zeroed wherever the mask is 0; sparse, parked slots hold zero."""
        if self.implementation == "masked":
            kernel = ops.convert_to_tensor(self.kernel)
            self.kernel.assign(ops.where(ops.convert_to_tensor(self.mask) > 0, kernel, 0.0))
        else:
            active = ops.convert_to_tensor(self.rows) < self.kernel_shape[0]
            self.values.assign(ops.where(active, ops.convert_to_tensor(self.values), 0.0))
        self.refresh_connections()

    # ------------------------------------------------------------------ #
    # Connections: what callbacks, conversion, plots and the mixture use, whatever
    # the storage. Positions are flat row-major indices into (input_dim, units).
    @property
    def kernel_shape(self) -> tuple:
        """`(input_dim, units)`: the shape of the dense weight matrix this layer stands for."""
        self._require_built("kernel_shape")
        return self._kernel_shape

    @property
    def storage_variables(self) -> list:
        """The variables holding the connections: masked `[kernel, mask]`, sparse
        `[values, rows, cols]`. The first is the trainable one."""
        self._require_built("storage_variables")
        if self.implementation == "masked":
            return [self.kernel, self.mask]
        return [self.values, self.rows, self.cols]

    def _active_slots(self):
        """numpy indices of the sparse storage's occupied (not parked) slots."""
        return np.flatnonzero(np.asarray(ops.convert_to_numpy(self.rows)) < self.kernel_shape[0])

    def connection_indices(self):
        """int32 numpy `(rows, cols)` of the connections (any layer size), in the
        order of `connection_values()`."""
        self._require_built("connection_indices")
        if self.implementation == "masked":
            flat = np.asarray(ops.convert_to_numpy(self.connection_positions()))
            return (flat // self.units).astype(np.int32), (flat % self.units).astype(np.int32)
        slots = self._active_slots()
        rows = np.asarray(ops.convert_to_numpy(self.rows))[slots]
        return rows, np.asarray(ops.convert_to_numpy(self.cols))[slots]

    def connection_positions(self):
        """int32 `(num_connections,)` flat positions of the connections.

        Masked: increasing after a rebuild (a rewiring keeps each replaced
        connection's slot); a cache of the mask, the source of truth, rebuilt
        after weights are set or loaded, and whenever a rewiring step finds it
        stale (`refresh_connections`). Sparse: in slot order; only for layers
        of fewer than 2**31 entries (use `connection_indices` beyond).
        """
        self._require_built("connection_positions")
        if self._positions is None:
            if self.implementation == "masked":
                mask = np.asarray(ops.convert_to_numpy(self.mask)).ravel()
                flat = np.flatnonzero(mask)
            else:
                if int(np.prod(self.kernel_shape)) > 2**31 - 1:
                    raise ValueError(
                        f"`SparseDense` '{self.name}' has a {self.kernel_shape} kernel: flat "
                        "positions overflow int32. Use `connection_indices()`."
                    )
                rows, cols = self.connection_indices()
                flat = rows.astype(np.int64) * self.units + cols
            self._positions = ops.convert_to_tensor(flat.astype("int32"))
        return self._positions

    def connection_values(self):
        """The `(num_connections,)` weights, in the order of the positions."""
        if self.implementation == "masked":
            return ops.take(ops.reshape(self.kernel, (-1,)), self.connection_positions())
        return ops.take(self.values, self._active_slots())

    def refresh_connections(self):
        """Forgets the cached connection list (after the storage was changed elsewhere)."""
        self._positions = None
        self._num_active = None

    def _check_densifiable(self, what):
        if int(np.prod(self.kernel_shape)) > DENSE_LIMIT:
            raise ValueError(
                f"`SparseDense.{what}` would make a dense {self.kernel_shape} array (more than "
                f"{DENSE_LIMIT} entries). Use `connection_indices()` and "
                "`connection_values()` instead."
            )

    def dense_mask(self) -> np.ndarray:
        """Boolean `(input_dim, units)` numpy array of the connections (small layers)."""
        self._require_built("dense_mask")
        if self.implementation == "masked":
            return np.asarray(ops.convert_to_numpy(self.mask)) > 0
        self._check_densifiable("dense_mask")
        mask = np.zeros(self.kernel_shape, bool)
        mask[self.connection_indices()] = True
        return mask

    def assign_dense_kernel(self, values):
        """Sets the weights from a dense `(input_dim, units)` array; only connected
        positions are kept (the rest stays exactly zero)."""
        values = np.asarray(values)
        if values.shape != self.kernel_shape:
            raise ValueError(
                f"`SparseDense.assign_dense_kernel` needs an array of shape {self.kernel_shape}. "
                f"Received: shape {values.shape}"
            )
        if self.implementation == "masked":
            kept = np.where(self.dense_mask(), values, 0)
            self.kernel.assign(kept.astype(self.kernel.dtype))
            return
        n_in = self.kernel_shape[0]
        rows = np.asarray(ops.convert_to_numpy(self.rows))
        cols = np.asarray(ops.convert_to_numpy(self.cols))
        active = rows < n_in
        kept = np.where(active, values[np.minimum(rows, n_in - 1), cols], 0)
        self.values.assign(kept.astype(self.values.dtype))

    def assign_connections(self, rows, cols, values):
        """Replaces the connections with `(rows[k], cols[k])` holding `values[k]`.

        Masked: any number of them. Sparse: at most the layer's slot count
        (`storage_variables[0].shape[0]`); the slots left over are parked.
        Optimizer state is not touched (for fresh layers, e.g. conversion).
        """
        self._require_built("assign_connections")
        rows, cols = _check_connections((rows, cols), self.units, "assign_connections")
        values = np.asarray(values, np.float32).ravel()
        n_in = self.kernel_shape[0]
        if values.shape != rows.shape or (rows.size and int(rows.max()) >= n_in):
            raise ValueError(
                "`SparseDense.assign_connections` needs one value per connection and rows "
                f"below {n_in}. Received: {rows.size} positions, {values.size} values, "
                f"largest row {int(rows.max()) if rows.size else None}"
            )
        if self.implementation == "masked":
            mask = np.zeros(self.kernel_shape, np.float32)
            kernel = np.zeros(self.kernel_shape, np.float32)
            mask[rows, cols], kernel[rows, cols] = 1.0, values
            self.mask.assign(mask)
            self.kernel.assign(kernel.astype(self.kernel.dtype))
        else:
            slots = int(self.values.shape[0])
            if rows.size > slots:
                raise ValueError(
                    f"`SparseDense` '{self.name}' has {slots} connection slots. Received "
                    f"{rows.size} connections: build it with a higher density."
                )
            pad = slots - rows.size
            self.rows.assign(np.pad(rows, (0, pad), constant_values=n_in))
            self.cols.assign(np.pad(cols, (0, pad)))
            self.values.assign(np.pad(values, (0, pad)).astype(self.values.dtype))
        self.refresh_connections()

    def rewire(self, step, optimizer, key=(), *args):
        """Runs a compiled rewiring `step` on this layer's storage, in place; returns its output.

        `step(state, positions, *args) -> (new_state, new_positions, aux)`:
        `state` is the flat `storage_variables` followed by the optimizer
        slots of the trainable one (momenta, Adam moments), so a step can
        reset them where it changes connections. Masked: `positions` is the
        current connection list and `new_positions` (or None: rebuild from
        the mask) becomes it. Sparse: `positions` is None (the storage is the
        list) and `new_positions` is ignored. The step is compiled once per
        (`step`, `key`, variables): a `functools.partial`'s bound values must
        be covered by `key`.
        """
        from keras_sparse_moe import _runtime
        from keras_sparse_moe.ops import rewiring

        storage = self.storage_variables
        slots = [] if optimizer is None else _runtime.optimizer_slots(optimizer, storage[0])
        variables = [*storage, *slots]
        name = getattr(step, "func", step)
        cache_key = (name, tuple(id(v) for v in variables), key)
        function = self._rewire_functions.get(cache_key)
        masked = self.implementation == "masked"
        if function is None:

            def update(state, *call_args):
                if masked:
                    positions, call_args = call_args[0], call_args[1:]
                else:
                    positions = None
                new_state, new_positions, aux = step(state, positions, *call_args)
                return new_state, (new_positions if masked else None, aux)

            function = rewiring.compile_update(update, variables)
            self._rewire_functions[cache_key] = function
        if masked:
            new_positions, aux = function(self.connection_positions(), *args)
            self._positions = new_positions
        else:
            _, aux = function(*args)
            self.refresh_connections()
        return aux

    def dense_kernel(self):
        """The kernel as an `(input_dim, units)` tensor (small layers).

        Masked: the stored kernel, whose gradient is zero where the mask is
        (the stored kernel is already zero there, so the forward pass needs no
        multiply); RigL flips `_dense_gradient` (outside compiled steps) to
        read the gradient at empty positions. Sparse: the values scattered
        into a dense array (differentiable in the values). Layers that
        contract the kernel their own way read it through this method.
        """
        if self.implementation == "sparse":
            self._check_densifiable("dense_kernel")
            n_in, n_out = self.kernel_shape
            # Parked slots (row n_in) land in an extra row, cut off.
            flat = ops.cast(self.rows, "int32") * n_out + ops.cast(self.cols, "int32")
            dense = ops.scatter(ops.expand_dims(flat, -1), self.values, ((n_in + 1) * n_out,))
            return ops.reshape(dense, (n_in + 1, n_out))[:n_in]
        return self.kernel if self._dense_gradient else mask_gradient(self.kernel, self.mask)

    def call(self, inputs):
        if self.implementation == "sparse":
            outputs = self._sparse_call(inputs)
        else:
            outputs = ops.matmul(inputs, self.dense_kernel())
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs)

    def _sparse_call(self, inputs):
        n_in = self.kernel_shape[0]
        flat = inputs if len(inputs.shape) == 2 else ops.reshape(inputs, (-1, n_in))
        values, rows, cols = self.values, self.rows, self.cols
        if self._probe is not None:
            values, rows, cols = (
                ops.concatenate([ops.cast(a, b.dtype), b])
                for a, b in zip((values, rows, cols), self._probe)
            )
        outputs = sparse_matmul(flat, values, rows, cols, self.units)
        if len(inputs.shape) == 2:
            return outputs
        return ops.reshape(outputs, (*ops.shape(inputs)[:-1], self.units))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    # Keep the storage invariant when weights come from outside the optimizer.
    def set_weights(self, weights):
        super().set_weights(weights)
        self.apply_mask()

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.apply_mask()

    # ------------------------------------------------------------------ #
    @property
    def num_connections(self) -> int:
        """Number of connections kept."""
        self._require_built("num_connections")
        if self.implementation == "masked":
            return int(self.connection_positions().shape[0])
        if self._num_active is None:
            self._num_active = int(self._active_slots().size)
        return self._num_active

    @property
    def actual_density(self) -> float:
        """Fraction of the `input_dim * units` possible connections kept."""
        self._require_built("actual_density")
        return self.num_connections / int(np.prod(self.kernel_shape))

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"`SparseDense.{what}` is known once the layer is built: call it "
                "on an input or call `build(input_shape)` first."
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "density": self.density,
                "epsilon": self.epsilon,
                "topology": self.topology,
                "mask": None if self.mask_value is None else encode_mask(self.mask_value),
                "connections": None
                if self.connections_value is None
                else _encode_connections(self.connections_value),
                "implementation": self.implementation,
                "topology_kwargs": dict(self.topology_kwargs),
                "allowed": None if self.allowed is None else self.allowed.get_config()["blocks"],
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
                "density_aware_init": self.density_aware_init,
                "seed": self.seed,
            }
        )
        return config


def initial_values(initializer, shape, count, scale=1.0):
    """`(shape, dtype) -> (count,)` values drawn as `initializer` would draw them at
    `count` positions of a `shape` kernel, without drawing the dense kernel:
    `VarianceScaling` (Glorot, He, LeCun, ...) keeps the fans of `shape` (its
    draws scaled by `scale`); elementwise initializers draw `count` values."""
    if not isinstance(initializer, initializers.VarianceScaling):
        return lambda _, dtype: initializer((count,), dtype)
    fan_in, fan_out = shape
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    variance = initializer.scale / max(1.0, fan[initializer.mode]) * scale**2
    # The same distribution drawn for `(count, 1)`, where fan_in is `count`.
    draw = copy.copy(initializer)
    draw.scale, draw.mode = variance * count, "fan_in"
    draw.input_axes = draw.output_axes = None
    return lambda _, dtype: ops.reshape(draw((count, 1), dtype), (count,))


def _encode_connections(connections) -> dict:
    """`(rows, cols)` as a JSON-friendly dict of base64 int32 bytes (for `get_config`)."""
    rows, cols = connections
    return {
        "rows": base64.b64encode(np.asarray(rows, "<i4").tobytes()).decode("ascii"),
        "cols": base64.b64encode(np.asarray(cols, "<i4").tobytes()).decode("ascii"),
    }


def _check_connections(connections, units, owner):
    """A connection list as int32 numpy `(rows, cols)`, checked: integer, 1-D, equal
    lengths, non-negative, columns below `units`, no position twice."""
    if isinstance(connections, dict) and set(connections) == {"rows", "cols"}:
        connections = tuple(
            np.frombuffer(base64.b64decode(connections[k]), "<i4") for k in ("rows", "cols")
        )
    if not isinstance(connections, (tuple, list)):
        array = np.asarray(connections)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(
                f"`{owner}` got invalid `connections`. Expected (rows, cols) or an (nnz, 2) "
                f"array. Received: array of shape {array.shape}"
            )
        connections = (array[:, 0], array[:, 1])
    if len(connections) != 2:
        raise ValueError(
            f"`{owner}` got invalid `connections`. Expected (rows, cols). Received "
            f"{len(connections)} arrays"
        )
    rows, cols = (np.asarray(a) for a in connections)
    if rows.size == 0 and cols.size == 0:
        raise ValueError(f"`{owner}` got empty `connections`: a layer needs at least one.")
    for name, array in (("rows", rows), ("cols", cols)):
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"`{owner}` got invalid `connections`: {name} must be a 1-D integer array. "
                f"Received: dtype {array.dtype}, shape {array.shape}"
            )
    if rows.shape != cols.shape:
        raise ValueError(
            f"`{owner}` got `connections` with {rows.size} rows and {cols.size} cols. "
            "Expected equal lengths."
        )
    if int(rows.min()) < 0 or int(cols.min()) < 0 or int(cols.max()) >= units:
        raise ValueError(
            f"`{owner}` got out-of-range `connections`. Expected rows >= 0 and cols in "
            f"[0, {units}). Received: rows in [{int(rows.min())}, {int(rows.max())}], "
            f"cols in [{int(cols.min())}, {int(cols.max())}]"
        )
    flat = rows.astype(np.int64) * units + cols
    unique, counts = np.unique(flat, return_counts=True)
    if unique.size != flat.size:
        twice = unique[counts > 1][:3]
        raise ValueError(
            f"`{owner}` got duplicate `connections`: {flat.size - unique.size} positions "
            f"appear more than once, e.g. (row, col) = "
            f"{[(int(p // units), int(p % units)) for p in twice]}"
        )
    return rows.astype(np.int32), cols.astype(np.int32)
