"""Seeded builders of binary connectivity masks, block patterns bounding them, spectral metrics.

Every builder is a pure function returning a `float32` numpy array of shape
`(n_in, n_out)` holding only 0 and 1: entry `[i, j]` is 1 when input `i` feeds
output `j`. Random builders take a `seed` and give the same mask for the same
seed; the circulant ones (`structured_regular`, `fibonacci`) are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.linalg

__all__ = [
    "TOPOLOGIES",
    "BlockPattern",
    "algebraic_connectivity",
    "density_from_epsilon",
    "erdos_renyi",
    "erdos_renyi_positions",
    "erk_densities",
    "fibonacci",
    "get",
    "pseudo_random_regular",
    "random_regular",
    "small_world",
    "spectral_gap",
    "structured_regular",
]


# --------------------------------------------------------------------------- #
# Argument checks shared by the builders and the layers.
# --------------------------------------------------------------------------- #
def check_size(name: str, value, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{owner}` got an invalid `{name}`. Expected a positive int. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(
            f"`{owner}` got an invalid `{name}`. Expected a positive int. Received: {name}={value}"
        )
    return int(value)


def check_float(name: str, value, owner: str, expected: str, valid) -> float:
    """`value` as a float: `TypeError` unless a real number, `ValueError` unless `valid(value)`.

    `expected` completes "Expected ..." in the message, e.g. "a float > 0".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"`{owner}` got an invalid `{name}`. Expected {expected}. Received: {name}={value!r}"
        )
    if not valid(value):
        raise ValueError(
            f"`{owner}` got an invalid `{name}`. Expected {expected}. Received: {name}={value!r}"
        )
    return float(value)


def check_seed(seed, owner: str):
    """Returns `seed` if it is None or an int, else raises a `TypeError`."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"`{owner}` got an invalid `seed`. Expected an int or None. "
            f"Received: seed={seed!r} of type {type(seed).__name__}"
        )
    if seed < 0:
        raise ValueError(
            f"`{owner}` got an invalid `seed`. Expected a non-negative int. Received: seed={seed}"
        )
    return int(seed)


def check_density(density, owner: str, name: str = "density") -> float:
    """Returns `density` as a float if it lies in (0, 1], else raises."""
    if isinstance(density, bool) or not isinstance(density, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"`{owner}` got an invalid `{name}`. Expected a float in (0, 1]. "
            f"Received: {name}={density!r} of type {type(density).__name__}"
        )
    if not 0.0 < float(density) <= 1.0 or math.isnan(float(density)):
        raise ValueError(
            f"`{owner}` got an invalid `{name}`. Expected a float in (0, 1]. "
            f"Received: {name}={density}"
        )
    return float(density)


def check_epsilon(epsilon, owner: str) -> float:
    """Returns `epsilon` as a float if it is a positive number, else raises."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"`{owner}` got an invalid `epsilon`. Expected a positive number. "
            f"Received: epsilon={epsilon!r} of type {type(epsilon).__name__}"
        )
    if not epsilon > 0:
        raise ValueError(
            f"`{owner}` got an invalid `epsilon`. Expected a positive number. "
            f"Received: epsilon={epsilon}"
        )
    return float(epsilon)


def density_from_epsilon(epsilon: float, n_in: int, n_out: int, kernel_dims=()) -> float:
    """SET's density `p = epsilon * (n_in + n_out) / (n_in * n_out)`.

    For a convolution kernel `(*kernel_dims, n_in, n_out)` the kernel
    dimensions count as in ERK (Evci et al. 2020): `p = epsilon *
    sum(shape) / prod(shape)`. Raises a `ValueError` when `epsilon` is not
    positive or gives `p > 1`.

    Example:
    >>> round(density_from_epsilon(20, 784, 1000), 4)
    0.0455
    >>> round(density_from_epsilon(2, 64, 64, kernel_dims=(3, 3)), 4)
    0.0073
    """
    epsilon = check_epsilon(epsilon, "density_from_epsilon")
    shape = (*kernel_dims, n_in, n_out)
    density = float(epsilon) * sum(shape) / math.prod(shape)
    if density > 1.0:
        max_epsilon = math.prod(shape) / sum(shape)
        raise ValueError(
            f"`epsilon={epsilon}` gives a density of {density:.3g} > 1 for a "
            f"{'x'.join(str(d) for d in shape)} kernel. Use epsilon <= {max_epsilon:.4g} or "
            "pass `density` instead."
        )
    return density


