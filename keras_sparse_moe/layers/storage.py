"""How a sparse layer stores its connections: `MaskedStorage` and `SlotStorage`.

A `SparseKernelLayer` holds one storage, chosen by its `implementation`
argument (`STORAGES`); nothing else in the library asks which one it holds.
Each storage answers three kinds of question:

- the connections, on the host: `connection_indices`, `connection_values`,
  `assign_connections`, `dense_mask`, ...;
- the forward pass: `kernel_view()` (the kernel as a dense tensor, for
  layers small enough), `matmul(x)` and `block_matmul` (the expert bank's
  contraction by blocks of columns), and the growth-score probe
  (`growth_probe`), under which they also carry the gradient at empty
  positions;
- the rewiring primitives a compiled SET, RigL or pruning step is written
  with, on a typed state (`MaskedState`, `SlotState`): the connections'
  weights, removal, random and scored growth, and the drop-and-grow write
  (which also zeroes the optimizer slots at changed positions).

Masked storage keeps the kernel and a binary mask in the kernel's own shape
(fast for small layers and on accelerators). Slot storage keeps one slot per
connection: its value (trainable) and its int32 position `row * n_out + col`
(8 bytes a connection, in memory and in saved or exported files); a slot
whose row is `fan_in` is parked (holds no connection), so memory and time
grow with the number of connections, not with the kernel's size. A kernel
too large for int32 positions (`(fan_in + 1) * n_out >= 2**31`) keeps an
int32 row and column per slot instead. Compiled steps see rows and columns
either way (`SlotState`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from typing import Any, NamedTuple

import numpy as np
from keras import initializers, ops

from keras_sparse_moe import _runtime
from keras_sparse_moe.ops import rewiring
from keras_sparse_moe.ops.masking import mask_gradient
from keras_sparse_moe.ops.sparse_matmul import (
    packed_sparse_matmul,
    serving_indices,
    sparse_matmul,
    unpack_positions,
)

__all__ = [
    "DEFAULT_STORAGE",
    "INT32_MAX",
    "STORAGES",
    "MaskedState",
    "MaskedStorage",
    "SlotState",
    "SlotStorage",
    "TileStorage",
]


class MaskedState(NamedTuple):
    """A masked layer's arrays inside a compiled rewiring step (all flat)."""

    kernel: Any
    mask: Any
    slots: tuple = ()  # optimizer slots shaped like the kernel (momenta, moments)


INT32_MAX = 2**31 - 1


class SlotState(NamedTuple):
    """A slot layer's arrays inside a compiled rewiring step (rows and columns,
    whichever way the variables keep them)."""

    values: Any
    rows: Any
    cols: Any
    slots: tuple = ()  # optimizer slots shaped like `values`


class _Storage:
    """What both storages share; `layer` is the `SparseKernelLayer` they serve."""

    name = None
    state_type = None
    # True: the whole kernel is stored, so the dense gradient is the growth score
    # and a dense view costs nothing more.
    stores_dense = False
    # True: the connections can be read one block of `allowed` at a time (`tile_arrays`).
    reads_tiles = False

    def __init__(self, layer):
        self.layer = layer
        self._positions = None
        self._count = None
        self._rewire_functions = {}

    @property
    def shape(self):
        return self.layer._kernel_shape  # set before the storage builds

    def refresh(self):
        """Forgets the cached connection list (after the storage changed elsewhere)."""
        self._positions = None
        self._count = None

    def state(self, flat):
        """The typed state of the flat list `[storage variables..., optimizer slots...]`."""
        n = len(self.state_type._fields) - 1
        return self.state_type(*flat[:n], tuple(flat[n:]))

    @staticmethod
    def flat(state):
        return [*state[:-1], *state.slots]

    def read_store(self, store):
        """`store` (a saved layer's variables) in this storage's layout."""
        return store

    def state_of_variables(self, flat):
        """The typed state of `[self.variables..., optimizer slots...]`."""
        return self.state(flat)

    def variables_of_state(self, state):
        """The inverse of `state_of_variables`: the values to write back."""
        return self.flat(state)

    def rewire(self, step, optimizer, key, *args):
        """Runs the compiled `step(storage, state, positions, *args) -> (new_state,
        new_positions, aux)` on the layer's variables and its optimizer slots, in
        place; returns `aux`. See `SparseKernelLayer.rewire`."""
        storage = self.variables
        slots = [] if optimizer is None else _runtime.optimizer_slots(optimizer, storage[0])
        variables = [*storage, *slots]
        # Masked steps read and keep the connection list, but for those that only
        # remove (`reads_positions = False`): its length changes with every call,
        # and a new argument shape would compile the step anew each time.
        listed = self.stores_dense and getattr(getattr(step, "func", step), "reads_positions", True)
        compiled = _compiled_step(self, step, key, listed)
        if listed:
            new_positions, aux = compiled(self, variables, self.connection_positions(), *args)
            self._positions = new_positions
        else:
            _, aux = compiled(self, variables, *args)
            self.refresh()
        return aux

    def random_positions(self, count, seed):
        """int32 `(rows, cols)` of the Erdős–Rényi draw: `count` distinct positions,
        uniform over those `allowed`."""
        from keras_sparse_moe import topologies

        n_in, n_out = self.shape
        return topologies.erdos_renyi_positions(
            n_in, n_out, count, seed=seed, allowed=self.layer.allowed
        )

    def refillable(self, drop, grown):
        """The drops that `grown` (a growth step's answer) can refill: all of them,
        where a grown connection may take any dropped one's place."""
        return drop

    def step_signature(self):
        """What a compiled step reads from this storage besides its variables: the
        storage kind, the kernel's shape and the `allowed` pattern. Storages with
        equal signatures (and variables of equal shapes) share compiled steps."""
        return type(self), tuple(int(n) for n in self.shape), self.layer.allowed


