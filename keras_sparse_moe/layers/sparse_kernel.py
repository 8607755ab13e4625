"""`SparseKernelLayer`: the connection storage every sparse layer shares.

A layer's kernel (a `Dense` matrix, a convolution filter bank) is seen as a
matrix `kernel_shape = (fan_in, outputs)`: the kernel's axes but the last
are flattened into rows. Its connections follow a topology over that
matrix, and two storages stand behind one connection interface: `"masked"`
(the kernel and a binary mask, in the kernel's own shape) and `"sparse"`
(the nnz values and their int32 positions: O(nnz) memory). Subclasses say
how the kernel is shaped (`_weight_shape`) and how it is applied (`call`);
callbacks, conversion, summaries and plots speak only to this interface.
"""

from __future__ import annotations

import base64
import copy
import functools
import inspect
import math

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

from keras_sparse_moe import topologies, validation
from keras_sparse_moe.layers.storage import STORAGES
from keras_sparse_moe.ops.masking import encode_mask
from keras_sparse_moe.saving import VersionedConfig

__all__ = [
    "DENSE_LIMIT",
    "IMPLEMENTATIONS",
    "SparseKernelLayer",
    "KERAS_POSITIONAL",
    "compute_fans",
    "initial_values",
    "keras_positional",
    "with_connectivity_signature",
]

IMPLEMENTATIONS = tuple(STORAGES)  # "masked", "sparse"
_DEFAULT_EPSILON = 20.0
# Largest number of entries (fan_in * outputs) for which a dense array of the
# kernel's shape is made (a masked kernel, a dense mask, a dense view): 2**28
# float32 entries take 1 GiB.
DENSE_LIMIT = 1 << 28


