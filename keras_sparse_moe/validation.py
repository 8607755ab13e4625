"""Argument checks shared by every public class and function of the library.

One rule: a value of the wrong type raises `TypeError`, a value of the right
type outside its range raises `ValueError`; both name the owner (the class or
function called), the argument and the value received. Integer-like numpy
scalars are accepted wherever a Python int is, real numpy scalars wherever a
float is; `bool` is never taken for a number.

Examples:

    >>> import numpy as np
    >>> check_int("units", np.int64(8), "SparseDense")
    8
    >>> check_int("units", 0, "SparseDense")
    Traceback (most recent call last):
    ...
    ValueError: `SparseDense` got an invalid `units`. Expected an int >= 1. Received: units=0
"""

from __future__ import annotations

import base64
import math
from numbers import Integral, Real

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_connections",
    "check_connectivity",
    "check_density",
    "check_epsilon",
    "check_expert_bank",
    "check_float",
    "check_int",
    "check_int_tuple",
    "check_routing",
    "check_seed",
    "check_size",
    "check_type",
]


def _message(owner, name, expected, value):
    return f"`{owner}` got an invalid `{name}`. Expected {expected}. Received: {name}={value!r}"


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for Python and numpy reals (ints included), False for bools."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value, owner: str, minimum: int | None = 1, maximum=None) -> int:
    """`value` as a Python int within `[minimum, maximum]` (None: unbounded)."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an int >= {minimum}"
    elif maximum is not None:
        expected = f"an int <= {maximum}"
    else:
        expected = "an int"
    if not is_int(value):
        raise TypeError(_message(owner, name, expected, value))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(_message(owner, name, expected, int(value)))
    return int(value)


def check_size(name: str, value, owner: str) -> int:
    """`value` as a positive Python int (a number of units, experts, clusters)."""
    return check_int(name, value, owner, minimum=1)


def check_int_tuple(name: str, value, owner: str, rank: int, minimum: int = 1) -> tuple:
    """An int or `rank` ints (each >= `minimum`) as a tuple of `rank` Python ints."""
    expected = f"an int >= {minimum} or a tuple of {rank} such ints"
    items = (value,) * rank if is_int(value) else value
    if isinstance(items, str) or not hasattr(items, "__len__"):
        raise TypeError(_message(owner, name, expected, value))
    items = tuple(items)
    if not all(is_int(v) for v in items):
        raise TypeError(_message(owner, name, expected, value))
    if len(items) != rank or any(v < minimum for v in items):
        raise ValueError(_message(owner, name, expected, value))
    return tuple(int(v) for v in items)


def check_float(name: str, value, owner: str, expected: str, valid=None) -> float:
    """`value` as a Python float: `TypeError` unless a real number, `ValueError`
    unless `valid(value)` (NaN is refused). `expected` completes "Expected ...",
    e.g. "a float > 0"."""
    if not is_real(value):
        raise TypeError(_message(owner, name, expected, value))
    value = float(value)
    if math.isnan(value) or (valid is not None and not valid(value)):
        raise ValueError(_message(owner, name, expected, value))
    return value


def check_seed(seed, owner: str, name: str = "seed"):
    """`seed` as a non-negative Python int, or None."""
    if seed is None:
        return None
    return check_int(name, seed, owner, minimum=0)


def check_n_m(value, owner: str, name: str = "n_m") -> tuple:
    """An N:M pattern `(n, m)`: two ints with `1 <= n < m` (n kept of every m)."""
    expected = "a pair of ints (n, m) with 1 <= n < m, e.g. (2, 4)"
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(_message(owner, name, expected, value))
    if not all(is_int(v) for v in value):
        raise TypeError(_message(owner, name, expected, value))
    n, m = (int(v) for v in value)
    if not 1 <= n < m:
        raise ValueError(_message(owner, name, expected, tuple(value)))
    return n, m


def check_density(density, owner: str, name: str = "density") -> float:
    """`density` as a float in (0, 1]."""
    return check_float(name, density, owner, "a float in (0, 1]", lambda d: 0.0 < d <= 1.0)


def check_epsilon(epsilon, owner: str) -> float:
    """SET's `epsilon` as a positive float."""
    return check_float("epsilon", epsilon, owner, "a positive number", lambda e: e > 0)