class _CompiledStep:
    """One rewiring step compiled for every storage of one `step_signature`.

    The compiled program reads the storage only while it is traced (its shape,
    its `allowed` pattern, its typed state); it is traced with the storage that
    calls it, held weakly between calls.
    """

    def __init__(self, step, listed):
        self._storage = None

        def update(flat, *call_args):
            storage = self._storage()
            positions = None
            if listed:
                positions, call_args = call_args[0], call_args[1:]
            state = storage.state_of_variables(flat)
            new_state, new_positions, aux = step(storage, state, positions, *call_args)
            return storage.variables_of_state(new_state), (new_positions if listed else None, aux)

        self._run = _runtime.compile_update(update)

    def __call__(self, storage, variables, *args):
        self._storage = weakref.ref(storage)
        return self._run(variables, *args)


_COMPILED_STEPS: collections.OrderedDict = collections.OrderedDict()
_COMPILED_STEPS_KEPT = 256  # signatures kept, least recently used dropped first


def _compiled_step(storage, step, key, listed):
    """The compiled `step` for `storage`, shared by every storage of the same
    `step_signature` when the step's bound values are hashable (a
    `functools.partial` of numbers); else kept by the storage, per `key`."""
    if isinstance(step, functools.partial):
        # With their types: 1 and 1.0 are equal keys but may trace differently.
        values = [*step.args, *(v for _, v in sorted(step.keywords.items()))]
        bound = (step.func, tuple(sorted(step.keywords)), tuple((type(v), v) for v in values))
    else:
        bound = (step,)
    signature = (storage.step_signature(), bound, key, listed)
    try:
        hash(signature)
    except TypeError:  # unhashable bound values: `key` covers them, for this storage only
        cache, signature = storage._rewire_functions, (getattr(step, "func", step), key)
    else:
        cache = _COMPILED_STEPS
    compiled = cache.get(signature)
    if compiled is None:
        compiled = cache[signature] = _CompiledStep(step, listed)
        if cache is _COMPILED_STEPS and len(cache) > _COMPILED_STEPS_KEPT:
            cache.popitem(last=False)
    elif cache is _COMPILED_STEPS:
        cache.move_to_end(signature)
    return compiled