class SparseKernelLayer(VersionedConfig, keras.layers.Layer):
    """Base class of layers whose kernel has sparse, topology-defined connections.

    Holds the arguments every sparse layer shares (density, epsilon,
    topology, mask, connections, implementation, allowed, initializers,
    regularizers, constraints, activation, bias), draws the connections at
    build time and stores them, and exposes them to callbacks
    (`SETEvolution`, `RigL`, `MagnitudePruning`), conversion and summaries.
    `SparseDense` and the sparse convolutions are its subclasses; see
    `SparseDense` for the arguments.

    A subclass passes its number of outputs (units, filters) and the
    kernel's leading axes (`kernel_dims`: none for `SparseDense`, the kernel
    size for a convolution): its kernel has shape
    `(*kernel_dims, input_dim, output_dim)`. It calls
    `_build_kernel(input_dim)` in `build` and reads the kernel in `call`
    through `dense_kernel()`.
    """

    def __init__(
        self,
        output_dim,
        kernel_dims=(),
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
        n_m=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        owner = self._owner
        self._output_dim = int(output_dim)
        self._kernel_dims = tuple(int(d) for d in kernel_dims)
        checked = validation.check_connectivity(
            owner,
            (*self._kernel_dims, None, self._output_dim),
            density=density,
            epsilon=epsilon,
            topology=topology,
            mask=mask,
            connections=connections,
            topology_kwargs=topology_kwargs,
            allowed=allowed,
            implementation=implementation,
            dense_limit=DENSE_LIMIT,
        )
        self.density, self.epsilon = checked["density"], checked["epsilon"]
        self.topology, self.topology_kwargs = topology, checked["topology_kwargs"]
        self.mask_value, self.connections_value = checked["mask"], checked["connections"]
        self.allowed, self.implementation = checked["allowed"], implementation
        self.n_m = _check_n_m(owner, n_m, topology, checked)
        self.seed = validation.check_seed(seed, owner)
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.density_aware_init = validation.check_bool(
            "density_aware_init", density_aware_init, owner
        )
        # How the connections are stored: the one place the implementation is read.
        self.storage = STORAGES[implementation](self)
        if not self.storage.stores_dense and kernel_constraint is not None:
            if not isinstance(self.kernel_constraint, constraints.NonNeg):
                raise ValueError(
                    f"`{owner}` with implementation={implementation!r} takes only elementwise "
                    "kernel constraints (`NonNeg`): the others act on rows or columns of a "
                    f"dense kernel. Received: kernel_constraint={kernel_constraint!r}"
                )

    @property
    def _owner(self):
        return type(self).__name__

    # ------------------------------------------------------------------ #
    def _weight_shape(self, input_dim) -> tuple:
        """The kernel's full shape for `input_dim` input features (last axis: outputs)."""
        return (*self._kernel_dims, int(input_dim), self._output_dim)

    # ------------------------------------------------------------------ #
    def _density_for(self, input_dim):
        """The density asked for: given, from `epsilon` (SET; kernel dimensions count
        as in ERK), or SET's default `epsilon=20` capped at a full kernel."""
        if self.density is not None:
            return self.density
        if self.n_m is not None:
            return self.n_m[0] / self.n_m[1]
        if self.epsilon is not None:
            return topologies.density_from_epsilon(
                self.epsilon, input_dim, self._output_dim, self._kernel_dims
            )
        shape = self._weight_shape(input_dim)
        return min(1.0, _DEFAULT_EPSILON * sum(shape) / math.prod(shape))

    def _draw_connections(self, weight_shape):
        """int32 `(rows, cols)` of the connections this layer's arguments define for
        a kernel of `weight_shape`. Erdős–Rényi and given lists make no dense array;
        the other topologies build their mask (refused above `DENSE_LIMIT` entries)."""
        owner = f"`{self._owner}` '{self.name}'"
        shape = _matrix_shape(weight_shape)
        fan_in, n_out = shape
        size = fan_in * n_out
        if self.connections_value is not None:
            rows, cols = self.connections_value
            if rows.size and int(rows.max()) >= fan_in:
                raise ValueError(
                    f"{owner} got `connections` with rows up to {int(rows.max())}, out of "
                    f"range for {fan_in} kernel rows. Expected rows in [0, {fan_in})."
                )
            return rows, cols
        if self.mask_value is not None:
            if self.mask_value.shape != tuple(weight_shape):
                raise ValueError(
                    f"{owner} got a `mask` that does not match its kernel. Expected shape "
                    f"{tuple(weight_shape)}. Received: mask.shape={self.mask_value.shape}"
                )
            rows, cols = np.nonzero(self.mask_value.reshape(shape))
            return rows.astype(np.int32), cols.astype(np.int32)
        if self.n_m is not None:
            if weight_shape[-2] % self.n_m[1]:
                raise ValueError(
                    f"{owner} with n_m={self.n_m} needs its input size to be a multiple of "
                    f"m={self.n_m[1]} (groups of m consecutive inputs). Received: input "
                    f"size {weight_shape[-2]}"
                )
            if size > DENSE_LIMIT:
                raise ValueError(
                    f"{owner}: N:M layers draw and rewire their groups on a dense view, and "
                    f"a {shape} kernel is too large for that (more than {DENSE_LIMIT} entries)."
                )
            if self.density is None:  # a random N:M pattern; density 1.0: dense, to prune
                mask = topologies.n_m(fan_in, n_out, *self.n_m, seed=self.seed)
                rows, cols = np.nonzero(mask)
                return rows.astype(np.int32), cols.astype(np.int32)
        if self.topology in ("erdos_renyi", "n_m") and "degree" not in self.topology_kwargs:
            density = self._density_for(weight_shape[-2])
            count = max(1, int(round(density * size)))
            if self.allowed is not None:
                self.allowed.check(shape, self._owner)
                room = self.allowed.count(shape)
                if count > room:
                    raise ValueError(
                        f"{owner} asks for {count} connections but its `allowed` pattern has "
                        f"room for {room} of the {size}. Lower `density`. Received: "
                        f"density={density:.4g}"
                    )
            return self.storage.random_positions(count, self.seed)
        if size > DENSE_LIMIT:
            raise ValueError(
                f"{owner}: topology {self.topology!r} builds a dense mask, and a {shape} "
                f"kernel is too large to densify (more than {DENSE_LIMIT} entries). Use "
                "topology='erdos_renyi' or pass `connections=(rows, cols)`."
            )
        builder = topologies.get(self.topology)
        if "degree" in self.topology_kwargs:
            mask = builder(fan_in, n_out, seed=self.seed, **self.topology_kwargs)
        else:
            mask = builder(
                fan_in,
                n_out,
                density=self._density_for(weight_shape[-2]),
                seed=self.seed,
                **self.topology_kwargs,
            )
        rows, cols = np.nonzero(mask)
        return rows.astype(np.int32), cols.astype(np.int32)

    def _check_inside_allowed(self, rows, cols, shape):
        if self.allowed is None:
            return
        self.allowed.check(shape, self._owner)
        outside = int(np.count_nonzero(~self.allowed.allows(rows, cols, shape)))
        if outside:
            if self.connections_value is not None:
                source = "its `connections`"
            elif self.mask_value is not None:
                source = "its `mask`"
            else:
                source = f"topology {self.topology!r}"
            raise ValueError(
                f"`{self._owner}` '{self.name}': {outside} connections of {source} lie outside "
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

    # ------------------------------------------------------------------ #
    def _build_kernel(self, input_dim):
        """Draws the connections for `input_dim` input features and creates the
        storage variables and the bias."""
        weight_shape = self._weight_shape(input_dim)
        shape = _matrix_shape(weight_shape)
        size = shape[0] * shape[1]
        if self.storage.stores_dense and size > DENSE_LIMIT:
            raise ValueError(
                f"`{self._owner}` '{self.name}' with implementation={self.implementation!r} "
                f"would store a dense {weight_shape} kernel (more than {DENSE_LIMIT} entries). "
                "Use implementation='sparse'."
            )
        self._kernel_shape = shape  # the storage reads it while drawing
        self._full_shape = weight_shape
        rows, cols = self._draw_connections(weight_shape)
        self._check_inside_allowed(rows, cols, shape)
        scale = 1.0
        if self.density_aware_init and isinstance(
            self.kernel_initializer, initializers.VarianceScaling
        ):
            scale = float(np.sqrt(size / max(1, len(rows))))
        self.storage.build(rows, cols, scale)
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self._output_dim,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None

    def apply_mask(self):
        """Restores the storage invariant after an external assign: masked, the kernel
        is zeroed wherever the mask is 0; sparse, parked slots hold zero."""
        self.storage.apply_mask()

    # ------------------------------------------------------------------ #
    # Connections: what callbacks, conversion, plots and the mixture use, whatever
    # the storage (`self.storage`, see `keras_sparse_moe.layers.storage`). Positions
    # are flat row-major indices into `kernel_shape` (equal to those of the full
    # kernel, whose axes but the last are the rows).
    @property
    def kernel_shape(self) -> tuple:
        """`(fan_in, outputs)`: the kernel as a matrix (its axes but the last
        flattened into rows); `(input_dim, units)` for `SparseDense`."""
        self._require_built("kernel_shape")
        return self._kernel_shape

    @property
    def weight_shape(self) -> tuple:
        """The kernel's full shape, e.g. `(height, width, channels, filters)` for a
        2-D convolution; equal to `kernel_shape` for `SparseDense`."""
        self._require_built("weight_shape")
        return self._full_shape

    @property
    def storage_variables(self) -> list:
        """The variables holding the connections: masked `[kernel, mask]`, sparse
        `[values, positions]` (int32 `row * n_out + col`; `[values, rows, cols]`
        for kernels of `2**31` entries or more). The first is the trainable one."""
        self._require_built("storage_variables")
        return self.storage.variables

    def connection_indices(self):
        """int32 numpy `(rows, cols)` of the connections in `kernel_shape` (any layer
        size), in the order of `connection_values()`."""
        self._require_built("connection_indices")
        return self.storage.connection_indices()

    def connection_positions(self):
        """int32 `(num_connections,)` flat positions of the connections.

        Masked: increasing after a rebuild (a rewiring keeps each replaced
        connection's slot); a cache of the mask, the source of truth, rebuilt
        after weights are set or loaded, and whenever a rewiring step finds it
        stale (`refresh_connections`). Sparse: in slot order; only for layers
        of fewer than 2**31 entries (use `connection_indices` beyond).
        """
        self._require_built("connection_positions")
        return self.storage.connection_positions()

    def connection_values(self):
        """The `(num_connections,)` weights, in the order of the positions."""
        return self.storage.connection_values()

    def refresh_connections(self):
        """Forgets the cached connection list (after the storage was changed elsewhere)."""
        self.storage.refresh()

    def _check_densifiable(self, what):
        if int(np.prod(self.kernel_shape)) > DENSE_LIMIT:
            raise ValueError(
                f"`{self._owner}.{what}` would make a dense {self.weight_shape} array (more "
                f"than {DENSE_LIMIT} entries). Use `connection_indices()` and "
                "`connection_values()` instead."
            )

    def dense_mask(self) -> np.ndarray:
        """Boolean numpy array of the connections, in the kernel's shape
        (`weight_shape`; small layers)."""
        self._require_built("dense_mask")
        return self.storage.dense_mask()

    def assign_dense_kernel(self, values):
        """Sets the weights from a dense array of the kernel's shape (`weight_shape`,
        or `kernel_shape`); only connected positions are kept (the rest stays
        exactly zero)."""
        values = np.asarray(values)
        if values.shape not in (self.weight_shape, self.kernel_shape):
            raise ValueError(
                f"`{self._owner}.assign_dense_kernel` needs an array of shape "
                f"{self.weight_shape}. Received: shape {values.shape}"
            )
        self.storage.assign_dense_kernel(values)

    def assign_connections(self, rows, cols, values):
        """Replaces the connections with `(rows[k], cols[k])` (in `kernel_shape`)
        holding `values[k]`.

        Masked: any number of them. Sparse: at most the layer's slot count
        (`storage_variables[0].shape[0]`); the slots left over are parked.
        Optimizer state is not touched (for fresh layers, e.g. conversion).
        """
        self._require_built("assign_connections")
        n_in, n_out = self.kernel_shape
        rows, cols = validation.check_connections((rows, cols), n_out, "assign_connections")
        values = np.asarray(values, np.float32).ravel()
        if values.shape != rows.shape or (rows.size and int(rows.max()) >= n_in):
            raise ValueError(
                f"`{self._owner}.assign_connections` needs one value per connection and rows "
                f"below {n_in}. Received: {rows.size} positions, {values.size} values, "
                f"largest row {int(rows.max()) if rows.size else None}"
            )
        self.storage.assign_connections(rows, cols, values)

    def rewire(self, step, optimizer, key=(), *args):
        """Runs a compiled rewiring `step` on this layer's storage, in place; returns its output.

        `step(storage, state, positions, *args) -> (new_state, new_positions,
        aux)` is written with the storage's primitives (`weights`, `remove`,
        `random_growth`, `scored_growth`, `replace`: see
        `keras_sparse_moe.layers.storage`). `state` is the storage's typed
        state, its optimizer slots (momenta, Adam moments) included, so a step
        resets them where it changes connections. `positions` is the current
        connection list of a storage that keeps one (masked; None otherwise),
        and `new_positions` (None: rebuild it) becomes it; a step that only
        removes sets `step.reads_positions = False` and gets None (the list's
        length would change the argument's shape, and compile it anew at every
        call). The step is compiled once per storage signature
        (`storage.step_signature()`: kind, kernel shape, `allowed` pattern),
        `step` with its bound values, `key`, and the variables' shapes and
        dtypes, so layers of one shape share the program. A step whose bound
        values cannot be hashed is compiled per layer and `key`, which must
        then cover them.
        """
        return self.storage.rewire(step, optimizer, key, *args)

    def growth_probe(self, probe=None):
        """Context manager: while a loss is traced under it, this layer's forward pass
        carries the gradient at empty positions too (RigL's growth score).

        A storage holding the whole kernel (masked) exposes the kernel's full
        gradient (`probe` unused). Sparse storage needs `probe = (zeros, rows,
        cols)`: zero-valued connections added at those candidate positions,
        whose gradient is the score. Every contraction of the layer (its own
        call, the expert bank's) reads the connections through the storage,
        so the probe reaches all of them.
        """
        return self.storage.growth_probe(probe)

    def dense_kernel(self):
        """The kernel as a tensor of `weight_shape` (small layers).

        Masked: the stored kernel, whose gradient is zero where the mask is
        (the stored kernel is already zero there, so the forward pass needs no
        multiply); under `growth_probe` the full gradient. Sparse: the values
        scattered into a dense array (differentiable in the values). Layers
        that contract the kernel their own way read it through this method.
        """
        return self.storage.kernel_view()

    def _add_bias_and_activate(self, outputs, axis=-1):
        if self.bias is not None:
            bias = self.bias
            if axis != -1:
                shape = [1] * len(outputs.shape)
                shape[axis] = self._output_dim
                bias = ops.reshape(bias, shape)
            outputs = ops.add(outputs, bias)
        return self.activation(outputs)

    # Keep the storage invariant when weights come from outside the optimizer.
    def set_weights(self, weights):
        super().set_weights(weights)
        self.apply_mask()

    def load_own_variables(self, store):
        if len(store) == 0 and self.variables and getattr(self, "_pre_split_hint", False):
            # Format 0 files from before the expert bank was a layer of its own keep
            # its weights one level up, where this layer does not look.
            raise ValueError(
                f"The file has no weights for `{self.name}` of a mixture's expert bank where "
                "this version keeps them. Files saved by keras-sparse-moe before the expert "
                "bank became a layer of its own (layer format 0, before 2026-11-29) keep them "
                "one level up: convert the file once with "
                "`keras_sparse_moe.saving.upgrade_file(path)` and load the file it writes."
            )
        super().load_own_variables(self.storage.read_store(store))
        self.apply_mask()

    # ------------------------------------------------------------------ #
    @property
    def num_connections(self) -> int:
        """Number of connections kept."""
        self._require_built("num_connections")
        return self.storage.num_connections

    @property
    def actual_density(self) -> float:
        """Fraction of the kernel's possible connections kept."""
        self._require_built("actual_density")
        return self.num_connections / int(np.prod(self.kernel_shape))

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{self._owner}.{what}` is known once the layer is built: call it "
                "on an input or call `build(input_shape)` first."
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
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
                "n_m": None if self.n_m is None else list(self.n_m),
            }
        )
        return config


# The arguments Keras' `Dense` and `Conv*D` take positionally after their own
# (`units`; `filters, kernel_size, ..., groups`), in Keras' order.
KERAS_POSITIONAL = (
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


def keras_positional(owner, args, kwargs) -> dict:
    """`kwargs` with the positional `args` given after a layer's own arguments
    named as Keras names them (`KERAS_POSITIONAL`): `SparseDense(64, "relu")`."""
    if len(args) > len(KERAS_POSITIONAL):
        raise TypeError(
            f"`{owner}` takes at most {len(KERAS_POSITIONAL)} positional arguments after its "
            f"own ({', '.join(KERAS_POSITIONAL)}). Received {len(args)}: {args!r}"
        )
    named = dict(zip(KERAS_POSITIONAL, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise TypeError(f"`{owner}` got multiple values for the arguments {twice}.")
    return {**kwargs, **named}


def with_connectivity_signature(cls):
    """Class decorator: shows a subclass's `__init__(self, own args, *args, **kwargs)`
    with Keras' positional arguments (`KERAS_POSITIONAL`) after its own and the
    other shared connectivity arguments keyword-only, so `help()`, IDEs and
    config checks see every argument the layer takes, in Keras' order."""
    own = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    base = inspect.signature(SparseKernelLayer.__init__).parameters
    positional = [base[name] for name in KERAS_POSITIONAL]
    shared = [
        p.replace(kind=p.KEYWORD_ONLY)
        for name, p in base.items()
        if name not in ("self", "output_dim", "kernel_dims", "kwargs", *KERAS_POSITIONAL)
    ]
    var = inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
    cls.__init__.__signature__ = inspect.Signature([*own, *positional, *shared, var])
    return cls


def _check_n_m(owner, n_m, topology, checked):
    """The layer's N:M pattern `(n, m)` or None, from `n_m` or `topology="n_m"`
    (whose `topology_kwargs` hold `n` and `m`), checked against the other
    connectivity arguments: an N:M layer is drawn N:M (density None) or starts
    dense (`density=1.0`) for `MagnitudePruning` to bring it to N:M."""
    if topology == "n_m":
        kwargs = checked["topology_kwargs"]
        if set(kwargs) != {"n", "m"}:
            raise ValueError(
                f"`{owner}` with topology='n_m' needs `topology_kwargs` with exactly `n` and "
                f"`m`, e.g. {{'n': 2, 'm': 4}} (or pass n_m=(2, 4)). Received: "
                f"topology_kwargs={kwargs}"
            )
        from_topology = validation.check_n_m((kwargs["n"], kwargs["m"]), owner, "topology_kwargs")
        if n_m is not None and validation.check_n_m(n_m, owner) != from_topology:
            raise ValueError(
                f"`{owner}` got an `n_m` that differs from its topology_kwargs. Received: "
                f"n_m={n_m}, topology_kwargs={kwargs}"
            )
        n_m = from_topology
    if n_m is None:
        return None
    n_m = validation.check_n_m(n_m, owner)
    if topology not in ("erdos_renyi", "n_m"):
        raise ValueError(
            f"`{owner}` with n_m={n_m} draws its own N:M pattern: leave `topology` at its "
            f"default. Received: topology={topology!r}"
        )
    others = {
        name: "given"
        for name in ("epsilon", "mask", "connections", "allowed")
        if checked[name] is not None
    }
    if checked["density"] not in (None, 1.0):
        others["density"] = checked["density"]
    if others:
        raise ValueError(
            f"`{owner}` with n_m={n_m} takes no other connectivity argument but "
            "`density=1.0` (start dense, for `MagnitudePruning` to prune to N:M). "
            f"Received: {others}"
        )
    return n_m


def _matrix_shape(weight_shape) -> tuple:
    """`(fan_in, outputs)`: a kernel's axes but the last flattened into rows."""
    return (math.prod(weight_shape[:-1]), weight_shape[-1])


def compute_fans(shape) -> tuple:
    """`(fan_in, fan_out)` of a kernel `shape`, as Keras' initializers count them:
    a `(..., n_in, n_out)` kernel's leading (receptive field) axes multiply both."""
    if len(shape) < 2:
        size = int(shape[0]) if len(shape) else 1
        return size, size
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def initial_values(initializer, shape, count, scale=1.0):
    """`(shape, dtype) -> (count,)` values drawn as `initializer` would draw them at
    `count` positions of a `shape` kernel, without drawing the dense kernel:
    `VarianceScaling` (Glorot, He, LeCun, ...) keeps the fans of `shape` (its
    draws scaled by `scale`); elementwise initializers draw `count` values."""
    if not isinstance(initializer, initializers.VarianceScaling):
        return lambda _, dtype: initializer((count,), dtype)
    fan_in, fan_out = compute_fans(shape)
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