def check_bool(name: str, value, owner: str) -> bool:
    """`value` if it is a bool (numpy's included)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(_message(owner, name, "a bool", value))
    return bool(value)


def check_choice(name: str, value, owner: str, choices) -> str:
    """`value` if it is one of the strings `choices`."""
    expected = f"one of {tuple(choices)}"
    if not isinstance(value, str):
        raise TypeError(_message(owner, name, expected, value))
    if value not in choices:
        raise ValueError(_message(owner, name, expected, value))
    return value


def check_type(name: str, value, owner: str, types, expected: str):
    """`value` if it is an instance of `types`, else a `TypeError` saying `expected`."""
    if not isinstance(value, types):
        raise TypeError(_message(owner, name, expected, value))
    return value


# --------------------------------------------------------------------------- #
# The arguments of the sparse layers (`SparseKernelLayer` and its subclasses).
# --------------------------------------------------------------------------- #
def check_connectivity(
    owner,
    kernel_shape,
    *,
    density,
    epsilon,
    topology,
    mask,
    connections,
    topology_kwargs,
    allowed,
    implementation,
    dense_limit,
) -> dict:
    """The checked connectivity arguments of a sparse layer whose kernel has
    `kernel_shape` (`None` where the input size is not known yet).

    At most one of `density`/`epsilon`, `mask`, `connections` and a `degree` in
    `topology_kwargs` says how many connections there are. Returns them
    normalised: floats, a float32 numpy mask, int32 `(rows, cols)`, a dict of
    topology arguments, a `BlockPattern` or None for `allowed`.
    """
    from keras_sparse_moe import topologies
    from keras_sparse_moe.layers.storage import STORAGES
    from keras_sparse_moe.ops.masking import decode_mask

    check_choice("implementation", implementation, owner, tuple(STORAGES))
    topologies.get(topology, owner)
    if topology_kwargs is not None:
        check_type("topology_kwargs", topology_kwargs, owner, dict, "a dict or None")
    topology_kwargs = dict(topology_kwargs or {})
    sources = {
        "density": density,
        "epsilon": epsilon,
        "mask": None if mask is None else "given",
        "connections": None if connections is None else "given",
        "topology_kwargs['degree']": topology_kwargs.get("degree"),
    }
    given = {name: value for name, value in sources.items() if value is not None}
    if len(given) > 1:
        raise ValueError(
            f"`{owner}` takes one of `density`, `epsilon`, `mask`, `connections` or a "
            f"`degree` in `topology_kwargs`, not both. Received: {given}"
        )
    if density is not None:
        density = check_density(density, owner)
    if epsilon is not None:
        epsilon = check_epsilon(epsilon, owner)
    if connections is not None:
        connections = check_connections(connections, kernel_shape[-1], owner)
    if mask is not None:
        mask = _check_mask(decode_mask(mask), kernel_shape, owner, dense_limit)
    if allowed is not None and not isinstance(allowed, topologies.BlockPattern):
        try:
            allowed = topologies.BlockPattern(decode_mask(allowed))
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"`{owner}` got an invalid `allowed`. Expected None, a "
                "`keras_sparse_moe.topologies.BlockPattern` or a binary 2-D array. "
                f"Received: allowed={allowed!r} ({error})"
            ) from None
    return {
        "density": density,
        "epsilon": epsilon,
        "mask": mask,
        "connections": connections,
        "topology_kwargs": topology_kwargs,
        "allowed": allowed,
    }


def _check_mask(mask, kernel_shape, owner, dense_limit):
    """A binary mask of the kernel's shape (`None` in `kernel_shape`: any size) as float32."""
    if mask.size > dense_limit:
        raise ValueError(
            f"`{owner}` got a dense `mask` of shape {mask.shape}, too large to densify "
            f"(more than {dense_limit} entries). Pass the positions instead: "
            "`connections=(rows, cols)` with implementation='sparse'."
        )
    if len(mask.shape) != len(kernel_shape) or any(
        e is not None and e != s for e, s in zip(kernel_shape, mask.shape)
    ):
        hint = tuple("input_dim" if e is None else e for e in kernel_shape)
        raise ValueError(
            f"`{owner}` got a `mask` of the wrong shape. Expected the kernel's shape {hint}. "
            f"Received: mask.shape={tuple(mask.shape)}"
        )
    if not np.all((mask == 0) | (mask == 1)):
        bad = np.unique(mask[(mask != 0) & (mask != 1)])[:5]
        raise ValueError(
            f"`{owner}` got a non-binary `mask`. Expected only 0 and 1. Received values such "
            f"as {bad.tolist()}"
        )
    return mask.astype(np.float32)


def check_connections(connections, units, owner):
    """A connection list as int32 numpy `(rows, cols)`, checked: integer, 1-D, equal
    lengths, non-negative, columns below `units`, no position twice. Takes `(rows,
    cols)`, an `(nnz, 2)` array, or the base64 dict a layer's config holds."""
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