class MaskedStorage(_Storage):
    """The kernel in its own shape and a binary mask; masked entries are exactly zero."""

    name = "masked"
    state_type = MaskedState
    stores_dense = True

    def __init__(self, layer):
        super().__init__(layer)
        self._probing = False

    def build(self, rows, cols, scale):
        layer = self.layer
        mask = np.zeros(layer._kernel_shape, np.float32)
        mask[rows, cols] = 1.0
        mask = mask.reshape(layer._full_shape)
        layer.mask = layer.add_weight(
            name="mask",
            shape=layer._full_shape,
            initializer=initializers.Constant(mask),
            dtype="float32",
            trainable=False,
            autocast=False,
        )
        layer.kernel = layer.add_weight(
            name="kernel",
            shape=layer._full_shape,
            # Masked at creation: `build` may run in a stateless scope where an
            # `assign` would be dropped.
            initializer=lambda shape, dtype: ops.multiply(
                layer.kernel_initializer(shape, dtype), ops.cast(mask * scale, dtype)
            ),
            regularizer=layer.kernel_regularizer,
            constraint=layer.kernel_constraint,
        )

    @property
    def variables(self):
        return [self.layer.kernel, self.layer.mask]

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds `matmul` executes per input row: the whole kernel."""
        return int(np.prod(self.shape))

    # Host side ---------------------------------------------------------- #
    def apply_mask(self):
        layer = self.layer
        kernel = ops.convert_to_tensor(layer.kernel)
        layer.kernel.assign(ops.where(ops.convert_to_tensor(layer.mask) > 0, kernel, 0.0))
        self.refresh()

    def connection_positions(self):
        if self._positions is None:
            mask = np.asarray(ops.convert_to_numpy(self.layer.mask)).ravel()
            self._positions = ops.convert_to_tensor(np.flatnonzero(mask).astype("int32"))
        return self._positions

    def connection_indices(self):
        n_out = self.shape[1]
        flat = np.asarray(ops.convert_to_numpy(self.connection_positions()))
        return (flat // n_out).astype(np.int32), (flat % n_out).astype(np.int32)

    def connection_values(self):
        return ops.take(ops.reshape(self.layer.kernel, (-1,)), self.connection_positions())

    @property
    def num_connections(self):
        return int(self.connection_positions().shape[0])

    def dense_mask(self):
        return np.asarray(ops.convert_to_numpy(self.layer.mask)) > 0

    def assign_dense_kernel(self, values):
        layer = self.layer
        kept = np.where(self.dense_mask(), values.reshape(layer.weight_shape), 0)
        layer.kernel.assign(kept.astype(layer.kernel.dtype))

    def assign_connections(self, rows, cols, values):
        layer = self.layer
        mask = np.zeros(self.shape, np.float32)
        kernel = np.zeros(self.shape, np.float32)
        mask[rows, cols], kernel[rows, cols] = 1.0, values
        layer.mask.assign(mask.reshape(layer.weight_shape))
        layer.kernel.assign(kernel.reshape(layer.weight_shape).astype(layer.kernel.dtype))
        self.refresh()

    # Forward pass ------------------------------------------------------- #
    @contextlib.contextmanager
    def growth_probe(self, probe=None):
        """While tracing: the kernel's gradient is read at empty positions too
        (the dense gradient is the growth score; `probe` is not used)."""
        self._probing = True
        try:
            yield
        finally:
            self._probing = False

    def kernel_view(self):
        """The stored kernel, whose gradient is zero where the mask is (the kernel is
        already zero there, so the forward pass needs no multiply); the full
        gradient under `growth_probe`."""
        layer = self.layer
        return layer.kernel if self._probing else mask_gradient(layer.kernel, layer.mask)

    def matmul(self, x):
        return ops.matmul(x, self.kernel_view())

    def block_matmul(self, x, num_blocks, per_block_inputs, sum_blocks):
        n_in, n_out = self.shape
        width = n_out // num_blocks
        kernel = ops.reshape(self.kernel_view(), (n_in, num_blocks, width))
        if per_block_inputs:
            x = ops.reshape(x, (-1, num_blocks, n_in))
            if sum_blocks:
                return ops.einsum("nek,kew->nw", x, kernel)
            out = ops.einsum("nek,kew->new", x, kernel)
        else:
            out = ops.einsum("nk,kew->new", x, kernel)
            if sum_blocks:
                return ops.sum(out, axis=1)
        return ops.reshape(out, (-1, n_out))

    # Compiled rewiring primitives --------------------------------------- #
    @staticmethod
    def weights(state, positions):
        """The connections' weights in list order, and which are live (all: None)."""
        return ops.take(state.kernel, positions), None

    @staticmethod
    def all_weights(state):
        """Every stored weight and whether it is a connection (what `remove` indexes)."""
        return state.kernel, state.mask > 0

    def remove(self, state, drop):
        return self.state(rewiring.remove(self.flat(state), drop))

    def flat_positions(self, state, positions):
        """Flat kernel positions of the entries of `weights(state, positions)`
        (positions None: of `all_weights`), and the flat occupancy (bool)."""
        occupied = state.mask > 0
        if positions is None:
            return ops.arange(ops.shape(state.mask)[0], dtype="int32"), occupied
        return positions, occupied

    def list_is_current(self, state, positions):
        return rewiring.connection_list_is_current(state.mask, positions)

    def growth_at(self, flat):
        """`replace`'s `grown` for flat positions (padding: the kernel's size)."""
        return flat, None

    def random_growth(self, state, positions, drop, count, k_max, n_candidates, seed):
        """Up to `k_max` random empty (allowed) positions, `count` of them valid;
        a position dropped now may be regrown. Returns `(grown, enough, current)`."""
        size = ops.shape(state.mask)[0]
        if n_candidates >= size:
            candidates = rewiring.stateless_permutation(seed, size)
        else:
            from keras_sparse_moe._runtime import stateless_randint

            candidates = stateless_randint(seed, (n_candidates,), size)
        dropped = rewiring.dropped_positions(positions, drop, k_max, size)
        allowed = self.layer.allowed_positions
        inside = None if allowed is None else allowed(candidates)
        grown, enough = rewiring.random_empty_positions(
            state.mask, candidates, count, k_max, dropped, inside
        )
        current = rewiring.connection_list_is_current(state.mask, positions)
        return (grown, dropped), enough, current

    def scored_growth(self, state, positions, count, k_max, exact, salt, gradient):
        """The `count` empty (allowed) positions of largest `|gradient|` (the dense
        gradient). Returns `(grown, count, current, bracketed)`: `bracketed` False
        when the sampled threshold missed (redo with `exact`)."""
        scores = ops.abs(ops.cast(ops.reshape(gradient, (-1,)), "float32"))
        occupied = state.mask
        allowed = self.layer.allowed_positions
        if allowed is not None:  # a forbidden position counts as occupied: never grown
            inside = allowed(ops.arange(ops.shape(occupied)[0], dtype="int32"))
            occupied = ops.where(inside, occupied, ops.ones_like(occupied))
        grown, bracketed = rewiring.largest_empty_positions(occupied, scores, count, k_max, exact)
        current = rewiring.connection_list_is_current(state.mask, positions)
        return (grown, None), count, current, bracketed

    def replace(self, state, positions, drop, grown, grown_values=None):
        """The r-th connection of `drop` becomes the r-th of `grown` (value
        `grown_values[r]` or zero, optimizer slots zero). Returns `(state, positions)`."""
        grown, dropped = grown
        if dropped is not None:  # nothing dropped: write nothing at the dropped places
            dropped = ops.where(ops.any(drop), dropped, ops.shape(state.mask)[0])
        flat, new_positions = rewiring.rewire(
            self.flat(state), positions, drop, grown, grown_values, dropped
        )
        return self.state(flat), new_positions