def _degree(n_out: int, density, degree, owner: str) -> int:
    """Resolves the per-input out-degree from either `density` or `degree`."""
    if (density is None) == (degree is None):
        raise ValueError(
            f"`{owner}` needs exactly one of `density` or `degree`. "
            f"Received: density={density}, degree={degree}"
        )
    if degree is None:
        density = check_density(density, owner)
        return max(1, int(round(density * n_out)))
    degree = check_size("degree", degree, owner)
    if degree > n_out:
        raise ValueError(
            f"`{owner}` got an invalid `degree`. Expected at most "
            f"n_out={n_out} (an input cannot feed more outputs than exist). "
            f"Received: degree={degree}"
        )
    return degree


def _degree_arguments(owner, n_in, n_out, density, degree, seed):
    """The checked `(n_in, n_out, degree, seed)` of a builder with a per-input degree."""
    n_in = check_size("n_in", n_in, owner)
    n_out = check_size("n_out", n_out, owner)
    seed = check_seed(seed, owner)
    return n_in, n_out, _degree(n_out, density, degree, owner), seed


def _circulant(n_in: int, n_out: int, row: np.ndarray) -> np.ndarray:
    """Rows are `row` rotated by one position per input."""
    cols = (row[None, :] + np.arange(n_in)[:, None]) % n_out
    mask = np.zeros((n_in, n_out), dtype=np.float32)
    mask[np.arange(n_in)[:, None], cols] = 1.0
    return mask


