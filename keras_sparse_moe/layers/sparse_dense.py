"""`SparseDense`: a `Dense`-shaped layer whose connections follow a binary mask."""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

from keras_sparse_moe import topologies
from keras_sparse_moe.ops.masking import decode_mask, encode_mask, mask_gradient

__all__ = ["SparseDense"]

IMPLEMENTATIONS = ("masked",)
_DEFAULT_EPSILON = 20.0


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
            `density`, `epsilon` and `topology`.
        implementation: `"masked"` (a dense kernel whose masked entries are
            zero). A truly sparse implementation is planned.
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
                f"`{owner}` got an invalid `implementation`. Only 'masked' is "
                "available (a truly sparse implementation is planned). "
                f"Received: implementation={implementation!r}"
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
            and (density is not None or epsilon is not None or mask is not None)
        ):
            raise ValueError(
                f"`{owner}` takes a `degree` in `topology_kwargs` or a "
                "`density`/`epsilon`/`mask`, not both. Received: "
                f"topology_kwargs={topology_kwargs}, density={density}, "
                f"epsilon={epsilon}"
            )
        if mask is not None:
            if density is not None or epsilon is not None:
                raise ValueError(
                    f"`{owner}` takes a `mask` or a `density`/`epsilon`, not "
                    f"both. Received: density={density}, epsilon={epsilon} with "
                    "a mask"
                )
            mask = decode_mask(mask)
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
        # Storage-side caches behind the connection interface (not configuration):
        # the connection list and the compiled rewiring functions.
        self._positions = None
        self._rewire_functions = {}

    # ------------------------------------------------------------------ #
    def _draw_mask(self, input_dim):
        """The mask this layer's arguments define for `input_dim` inputs."""
        if self.mask_value is not None:
            if self.mask_value.shape[0] != input_dim:
                raise ValueError(
                    "`SparseDense` got a `mask` that does not match its input. "
                    f"Expected shape ({input_dim}, {self.units}). Received: "
                    f"mask.shape={self.mask_value.shape}"
                )
            return self.mask_value
        builder = topologies.get(self.topology)
        if self.allowed is not None and self.topology == "erdos_renyi":
            return self._draw_inside_allowed(input_dim)
        if "degree" in self.topology_kwargs:
            return builder(input_dim, self.units, seed=self.seed, **self.topology_kwargs)
        density = self._density_for(input_dim)
        return builder(
            input_dim,
            self.units,
            density=density,
            seed=self.seed,
            **self.topology_kwargs,
        )

    def _density_for(self, input_dim):
        if self.density is not None:
            return self.density
        if self.epsilon is not None:
            return topologies.density_from_epsilon(self.epsilon, input_dim, self.units)
        return min(1.0, _DEFAULT_EPSILON * (input_dim + self.units) / (input_dim * self.units))

    def _draw_inside_allowed(self, input_dim):
        """Erdős–Rényi restricted to `allowed`: `density` of the whole kernel, drawn
        uniformly among the allowed positions."""
        shape = (input_dim, self.units)
        inside = np.flatnonzero(self.allowed.dense(shape).ravel())
        count = max(1, int(round(self._density_for(input_dim) * input_dim * self.units)))
        if count > inside.size:
            raise ValueError(
                f"`SparseDense` '{self.name}' asks for {count} connections but its `allowed` "
                f"pattern has room for {inside.size} of the {input_dim * self.units}. Lower "
                f"`density`. Received: density={self._density_for(input_dim):.4g}"
            )
        flat = np.zeros(input_dim * self.units, np.float32)
        flat[np.random.default_rng(self.seed).choice(inside, count, replace=False)] = 1.0
        return flat.reshape(shape)

    def _check_inside_allowed(self, mask):
        if self.allowed is None:
            return
        self.allowed.check(mask.shape, "SparseDense")
        outside = int(np.count_nonzero((mask != 0) & ~self.allowed.dense(mask.shape)))
        if outside:
            source = "its `mask`" if self.mask_value is not None else f"topology {self.topology!r}"
            raise ValueError(
                f"`SparseDense` '{self.name}': {outside} connections of {source} lie outside "
                f"its `allowed` pattern ({self.allowed!r}). Give a mask inside it, or use "
                "topology='erdos_renyi', which draws inside it."
            )

    @property
    def num_allowed(self) -> int:
        """Positions where a connection may exist (all of the kernel without `allowed`)."""
        self._require_built("num_allowed")
        shape = tuple(self.mask.shape)
        return int(np.prod(shape)) if self.allowed is None else self.allowed.count(shape)

    @property
    def allowed_positions(self):
        """None (anywhere), or `f(flat_positions) -> bool tensor`: where `allowed`
        lets a connection exist. `keras.ops` only: growth steps call it compiled."""
        self._require_built("allowed_positions")
        if self.allowed is None:
            return None
        return functools.partial(self.allowed.contains, shape=tuple(self.mask.shape))

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "`SparseDense` needs a known last input dimension. Received: "
                f"input_shape={input_shape}"
            )
        mask = self._draw_mask(int(input_dim))
        self._check_inside_allowed(mask)
        scale = 1.0
        if self.density_aware_init and isinstance(
            self.kernel_initializer, initializers.VarianceScaling
        ):
            scale = float(np.sqrt(mask.size / max(1.0, float(mask.sum()))))
        self.mask = self.add_weight(
            name="mask",
            shape=mask.shape,
            initializer=initializers.Constant(mask),
            dtype="float32",
            trainable=False,
            autocast=False,
        )
        self.kernel = self.add_weight(
            name="kernel",
            shape=mask.shape,
            # Masked at creation: `build` may run in a stateless scope where an
            # `assign` would be dropped.
            initializer=lambda shape, dtype: ops.multiply(
                self.kernel_initializer(shape, dtype), ops.cast(mask * scale, dtype)
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
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

    def apply_mask(self):
        """Zeroes the kernel wherever the mask is 0 (after an external assign)."""
        kernel = ops.convert_to_tensor(self.kernel)
        self.kernel.assign(ops.where(ops.convert_to_tensor(self.mask) > 0, kernel, 0.0))
        self._positions = None

    # ------------------------------------------------------------------ #
    # Connections: what callbacks, conversion, plots and the mixture use, whatever
    # the storage. Positions are flat row-major indices into (input_dim, units).
    @property
    def kernel_shape(self) -> tuple:
        """`(input_dim, units)`: the shape of the dense weight matrix this layer stands for."""
        self._require_built("kernel_shape")
        return tuple(int(d) for d in self.mask.shape)

    def connection_positions(self):
        """int32 `(num_connections,)` flat positions of the connections, increasing
        after a rebuild (a rewiring keeps each replaced connection's slot).

        A cache of the mask, the source of truth: rebuilt after weights are set
        or loaded, and whenever a rewiring step finds it stale
        (`refresh_connections`).
        """
        self._require_built("connection_positions")
        if self._positions is None:
            mask = np.asarray(ops.convert_to_numpy(self.mask)).ravel()
            self._positions = ops.convert_to_tensor(np.flatnonzero(mask).astype("int32"))
        return self._positions

    def connection_values(self):
        """The `(num_connections,)` weights at `connection_positions()`."""
        return ops.take(ops.reshape(self.kernel, (-1,)), self.connection_positions())

    def refresh_connections(self):
        """Forgets the cached connection list (after the mask was changed elsewhere)."""
        self._positions = None

    def dense_mask(self) -> np.ndarray:
        """Boolean `(input_dim, units)` numpy array of the connections (small layers)."""
        self._require_built("dense_mask")
        return np.asarray(ops.convert_to_numpy(self.mask)) > 0

    def assign_dense_kernel(self, values):
        """Sets the weights from a dense `(input_dim, units)` array; only connected
        positions are kept (the rest stays exactly zero)."""
        values = np.asarray(values, dtype=self.kernel.dtype)
        if values.shape != self.kernel_shape:
            raise ValueError(
                f"`SparseDense.assign_dense_kernel` needs an array of shape {self.kernel_shape}. "
                f"Received: shape {values.shape}"
            )
        self.kernel.assign(np.where(self.dense_mask(), values, 0).astype(values.dtype))

    def rewire(self, step, optimizer, key=(), *args):
        """Runs a compiled rewiring `step` on this layer's storage, in place; returns its output.

        `step(state, positions, *args) -> (new_state, new_positions, aux)`:
        `state` is the flat `[kernel, mask, *optimizer slots of the kernel]`,
        `positions` the current connection list; `new_positions` (or None:
        rebuild from the mask) becomes the connection list. The step is
        compiled once per (`step`, `key`, variables): a `functools.partial`'s
        bound values must be covered by `key`. Optimizer slots (momenta, Adam
        moments) are rewired with the kernel, so a step can reset them at the
        positions it changes.
        """
        from keras_sparse_moe import _runtime
        from keras_sparse_moe.ops import rewiring

        slots = [] if optimizer is None else _runtime.optimizer_slots(optimizer, self.kernel)
        variables = [self.kernel, self.mask, *slots]
        name = getattr(step, "func", step)
        cache_key = (name, tuple(id(v) for v in variables), key)
        function = self._rewire_functions.get(cache_key)
        if function is None:

            def update(state, positions, *call_args):
                new_state, new_positions, aux = step(state, positions, *call_args)
                return new_state, (new_positions, aux)

            function = rewiring.compile_update(update, variables)
            self._rewire_functions[cache_key] = function
        new_positions, aux = function(self.connection_positions(), *args)
        self._positions = new_positions
        return aux

    def dense_kernel(self):
        """The kernel as a tensor whose gradient is zero where the mask is.

        The stored kernel is already zero there, so the forward pass needs no
        multiply. Layers that contract the kernel their own way (the experts of
        `SparseExpertMixture`) read it through this method. RigL flips
        `_dense_gradient` (outside compiled steps) to read the gradient at empty
        positions.
        """
        return self.kernel if self._dense_gradient else mask_gradient(self.kernel, self.mask)

    def call(self, inputs):
        outputs = ops.matmul(inputs, self.dense_kernel())
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    # Keep the zero invariant when weights come from outside the optimizer.
    def set_weights(self, weights):
        super().set_weights(weights)
        self.apply_mask()

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.apply_mask()

    # ------------------------------------------------------------------ #
    @property
    def num_connections(self) -> int:
        """Number of connections kept (ones in the mask)."""
        self._require_built("num_connections")
        return int(self.connection_positions().shape[0])

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