class SlotStorage(_Storage):
    """One slot per connection: its value and int32 position; O(nnz) memory."""

    name = "sparse"
    state_type = SlotState

    def __init__(self, layer):
        super().__init__(layer)
        self._probe = None
        # True: each slot keeps one int32 position `row * n_out + col` (decided
        # when built: every position, a parked slot's row `n_in` too, fits in
        # int32); False: an int32 row and column.
        self.packed = None

    def build(self, rows, cols, scale):
        from keras_sparse_moe.layers.sparse_kernel import initial_values

        layer = self.layer
        n_in, n_out = self.shape
        self.packed = (int(n_in) + 1) * int(n_out) <= INT32_MAX
        count = len(rows)
        draw = initial_values(layer.kernel_initializer, layer._full_shape, count, scale)
        live = np.asarray(rows) < n_in
        if not live.all():  # parked slots (a tile's spare room) start at zero
            drawn = draw
            draw = lambda shape, dtype: ops.where(live, drawn(shape, dtype), 0.0)  # noqa: E731
        layer.values = layer.add_weight(
            name="values",
            shape=(count,),
            initializer=draw,
            regularizer=layer.kernel_regularizer,
            constraint=layer.kernel_constraint,
        )
        names = ("positions",) if self.packed else ("rows", "cols")
        for name, array in zip(names, self._pack(np.asarray(rows), np.asarray(cols))):
            variable = layer.add_weight(
                name=name,
                shape=(count,),
                initializer=lambda _, dtype, array=array: ops.convert_to_tensor(array, "int32"),
                dtype="int32",
                trainable=False,
            )
            setattr(layer, name, variable)

    @property
    def variables(self):
        layer = self.layer
        if self.packed:
            return [layer.values, layer.positions]
        return [layer.values, layer.rows, layer.cols]

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds `matmul` executes per input row: one per slot (parked ones too)."""
        return int(self.layer.values.shape[0])

    # Slot positions: one packed array or rows and columns --------------- #
    def _pack(self, rows, cols):
        """The index variables' values for `rows`, `cols` (numpy or tensors)."""
        if not self.packed:
            return [rows, cols]
        n_out = self.shape[1]
        if isinstance(rows, np.ndarray):
            return [(rows.astype(np.int64) * n_out + cols).astype(np.int32)]
        return [ops.cast(rows, "int32") * n_out + ops.cast(cols, "int32")]

    def _unpack(self, indices):
        """`(rows, cols)` of the index variables' values `indices` (numpy or tensors)."""
        if not self.packed:
            return tuple(indices)
        (positions,) = indices
        n_out = self.shape[1]
        if isinstance(positions, np.ndarray):
            return positions // n_out, positions % n_out
        return unpack_positions(positions, n_out)

    def slot_indices(self):
        """numpy `(rows, cols)` of every slot in slot order, parked ones (row
        `n_in`) included."""
        arrays = [np.asarray(ops.convert_to_numpy(v)) for v in self.variables[1:]]
        return self._unpack(arrays)

    def state_of_variables(self, flat):
        if not self.packed:
            return self.state(flat)
        values, positions, *slots = flat
        return SlotState(values, *self._unpack([positions]), tuple(slots))

    def read_store(self, store):
        """`store` (a saved layer's variables, `"0"`, `"1"`, ...) in this layout.
        Files of layer format 1 and earlier keep a row and a column per slot (the
        last two entries) where a packed layer keeps one position: they are packed
        here, so old files load unchanged."""
        count = len(self.layer.variables)
        if not self.packed or len(store) != count + 1:
            return store
        entries = [np.asarray(store[str(i)]) for i in range(count + 1)]
        *kept, rows, cols = entries
        if rows.dtype.kind != "i" or cols.dtype.kind != "i":
            return store  # not the old layout: Keras' own error follows
        return {str(i): entry for i, entry in enumerate([*kept, *self._pack(rows, cols)])}

    def variables_of_state(self, state):
        if not self.packed:
            return self.flat(state)
        return [state.values, *self._pack(state.rows, state.cols), *state.slots]

    # Host side ---------------------------------------------------------- #
    def apply_mask(self):
        layer = self.layer
        active = self.slot_indices()[0] < self.shape[0]
        layer.values.assign(ops.where(active, ops.convert_to_tensor(layer.values), 0.0))
        self.refresh()

    def _active_slots(self):
        """numpy indices of the occupied (not parked) slots."""
        return np.flatnonzero(self.slot_indices()[0] < self.shape[0])

    def connection_indices(self):
        slots = self._active_slots()
        rows, cols = self.slot_indices()
        return rows[slots].astype(np.int32), cols[slots].astype(np.int32)

    def connection_positions(self):
        if self._positions is None:
            layer = self.layer
            if int(np.prod(self.shape)) > 2**31 - 1:
                raise ValueError(
                    f"`{layer._owner}` '{layer.name}' has a {self.shape} kernel: flat "
                    "positions overflow int32. Use `connection_indices()`."
                )
            rows, cols = self.connection_indices()
            flat = rows.astype(np.int64) * self.shape[1] + cols
            self._positions = ops.convert_to_tensor(flat.astype("int32"))
        return self._positions

    def connection_values(self):
        return ops.take(self.layer.values, self._active_slots())

    @property
    def num_connections(self):
        if self._count is None:
            self._count = int(self._active_slots().size)
        return self._count

    def dense_mask(self):
        self.layer._check_densifiable("dense_mask")
        mask = np.zeros(self.shape, bool)
        mask[self.connection_indices()] = True
        return mask.reshape(self.layer.weight_shape)

    def assign_dense_kernel(self, values):
        values = values.reshape(self.shape)
        n_in = self.shape[0]
        rows, cols = self.slot_indices()
        kept = np.where(rows < n_in, values[np.minimum(rows, n_in - 1), cols], 0)
        self.layer.values.assign(kept.astype(self.layer.values.dtype))

    def assign_connections(self, rows, cols, values):
        layer = self.layer
        slots = int(layer.values.shape[0])
        if rows.size > slots:
            raise ValueError(
                f"`{layer._owner}` '{layer.name}' has {slots} connection slots. Received "
                f"{rows.size} connections: build it with a higher density."
            )
        pad = slots - rows.size
        rows = np.pad(np.asarray(rows, np.int32), (0, pad), constant_values=self.shape[0])
        cols = np.pad(np.asarray(cols, np.int32), (0, pad))
        for variable, array in zip(self.variables[1:], self._pack(rows, cols)):
            variable.assign(array)
        layer.values.assign(np.pad(values, (0, pad)).astype(layer.values.dtype))
        self.refresh()

    # Forward pass ------------------------------------------------------- #
    @contextlib.contextmanager
    def growth_probe(self, probe=None):
        """While tracing: `probe = (zeros, rows, cols)` adds zero-valued connections
        at candidate positions, so the gradient of `zeros` is the growth score
        there (O(batch * candidates), no dense array)."""
        if probe is None:
            raise ValueError(
                f"`{self.layer._owner}` '{self.layer.name}' stores only its connections: its "
                "growth probe needs the candidate positions `(zeros, rows, cols)`."
            )
        self._probe = probe
        try:
            yield
        finally:
            self._probe = None

    @property
    def probing(self) -> bool:
        """True while a growth probe adds candidate connections (`growth_probe`)."""
        return self._probe is not None

    def arrays(self, x=None):
        """`(values, rows, cols)` of the slots, with the growth probe's appended.

        The stored positions are read through `serving_indices(..., x)`: with
        `sparse_matmul.COMPACT_EXPORTS`, TensorFlow's converters then keep them
        as stored in an exported file (8 bytes a connection), instead of the
        rows and columns they would fold out of them."""
        layer = self.layer
        indices = [ops.convert_to_tensor(v) for v in self.variables[1:]]
        if x is not None:
            indices = serving_indices(indices, x)
        values, (rows, cols) = layer.values, self._unpack(indices)
        if self._probe is not None:
            values, rows, cols = (
                ops.concatenate([ops.cast(a, b.dtype), b])
                for a, b in zip((values, rows, cols), self._probe)
            )
        return values, rows, cols

    def kernel_view(self):
        """The values scattered into a dense array (differentiable in the values)."""
        self.layer._check_densifiable("dense_kernel")
        n_in, n_out = self.shape
        values, rows, cols = self.arrays()
        # Parked slots (row n_in) land in an extra row, cut off.
        flat = ops.cast(rows, "int32") * n_out + ops.cast(cols, "int32")
        dense = ops.scatter(ops.expand_dims(flat, -1), values, ((n_in + 1) * n_out,))
        return ops.reshape(dense[: n_in * n_out], self.layer.weight_shape)

    def matmul(self, x):
        if self.packed and self._probe is None:  # unpacked chunk by chunk, in the loop
            layer = self.layer
            (positions,) = serving_indices([ops.convert_to_tensor(layer.positions)], x)
            return packed_sparse_matmul(x, layer.values, positions, self.shape[1])
        return sparse_matmul(x, *self.arrays(x), self.shape[1])

    def block_matmul(self, x, num_blocks, per_block_inputs, sum_blocks):
        """`x @ W` where W's columns are `num_blocks` blocks of `width`.

        `x` is `(n, k)` (one input shared by all blocks) or, with
        `per_block_inputs`, `(n, num_blocks * k)` (block b reads its own k
        columns): each connection's row moves into its block. With
        `sum_blocks` the output blocks are summed into `(n, width)`; else
        `(n, num_blocks * width)`."""
        k, n_out = self.shape
        width = n_out // num_blocks
        values, rows, cols = self.arrays(x)
        rows, cols = ops.cast(rows, "int32"), ops.cast(cols, "int32")
        n_in = x.shape[-1]
        shifted = rows + k * (cols // width) if per_block_inputs else rows
        rows = ops.where(rows < k, shifted, n_in)  # parked slots stay parked
        if sum_blocks:
            cols, n_out = cols % width, width
        return sparse_matmul(x, values, rows, cols, n_out)

    # Compiled rewiring primitives --------------------------------------- #
    def weights(self, state, positions):
        return state.values, state.rows < self.shape[0]

    def all_weights(self, state):
        return self.weights(state, None)

    def remove(self, state, drop):
        return self.state(rewiring.remove_slots(self.shape[0], self.flat(state), drop))

    def flat_positions(self, state, positions):
        """Flat kernel positions of the slots (parked ones: the kernel's size) and
        the flat occupancy (bool; a dense array: for layers small enough)."""
        from keras_sparse_moe.ops.groups import scatter_flags

        n_in, n_out = self.shape
        size = int(n_in) * int(n_out)
        active = state.rows < n_in
        flat = ops.where(active, state.rows * n_out + state.cols, size)
        return flat, scatter_flags(flat, active, size)

    def list_is_current(self, state, positions):
        return ops.convert_to_tensor(True)

    def growth_at(self, flat):
        n_out = self.shape[1]
        return flat // n_out, flat % n_out

    def draw_candidates(self, seed, count):
        """`(rows, cols)` of the candidate positions RigL scores (int32): every
        position, in order, when `count` covers the kernel; else `count`
        uniform random ones (positions may repeat) from the `(2,)` `seed`."""
        n_in, n_out = self.shape
        if count >= int(n_in) * int(n_out):
            flat = ops.arange(int(n_in) * int(n_out), dtype="int32")
            return flat // n_out, flat % n_out
        return rewiring.random_indices(seed, count, self.shape)

    def random_growth(self, state, positions, drop, count, k_max, n_candidates, seed):
        shape = self.shape
        size = int(shape[0]) * int(shape[1])
        if n_candidates >= size:
            flat = rewiring.stateless_permutation(seed, size)
            candidates = (flat // shape[1], flat % shape[1])
        else:
            candidates = rewiring.random_indices(seed, n_candidates, shape)
        allowed = self.layer.allowed_indices
        inside = None if allowed is None else allowed(*candidates)
        kept = ops.logical_and(state.rows < shape[0], ops.logical_not(drop))
        grown_rows, grown_cols, enough = rewiring.random_empty_indices(
            state.rows, state.cols, kept, candidates, count, k_max, shape, seed[1], inside
        )
        return (grown_rows, grown_cols), enough, ops.convert_to_tensor(True)

    def scored_growth(self, state, positions, count, k_max, exact, salt, *gradient):
        """`gradient = (scores, rows, cols)` at candidate positions: the `count`
        largest among those empty (and allowed); fewer when fewer are."""
        scores, cand_rows, cand_cols = gradient
        candidates = (ops.cast(cand_rows, "int32"), ops.cast(cand_cols, "int32"))
        active = state.rows < self.shape[0]
        valid = rewiring.empty_candidates(
            state.rows, state.cols, active, candidates, self.shape, salt
        )
        allowed = self.layer.allowed_indices
        if allowed is not None:
            valid = ops.logical_and(valid, allowed(*candidates))
        count = ops.minimum(ops.cast(count, "int32"), ops.sum(ops.cast(valid, "int32")))
        keys = rewiring.INT_MAX - rewiring.magnitude_keys(scores)
        grown = rewiring.compact_chosen(
            rewiring.select_smallest(keys, valid, count), candidates, k_max
        )
        true = ops.convert_to_tensor(True)
        return grown, count, true, true

    def replace(self, state, positions, drop, grown, grown_values=None):
        grown_rows, grown_cols = grown
        flat = rewiring.rewire_slots(self.flat(state), drop, grown_rows, grown_cols, grown_values)
        return self.state(flat), None


class TileStorage(SlotStorage):
    """Slot storage grouped by tile: O(nnz) routes read one tile at a time.

    The kernel is cut into the blocks of the layer's `allowed` pattern (a
    `BlockPattern` whose blocks divide the kernel evenly: the routes' `(h, h)`
    tiles between experts). Each allowed block, a tile, owns `capacity`
    consecutive slots: its connections, then parked slots (row `fan_in`,
    value zero). So the connections of a tile are one row of the `(tiles,
    capacity)` slot array, and a product that visits a few tiles reads only
    their connections (`tile_arrays`). Rewiring keeps every tile's count:
    SET and RigL regrow each dropped connection inside its own tile
    (uniformly at random, or by the largest gradient among candidates drawn
    evenly over the tiles), and pruning parks slots in place.
    """

    name = "tiles"
    reads_tiles = True

    def __init__(self, layer):
        from keras_sparse_moe.topologies import BlockPattern

        super().__init__(layer)
        self.capacity = None
        if not isinstance(layer.allowed, BlockPattern):
            raise ValueError(
                f"`{layer._owner}` with implementation='tiles' groups its connections by the "
                "blocks of its `allowed` pattern: give `allowed=BlockPattern(...)`. Received: "
                f"allowed={layer.allowed!r}"
            )

    # Geometry ----------------------------------------------------------- #
    def _geometry(self):
        """`(tile_rows, tile_cols, tile_of_block, block_of_tile)` for the built shape."""
        layer, (n_in, n_out) = self.layer, self.shape
        pattern = layer.allowed
        r, c = pattern.blocks.shape
        if n_in % r or n_out % c:
            raise ValueError(
                f"`{layer._owner}` '{layer.name}' with implementation='tiles' needs `allowed` "
                f"blocks that divide its {tuple(self.shape)} kernel evenly. Received: "
                f"{pattern!r}"
            )
        block_of_tile = np.flatnonzero(pattern.blocks.ravel()).astype(np.int32)
        tile_of_block = np.full(r * c, -1, np.int32)
        tile_of_block[block_of_tile] = np.arange(block_of_tile.size, dtype=np.int32)
        return int(n_in) // r, int(n_out) // c, tile_of_block, block_of_tile

    @property
    def num_tiles(self) -> int:
        return int(np.count_nonzero(self.layer.allowed.blocks))

    @property
    def tile_shape(self) -> tuple:
        """`(rows, cols)` of one tile."""
        return self._geometry()[:2]

    def tile_of_block(self):
        """int32 `(R * C,)`: the tile index of each block of the pattern (-1: none)."""
        return self._geometry()[2]

    def _tiles_of(self, rows, cols):
        """numpy tile index of each connection `(rows, cols)`."""
        th, tw, tile_of_block, _ = self._geometry()
        blocks_per_row = self.layer.allowed.blocks.shape[1]
        return tile_of_block[(rows // th) * blocks_per_row + cols // tw]

    def _layout(self, rows, cols, capacity=None):
        """`(rows, cols, where, capacity)`: the slots of connections `(rows, cols)`
        laid out tile by tile, `capacity` slots a tile (default: the fullest
        tile's count), parked slots after each tile's connections; `where[i]`
        is the connection in slot `i` (-1: parked)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        tiles = self._tiles_of(rows, cols)
        counts = np.bincount(tiles, minlength=self.num_tiles)
        if capacity is None:
            capacity = max(1, int(counts.max(initial=0)))
        if counts.max(initial=0) > capacity:
            layer = self.layer
            raise ValueError(
                f"`{layer._owner}` '{layer.name}' has {capacity} connection slots a tile. "
                f"Received: {int(counts.max())} connections in tile "
                f"{int(counts.argmax())}: build it with a higher density."
            )
        order = np.argsort(tiles, kind="stable")
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = tiles[order] * capacity + (np.arange(order.size) - start[tiles[order]])
        where = np.full(self.num_tiles * capacity, -1, np.int64)
        where[slot] = order
        live = where >= 0
        n_in = self.shape[0]
        out_rows = np.where(live, rows[np.maximum(where, 0)], n_in).astype(np.int32)
        out_cols = np.where(live, cols[np.maximum(where, 0)], 0).astype(np.int32)
        return out_rows, out_cols, where, capacity

    def random_positions(self, count, seed):
        """The Erdős–Rényi draw, stratified: every tile gets `count / tiles`
        distinct uniform positions (the remainder one more each in the first
        tiles), so no tile needs spare slots."""
        th, tw, _, block_of_tile = self._geometry()
        tiles, per_row = block_of_tile.size, self.layer.allowed.blocks.shape[1]
        counts = np.full(tiles, count // tiles)
        counts[: count % tiles] += 1
        generator = _runtime.rng(seed)
        rows, cols = [], []
        for tile, n in enumerate(counts):
            local = np.sort(generator.choice(th * tw, size=int(n), replace=False))
            block = block_of_tile[tile]
            rows.append((block // per_row) * th + local // tw)
            cols.append((block % per_row) * tw + local % tw)
        return np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)

    def build(self, rows, cols, scale):
        rows, cols, _, self.capacity = self._layout(rows, cols)
        super().build(rows, cols, scale)

    def assign_connections(self, rows, cols, values):
        rows, cols, where, _ = self._layout(rows, cols, self.capacity)
        values = np.asarray(values)
        for variable, array in zip(self.variables[1:], self._pack(rows, cols)):
            variable.assign(array)
        kept = np.where(where >= 0, values[np.maximum(where, 0)], 0) if values.size else where * 0
        self.layer.values.assign(kept.astype(self.layer.values.dtype))
        self.refresh()

    # Forward pass ------------------------------------------------------- #
    def tile_arrays(self, tiles):
        """`(values, rows, cols)`, each `(len(tiles), capacity)`: the slots of the
        given tiles (int32 indices), with rows and columns inside the tile.
        Only those slots are read and unpacked (O(len(tiles) * capacity));
        parked slots give row 0 and value zero (and no gradient)."""
        n_in, n_out = (int(n) for n in self.shape)
        th, tw = self.tile_shape
        shape = (self.num_tiles, self.capacity)
        values = ops.take(ops.reshape(ops.convert_to_tensor(self.layer.values), shape), tiles, 0)
        indices = [ops.take(ops.reshape(v, shape), tiles, 0) for v in self.variables[1:]]
        rows, cols = self._unpack(indices)
        rows, cols = ops.cast(rows, "int32"), ops.cast(cols, "int32")
        values = ops.where(rows < n_in, values, 0.0)
        return values, rows % th, cols % tw

    # Compiled rewiring primitives --------------------------------------- #
    def draw_candidates(self, seed, count):
        """`(rows, cols)` of about `count` candidates, evenly over the tiles, tile
        by tile: `ceil(count / tiles)` uniform random ones a tile (positions may
        repeat), or every position of each tile when that is as many."""
        th, tw, _, block_of_tile = self._geometry()
        tiles = self.num_tiles
        per_tile = max(1, -(-int(count) // tiles))
        if per_tile >= th * tw:
            per_tile, local = th * tw, ops.tile(ops.arange(th * tw, dtype="int32"), (tiles,))
            local_rows, local_cols = local // tw, local % tw
        else:
            local_rows, local_cols = rewiring.random_indices(seed, tiles * per_tile, (th, tw))
        blocks_per_row = self.layer.allowed.blocks.shape[1]
        origin_rows = np.repeat((block_of_tile // blocks_per_row) * th, per_tile)
        origin_cols = np.repeat((block_of_tile % blocks_per_row) * tw, per_tile)
        return local_rows + origin_rows.astype(np.int32), local_cols + origin_cols.astype(np.int32)

    def _per_tile(self, x):
        return ops.reshape(x, (self.num_tiles, -1))

    def _ranked(self, valid, scores, candidates):
        """A growth answer: per tile, its candidates best first (`order`), how many
        are acceptable, and the candidates' positions."""
        valid = self._per_tile(valid)
        key = ops.where(valid, -self._per_tile(scores), np.float32(3.0e38))
        order = ops.cast(ops.argsort(key, axis=-1), "int32")
        acceptable = ops.sum(ops.cast(valid, "int32"), axis=-1)
        return order, acceptable, candidates[0], candidates[1]

    def _drops_per_tile(self, drop):
        return ops.sum(ops.cast(self._per_tile(drop), "int32"), axis=-1)

    def random_growth(self, state, positions, drop, count, k_max, n_candidates, seed):
        """SET's growth: each dropped connection regrows at a random empty position
        of its own tile (a position dropped now may be regrown). `enough` is
        False when some tile has fewer acceptable candidates than drops."""
        candidates = self.draw_candidates(seed, n_candidates)
        kept = ops.logical_and(state.rows < self.shape[0], ops.logical_not(drop))
        valid = rewiring.empty_candidates(
            state.rows, state.cols, kept, candidates, self.shape, seed[1]
        )
        # Random scores: acceptable candidates are taken in a random order.
        salted = seed + np.array([0x51ED270B, 0], "int32")
        scores = _runtime.stateless_randint(salted, (valid.shape[0],), 1 << 24)
        grown = self._ranked(valid, ops.cast(scores, "float32"), candidates)
        enough = ops.all(grown[1] >= self._drops_per_tile(drop))
        return grown, enough, ops.convert_to_tensor(True)

    def scored_growth(self, state, positions, count, k_max, exact, salt, *gradient):
        """RigL's growth: `gradient = (scores, rows, cols)` at `draw_candidates`
        positions; each tile regrows at its empty candidates of largest
        `|score|`, as many as it drops (`refillable` caps a tile's drops at its
        acceptable candidates)."""
        scores, cand_rows, cand_cols = gradient
        candidates = (ops.cast(cand_rows, "int32"), ops.cast(cand_cols, "int32"))
        active = state.rows < self.shape[0]
        valid = rewiring.empty_candidates(
            state.rows, state.cols, active, candidates, self.shape, salt
        )
        grown = self._ranked(valid, ops.abs(ops.cast(scores, "float32")), candidates)
        count = ops.minimum(ops.cast(count, "int32"), ops.sum(grown[1]))
        true = ops.convert_to_tensor(True)
        return grown, count, true, true

    def refillable(self, drop, grown):
        """Each tile's drops, at most as many as it has acceptable candidates
        (the first ones in slot order)."""
        rank = ops.cumsum(ops.cast(self._per_tile(drop), "int32"), axis=-1)
        room = ops.expand_dims(grown[1], -1)
        return ops.logical_and(drop, ops.reshape(rank <= room, (-1,)))

    def replace(self, state, positions, drop, grown, grown_values=None):
        """The j-th drop of each tile (slot order) takes the tile's j-th best
        candidate; `drop` must be `refillable`."""
        order, _, cand_rows, cand_cols = grown
        per_tile = order.shape[-1]
        rank = ops.cumsum(ops.cast(self._per_tile(drop), "int32"), axis=-1) - 1
        rank = ops.clip(rank, 0, per_tile - 1)
        chosen = ops.take_along_axis(order, rank, axis=-1)
        tile = ops.expand_dims(ops.arange(self.num_tiles, dtype="int32"), -1)
        flat = ops.reshape(tile * per_tile + chosen, (-1,))
        flat_state = rewiring.write_slots(
            self.flat(state),
            drop,
            ops.take(cand_rows, flat),
            ops.take(cand_cols, flat),
            None if grown_values is None else rewiring.per_dropped_slot(grown_values, drop),
        )
        return self.state(flat_state), None


STORAGES = {storage.name: storage for storage in (MaskedStorage, SlotStorage, TileStorage)}
DEFAULT_STORAGE = MaskedStorage.name  # the layers' default `implementation`