# --------------------------------------------------------------------------- #
# Builders.
# --------------------------------------------------------------------------- #
def erdos_renyi(
    n_in: int,
    n_out: int,
    density: float | None = None,
    epsilon: float | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Erdős–Rényi bipartite mask with an exact number of connections.

    `round(density * n_in * n_out)` connections (at least one) are placed at
    uniformly random distinct positions, the G(n, M) form of the model, so the
    realised density equals the requested one up to rounding. Give either
    `density` or SET's `epsilon` (Mocanu et al. 2018), which sets
    `density = epsilon * (n_in + n_out) / (n_in * n_out)`.

    Example:
    >>> m = erdos_renyi(784, 1000, epsilon=20, seed=0)
    >>> int(m.sum())
    35680
    """
    owner = "erdos_renyi"
    n_in = check_size("n_in", n_in, owner)
    n_out = check_size("n_out", n_out, owner)
    seed = check_seed(seed, owner)
    if density is not None and epsilon is not None:
        raise ValueError(
            "Pass either `density` or `epsilon`, not both. "
            f"Received: density={density}, epsilon={epsilon}"
        )
    if epsilon is not None:
        density = density_from_epsilon(epsilon, n_in, n_out)
    if density is None:
        raise ValueError("`erdos_renyi` needs `density` or `epsilon`.")
    density = check_density(density, owner)
    total = n_in * n_out
    count = max(1, int(round(density * total)))
    rows, cols = erdos_renyi_positions(n_in, n_out, count, seed=seed)
    mask = np.zeros((n_in, n_out), dtype=np.float32)
    mask[rows, cols] = 1.0
    return mask


def erdos_renyi_positions(
    n_in: int, n_out: int, count: int, seed: int | None = None, allowed=None
) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct uniformly random positions of an `(n_in, n_out)` matrix,
    as int32 `(rows, cols)` in row-major order, without a dense array.

    The positions of `erdos_renyi(n_in, n_out, density, seed=seed)` for
    `count = round(density * n_in * n_out)`: both draw the same. Memory is
    O(count) (a 600k x 600k layer at SET's epsilon 20, 24 M positions, takes
    about 4 s and 0.5 GB). `allowed` (a `BlockPattern`) restricts the draw to
    its allowed positions, uniformly.

    Example:
    >>> rows, cols = erdos_renyi_positions(600_000, 600_000, 5, seed=0)
    >>> rows.dtype, len(set(zip(rows.tolist(), cols.tolist())))
    (dtype('int32'), 5)
    """
    owner = "erdos_renyi_positions"
    n_in = check_size("n_in", n_in, owner)
    n_out = check_size("n_out", n_out, owner)
    count = check_size("count", count, owner)
    if max(n_in, n_out) > 2**31 - 1:
        raise ValueError(
            f"`{owner}` needs n_in and n_out below 2**31 (int32 positions). "
            f"Received: n_in={n_in}, n_out={n_out}"
        )
    total = n_in * n_out
    room = total if allowed is None else allowed.count((n_in, n_out))
    if count > room:
        raise ValueError(
            f"`{owner}` got a `count` above the {room} positions available. Received: count={count}"
        )
    rng = np.random.default_rng(check_seed(seed, owner))
    if allowed is None:
        flat = np.sort(rng.choice(total, size=count, replace=False))
    elif total <= _DENSE_DRAW_LIMIT:
        inside = np.flatnonzero(allowed.dense((n_in, n_out)).ravel())
        flat = np.sort(rng.choice(inside, size=count, replace=False))
    else:
        flat = _rejection_draw(rng, n_in, n_out, count, allowed)
    return (flat // n_out).astype(np.int32), (flat % n_out).astype(np.int32)


_DENSE_DRAW_LIMIT = 1 << 26  # above this many positions, `allowed` draws by rejection


def _rejection_draw(rng, n_in, n_out, count, allowed):
    """Sorted distinct flat positions inside `allowed`: iid draws, kept where allowed
    and new, in order of first appearance (a uniform sample without replacement)."""
    share = allowed.count((n_in, n_out)) / (n_in * n_out)
    found = np.empty(0, np.int64)
    while found.size < count:
        draws = rng.integers(0, n_in * n_out, int((count - found.size) / share * 1.1) + 64)
        draws = draws[allowed.allows(draws // n_out, draws % n_out, (n_in, n_out))]
        merged = np.concatenate([found, draws])
        _, first = np.unique(merged, return_index=True)
        found = merged[np.sort(first)][:count]
    return np.sort(found)


def random_regular(
    n_in: int,
    n_out: int,
    density: float | None = None,
    degree: int | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Random biregular mask: a random bipartite expander.

    Every input has exactly `degree` outputs (`degree = round(density * n_out)`
    when `density` is given) and every output receives `n_in * degree / n_out`
    inputs, rounded up or down. Drawn from the configuration model, with
    repeated pairs repaired by degree-preserving swaps.

    Example:
    >>> m = random_regular(100, 50, degree=5, seed=0)
    >>> set(m.sum(axis=1).tolist()), set(m.sum(axis=0).tolist())
    ({5.0}, {10.0})
    """
    n_in, n_out, degree, seed = _degree_arguments(
        "random_regular", n_in, n_out, density, degree, seed
    )
    rng = np.random.default_rng(seed)
    if 2 * degree > n_out:
        # Dense side: the complement is a sparse biregular graph, cheaper to draw.
        return 1.0 - _configuration_model(n_in, n_out, n_out - degree, rng)
    return _configuration_model(n_in, n_out, degree, rng)


def _configuration_model(n_in, n_out, degree, rng) -> np.ndarray:
    if degree == 0:
        return np.zeros((n_in, n_out), dtype=np.float32)
    stubs = n_in * degree
    # Output stubs, as evenly spread as the total allows, in random order.
    column_stubs = np.arange(stubs) % n_out
    rng.shuffle(column_stubs)
    counts = np.zeros((n_in, n_out), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_in), degree), column_stubs), 1)
    # Each swap moves one copy of a repeated pair (i, j) and one edge (i2, j2)
    # to (i, j2) and (i2, j): row and column degrees are unchanged.
    while True:
        rows, cols = np.nonzero(counts > 1)
        if rows.size == 0:
            break
        for i, j in zip(rows, cols):
            while counts[i, j] > 1:
                i2 = rng.integers(n_in)
                j2 = rng.integers(n_out)
                if counts[i2, j2] == 1 and counts[i, j2] == 0 and counts[i2, j] == 0:
                    counts[i, j] -= 1
                    counts[i2, j2] -= 1
                    counts[i, j2] += 1
                    counts[i2, j] += 1
    return counts.astype(np.float32)


def structured_regular(
    n_in: int,
    n_out: int,
    density: float | None = None,
    degree: int | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Deterministic circulant mask with regularly spaced connections.

    Row 0 has `degree` ones at offsets `floor(k * n_out / degree)`; row `i` is
    row 0 rotated right by `i` ("Sparse Neural Networks Topologies", seed 002).
    Every input has exactly `degree` outputs. `seed` is accepted for a common
    signature and ignored.

    Example:
    >>> structured_regular(3, 6, degree=2).astype(int).tolist()
    [[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1]]
    """
    n_in, n_out, degree, seed = _degree_arguments(
        "structured_regular", n_in, n_out, density, degree, seed
    )
    row = (np.arange(degree) * n_out) // degree
    return _circulant(n_in, n_out, row)


_FIBONACCI_RESCALE = ("as_needed", "always")


def _fibonacci_offsets(n_out: int, degree: int, rescale: str) -> np.ndarray:
    """`degree` distinct offsets in [0, n_out) following the Fibonacci sequence."""
    fib = [0, 1]
    while len(fib) < degree + 1:
        fib.append(fib[-1] + fib[-2])
    fib = np.array(sorted(set(fib)), dtype=np.int64)[:degree]
    if rescale == "as_needed" and fib[-1] < n_out:
        return fib  # seed 002: the Fibonacci numbers themselves
    # Rescale so the largest lands inside the row, then top up to exactly
    # `degree` ones with free positions spread evenly over the row.
    scaled = np.unique((fib * n_out) // (fib[-1] + 1))
    missing = degree - scaled.size
    if missing > 0:
        free = np.setdiff1d(np.arange(n_out), scaled)
        picks = (np.arange(missing) * free.size) // missing
        scaled = np.sort(np.concatenate([scaled, free[picks]]))
    return scaled


def fibonacci(
    n_in: int,
    n_out: int,
    density: float | None = None,
    degree: int | None = None,
    seed: int | None = None,
    rescale: str = "as_needed",
) -> np.ndarray:
    """Deterministic circulant mask with ones at Fibonacci-number offsets.

    Row 0 has ones at the first `degree` distinct Fibonacci numbers
    (0, 1, 2, 3, 5, 8, ...); row `i` is row 0 rotated right by `i`
    ("Sparse Neural Networks Topologies", seed 002). Every input has exactly
    `degree` outputs. `seed` is ignored.

    Args:
        rescale: `"as_needed"` (default, seed 002's rule): the offsets are the
            Fibonacci numbers themselves while they fit in the row (all below
            `n_out`), and are rescaled as below only when they do not.
            `"always"`: the numbers are always stretched over the row
            (`floor(f * n_out / (f_max + 1))`), which spreads the connections
            over the whole row; offsets that coincide after rescaling are
            replaced by evenly spread free positions.

    Example:
    >>> fibonacci(1, 100, degree=6).nonzero()[1].tolist()
    [0, 1, 2, 3, 5, 8]
    >>> fibonacci(1, 100, degree=6, rescale="always").nonzero()[1].tolist()
    [0, 11, 22, 33, 55, 88]
    """
    if rescale not in _FIBONACCI_RESCALE:
        raise ValueError(
            f"`fibonacci` got an invalid `rescale`. Expected one of {list(_FIBONACCI_RESCALE)}. "
            f"Received: rescale={rescale!r}"
        )
    n_in, n_out, degree, _ = _degree_arguments("fibonacci", n_in, n_out, density, degree, seed)
    return _circulant(n_in, n_out, _fibonacci_offsets(n_out, degree, rescale))


def pseudo_random_regular(
    n_in: int,
    n_out: int,
    density: float | None = None,
    degree: int | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Circulant mask from one random row ("pseudo-random regular", seed 002).

    Row 0 has `degree` ones at uniformly random distinct positions; row `i` is
    row 0 rotated right by `i`. Every input has exactly `degree` outputs and,
    for a square mask, every output exactly `degree` inputs. Cheaper to
    describe than `random_regular` (one row), but its rows are shifts of each
    other, so it is not an expander in general.

    Example:
    >>> m = pseudo_random_regular(4, 10, degree=3, seed=0)
    >>> [np.flatnonzero(r).tolist() for r in m[:2]]
    [[5, 6, 9], [0, 6, 7]]
    """
    n_in, n_out, degree, seed = _degree_arguments(
        "pseudo_random_regular", n_in, n_out, density, degree, seed
    )
    row = np.sort(np.random.default_rng(seed).choice(n_out, size=degree, replace=False))
    return _circulant(n_in, n_out, row)


def cluster_ids(n: int, num_clusters: int) -> np.ndarray:
    """Assigns `n` units to `num_clusters` contiguous, near-equal blocks."""
    return (np.arange(n) * num_clusters) // n


class BlockPattern:
    """Where a layer's connections may exist, stated per block (no dense array needed).

    The inputs are split into `R` and the outputs into `C` contiguous,
    near-equal groups (`cluster_ids`, as `small_world` splits its clusters);
    input `i` may feed output `j` when `blocks[group(i), group(j)]` is 1. A
    `(n_in, n_out)` array is the finest pattern (groups of one). Growth steps
    (SET, RigL) only grow where the pattern allows, and `SparseDense` checks
    its initial mask against it; the test on a position is a few integer ops,
    so a layer of any size is bounded by an `R x C` array.

    Args:
        blocks: Binary 2-D array `(R, C)`.

    Example:

    >>> import numpy as np
    >>> routes = BlockPattern.between_clusters(3)  # links only between different clusters
    >>> routes.dense((6, 6)).astype(int)[:2].tolist()
    [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    >>> routes.count((6, 6))
    24
    """

    def __init__(self, blocks):
        blocks = np.asarray(blocks)
        if blocks.ndim != 2 or blocks.size == 0:
            raise ValueError(
                "`BlockPattern` got invalid `blocks`. Expected a non-empty 2-D binary "
                f"array (R, C). Received: shape {blocks.shape}"
            )
        if not np.all((blocks == 0) | (blocks == 1)):
            raise ValueError(
                "`BlockPattern` got non-binary `blocks`. Expected only 0 and 1. Received "
                f"values such as {np.unique(blocks[(blocks != 0) & (blocks != 1)])[:5].tolist()}"
            )
        if not blocks.any():
            raise ValueError("`BlockPattern` got `blocks` with no 1: no connection could exist.")
        self.blocks = blocks.astype(bool)

    @classmethod
    def between_clusters(cls, num_clusters: int) -> BlockPattern:
        """Links only between different clusters (the routes of a mixture of experts)."""
        num_clusters = check_size("num_clusters", num_clusters, "BlockPattern")
        if num_clusters < 2:
            raise ValueError(
                "`BlockPattern.between_clusters` needs at least 2 clusters. "
                f"Received: num_clusters={num_clusters}"
            )
        return cls(1 - np.eye(num_clusters, dtype=int))

    @classmethod
    def within_clusters(cls, num_clusters: int) -> BlockPattern:
        """Links only inside each cluster (block-diagonal)."""
        return cls(np.eye(check_size("num_clusters", num_clusters, "BlockPattern"), dtype=int))

    def check(self, shape, owner: str = "BlockPattern"):
        """Raises unless the pattern can split a `(n_in, n_out)` kernel."""
        rows, cols = self.blocks.shape
        if rows > shape[0] or cols > shape[1]:
            raise ValueError(
                f"`{owner}` got an `allowed` pattern of {rows}x{cols} blocks, more than its "
                f"kernel has rows or columns. Expected at most {tuple(shape)}. Received: "
                f"blocks.shape={self.blocks.shape}"
            )
        for n, g in zip(shape, self.blocks.shape):
            if g != n and n * g > 2**31 - 1:  # `contains` computes (i * g) // n in int32
                raise ValueError(
                    f"`{owner}` got an `allowed` pattern too fine for int32 block lookup on a "
                    f"{tuple(shape)} kernel: use fewer blocks, or one per row/column. "
                    f"Received: blocks.shape={self.blocks.shape}"
                )

    def _groups(self, shape):
        rows, cols = self.blocks.shape
        return cluster_ids(shape[0], rows), cluster_ids(shape[1], cols)

    def dense(self, shape) -> np.ndarray:
        """The `(n_in, n_out)` boolean array of allowed positions (small layers, tests)."""
        self.check(shape)
        rows, cols = self._groups(shape)
        return self.blocks[rows[:, None], cols[None, :]]

    def count(self, shape) -> int:
        """Number of allowed positions of a `(n_in, n_out)` kernel."""
        self.check(shape)
        rows, cols = self._groups(shape)
        row_sizes = np.bincount(rows, minlength=self.blocks.shape[0])
        col_sizes = np.bincount(cols, minlength=self.blocks.shape[1])
        return int(row_sizes @ self.blocks.astype(np.int64) @ col_sizes)

    def contains(self, positions, shape):
        """Boolean tensor: which flat (row-major) `positions` of a `(n_in, n_out)` kernel
        are allowed. `keras.ops` only: usable inside compiled steps."""
        from keras import ops

        positions = ops.cast(positions, "int32")
        n_out = int(shape[1])
        return self.contains_indices(positions // n_out, positions % n_out, shape)

    def contains_indices(self, rows, cols, shape):
        """Boolean tensor: which `(rows[k], cols[k])` of a `(n_in, n_out)` kernel are
        allowed (`keras.ops`, any kernel size whose sides fit in int32)."""
        from keras import ops

        n_in, n_out = int(shape[0]), int(shape[1])
        r, c = self.blocks.shape
        row, col = ops.cast(rows, "int32"), ops.cast(cols, "int32")
        # Group of index i among n in g groups: (i * g) // n, as `cluster_ids`.
        row = row if r == n_in else row * r // n_in
        col = col if c == n_out else col * c // n_out
        flat = ops.convert_to_tensor(self.blocks.ravel())
        return ops.take(flat, ops.clip(row * c + col, 0, r * c - 1))

    def allows(self, rows, cols, shape) -> np.ndarray:
        """numpy `contains_indices`: which `(rows[k], cols[k])` are allowed."""
        n_in, n_out = int(shape[0]), int(shape[1])
        r, c = self.blocks.shape
        row = np.asarray(rows, np.int64) * r // n_in
        col = np.asarray(cols, np.int64) * c // n_out
        return self.blocks[row, col]

    def get_config(self) -> dict:
        from keras_sparse_moe.ops.masking import encode_mask

        return {"blocks": encode_mask(self.blocks)}

    @classmethod
    def from_config(cls, config) -> BlockPattern:
        from keras_sparse_moe.ops.masking import decode_mask

        return cls(decode_mask(config["blocks"]))

    def __eq__(self, other):
        return isinstance(other, BlockPattern) and np.array_equal(self.blocks, other.blocks)

    def __repr__(self):
        allowed = int(self.blocks.sum())
        return f"BlockPattern(blocks of shape {self.blocks.shape}, {allowed} allowed)"


def small_world(
    n_in: int,
    n_out: int,
    density: float,
    num_clusters: int = 4,
    rewire: float = 0.1,
    seed: int | None = None,
) -> np.ndarray:
    """Clustered mask: dense-ish blocks with a few long-range links between.

    Inputs and outputs are split into `num_clusters` contiguous blocks. Of the
    `round(density * n_in * n_out)` connections, the fraction `1 - rewire`
    lies inside the diagonal blocks (input cluster c to output cluster c) and
    the fraction `rewire` links different clusters, in the spirit of the
    Watts–Strogatz rewiring probability. Positions are uniform within each
    part. This is the shape of a mixture of sparse experts with sparse routes.

    Example:
    >>> m = small_world(40, 40, density=0.2, num_clusters=4, rewire=0.1, seed=0)
    >>> int(m.sum())
    320
    """
    owner = "small_world"
    n_in = check_size("n_in", n_in, owner)
    n_out = check_size("n_out", n_out, owner)
    num_clusters = check_size("num_clusters", num_clusters, owner)
    seed = check_seed(seed, owner)
    density = check_density(density, owner)
    if num_clusters > min(n_in, n_out):
        raise ValueError(
            f"`{owner}` got an invalid `num_clusters`. Expected at most "
            f"min(n_in, n_out)={min(n_in, n_out)}. Received: "
            f"num_clusters={num_clusters}"
        )
    if isinstance(rewire, bool) or not 0.0 <= float(rewire) <= 1.0:
        raise ValueError(
            f"`{owner}` got an invalid `rewire`. Expected a float in [0, 1]. "
            f"Received: rewire={rewire}"
        )
    same = cluster_ids(n_in, num_clusters)[:, None] == cluster_ids(n_out, num_clusters)[None, :]
    inside = np.flatnonzero(same.ravel())
    across = np.flatnonzero(~same.ravel())
    total = max(1, int(round(density * n_in * n_out)))
    n_across = min(across.size, int(round(float(rewire) * total)))
    n_inside = min(inside.size, total - n_across)
    # Whatever does not fit inside the blocks spills over to the links between.
    n_across = min(across.size, total - n_inside)
    rng = np.random.default_rng(seed)
    flat = np.zeros(n_in * n_out, dtype=np.float32)
    flat[rng.choice(inside, size=n_inside, replace=False)] = 1.0
    flat[rng.choice(across, size=n_across, replace=False)] = 1.0
    return flat.reshape(n_in, n_out)


TOPOLOGIES: dict[str, Callable[..., np.ndarray]] = {
    "erdos_renyi": erdos_renyi,
    "random_regular": random_regular,
    "structured_regular": structured_regular,
    "fibonacci": fibonacci,
    "pseudo_random_regular": pseudo_random_regular,
    "small_world": small_world,
}


def get(name: str) -> Callable[..., np.ndarray]:
    """Returns the builder registered under `name`, or raises a `ValueError`."""
    if not isinstance(name, str) or name not in TOPOLOGIES:
        raise ValueError(
            f"Unknown `topology`. Expected one of {sorted(TOPOLOGIES)}. Received: topology={name!r}"
        )
    return TOPOLOGIES[name]


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """RigL's Erdős–Rényi-Kernel allocation of a global density over layers.

    A layer of shape `(..., n_in, n_out)` (kernel dimensions first for convs)
    gets a density proportional to `sum(shape) / prod(shape)`, scaled so the
    total number of weights kept is `density * sum(prod(shape))`. Layers whose
    density would exceed 1 are made dense and the scale re-solved for the rest
    (Evci et al. 2020).

    Example:
    >>> [round(d, 3) for d in erk_densities([(784, 300), (300, 100), (100, 10)], 0.1)]
    [0.08, 0.23, 1.0]
    """
    density = check_density(density, "erk_densities")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes or any(len(s) < 2 or min(s) <= 0 for s in shapes):
        raise ValueError(
            "`erk_densities` needs a non-empty list of shapes with at least two "
            f"positive dimensions each. Received: shapes={shapes}"
        )
    sizes = np.array([math.prod(s) for s in shapes], dtype=np.float64)
    scores = np.array([sum(s) / math.prod(s) for s in shapes], dtype=np.float64)
    budget = density * sizes.sum()
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        free_budget = budget - sizes[dense].sum()
        scale = free_budget / np.sum(scores[~dense] * sizes[~dense])
        result = np.where(dense, 1.0, scale * scores)
        newly_dense = (~dense) & (result > 1.0)
        if not newly_dense.any():
            return [float(d) for d in result]
        dense |= newly_dense


# --------------------------------------------------------------------------- #
# Spectral metrics of the bipartite graph (inputs + outputs as nodes).
# --------------------------------------------------------------------------- #
def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"Expected a 2-D mask of shape (n_in, n_out). Received shape {mask.shape}")
    return (mask != 0).astype(np.float64)


def algebraic_connectivity(mask) -> float:
    """Second-smallest eigenvalue of the Laplacian of the bipartite graph.

    The graph has `n_in + n_out` nodes and an edge per nonzero of `mask`. The
    value is 0 for a disconnected graph and grows with how well connected it
    is (Fiedler 1973); seed 002 found accuracy tracks it.

    Example:
    >>> round(algebraic_connectivity([[1, 1], [1, 1]]), 6)
    2.0
    """
    m = _check_mask(mask)
    n_in, n_out = m.shape
    laplacian = np.zeros((n_in + n_out, n_in + n_out))
    laplacian[:n_in, n_in:] = -m
    laplacian[n_in:, :n_in] = -m.T
    laplacian[np.diag_indices_from(laplacian)] = np.concatenate([m.sum(axis=1), m.sum(axis=0)])
    values = scipy.linalg.eigh(laplacian, eigvals_only=True, subset_by_index=[0, 1])
    return float(max(values[1], 0.0))


def spectral_gap(mask) -> float:
    """Gap between the two largest adjacency eigenvalues of the bipartite graph.

    For a bipartite graph the adjacency eigenvalues are `±` the singular
    values of `mask`, so the gap is `s_1 - s_2`. A large gap means a good
    expander (fast mixing); seed 002 found accuracy tracks it.

    Example:
    >>> round(spectral_gap([[1, 1], [1, 1]]), 6)
    2.0
    """
    s = scipy.linalg.svdvals(_check_mask(mask))
    second = s[1] if s.size > 1 else 0.0
    return float(s[0] - second)