# --------------------------------------------------------------------------- #
# The arguments of `SparseExpertMixture`.
# --------------------------------------------------------------------------- #
def check_expert_bank(
    owner,
    *,
    units,
    num_experts,
    experts,
    expert_units,
    expert_density,
    route_density,
    implementation,
    route_implementation=None,
) -> dict:
    """The checked experts of a mixture: built-in (`num_experts` and `units`, with
    their width, density, routes and storage) or user `experts` (a list of
    layers, which the built-in arguments do not shape). Returns `units`,
    `num_experts`, and for built-in experts `expert_units`, `expert_density`
    `route_density`, `implementation` and `route_implementation` with their
    defaults filled in (the routes' storage: `ROUTE_TILES_ABOVE`)."""
    import keras

    from keras_sparse_moe.layers.storage import DEFAULT_STORAGE, STORAGES

    if (num_experts is None) == (experts is None):
        raise ValueError(
            f"`{owner}` takes either `num_experts` (built-in sparse experts) or `experts` (a "
            f"list of layers), exactly one. Received: num_experts={num_experts!r}, "
            f"experts={'None' if experts is None else 'a list'}"
        )
    if implementation is not None:
        check_choice("implementation", implementation, owner, tuple(STORAGES))
    if route_implementation is not None:
        check_choice("route_implementation", route_implementation, owner, tuple(STORAGES))
    if experts is not None:
        if not isinstance(experts, (list, tuple)) or not experts:
            raise TypeError(_message(owner, "experts", "a non-empty list of Keras layers", experts))
        bad = [e for e in experts if not isinstance(e, keras.layers.Layer)]
        if bad:
            raise TypeError(
                f"`{owner}` got an invalid expert. Expected Keras layers or models. "
                f"Received: {bad[0]!r}"
            )
        given = {
            "expert_units": expert_units,
            "expert_density": expert_density,
            "route_density": route_density,
            "implementation": implementation,
            "route_implementation": route_implementation,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            raise ValueError(
                f"`{owner}`: {sorted(given)} shape the built-in experts and do not apply to "
                f"user `experts`. Received: {given}"
            )
        return {
            "units": None if units is None else check_size("units", units, owner),
            "num_experts": len(experts),
        }
    if units is None:
        raise ValueError(
            f"`{owner}` with built-in experts needs `units`, their output width. "
            "Received: units=None"
        )
    units = check_size("units", units, owner)
    routes = 0.0
    if route_density is not None:
        routes = check_float(
            "route_density", route_density, owner, "a float in [0, 1)", lambda r: 0 <= r < 1
        )
    num_experts = check_size("num_experts", num_experts, owner)
    expert_units = check_size(
        "expert_units", units if expert_units is None else expert_units, owner
    )
    implementation = DEFAULT_STORAGE if implementation is None else implementation
    if route_implementation is None:
        large = (num_experts * expert_units) ** 2 > ROUTE_TILES_ABOVE
        tiles = num_experts > 1 and routes > 0
        tiles = tiles and (large or not STORAGES[implementation].stores_dense)
        route_implementation = "tiles" if tiles else implementation
    return {
        "units": units,
        "num_experts": num_experts,
        "expert_units": expert_units,
        "expert_density": check_density(
            0.1 if expert_density is None else expert_density, owner, "expert_density"
        ),
        "route_density": routes,
        "implementation": implementation,
        "route_implementation": route_implementation,
    }


# Route matrices `(E * expert_units)^2` above this many entries (16 MB of float32)
# keep their connections by tile (`TileStorage`) by default: O(connections) memory
# and work, instead of a dense kernel and mask.
ROUTE_TILES_ABOVE = 1 << 22


def check_routing(owner, *, top_k, gate_top_k, num_experts, capacity_factor) -> tuple:
    """The checked `(top_k, capacity_factor)` of a mixture whose gate selects
    `gate_top_k` experts (None: all): `top_k` defaults to the gate's and must
    agree with it; the capacity dispatch needs a `top_k`."""
    if top_k is None:
        top_k = gate_top_k
    elif gate_top_k is not None and top_k != gate_top_k:
        raise ValueError(
            f"`{owner}` got `top_k={top_k}` but its gate selects top_k={gate_top_k} experts "
            "per token. Leave `top_k` unset or make them equal."
        )
    if top_k is not None:
        top_k = check_int("top_k", top_k, owner, 1, num_experts)
    if capacity_factor is not None:
        capacity_factor = check_float(
            "capacity_factor", capacity_factor, owner, "a float > 0 or None", lambda c: c > 0
        )
        if top_k is None:
            raise ValueError(
                f"`{owner}`: the capacity dispatch (`capacity_factor`) routes each token to "
                "its `top_k` experts; set `top_k` (or use a gate with a `top_k`). Received: "
                f"capacity_factor={capacity_factor}, top_k=None"
            )
    return top_k, capacity_factor
