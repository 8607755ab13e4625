"""Seeded builders of binary connectivity masks, and the registry of their names.

Every builder is a pure function returning a `float32` numpy array of shape
`(n_in, n_out)` holding only 0 and 1: entry `[i, j]` is 1 when input `i` feeds
output `j`. Random builders take a `seed` and give the same mask for the same
seed; the circulant ones (`structured_regular`, `fibonacci`) are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from keras_sparse_moe import _runtime
from keras_sparse_moe.topologies.allocation import density_from_epsilon
from keras_sparse_moe.topologies.blocks import cluster_ids
from keras_sparse_moe.validation import (
    check_choice,
    check_density,
    check_n_m,
    check_seed,
    check_size,
)

__all__ = [
    "TOPOLOGIES",
    "erdos_renyi",
    "erdos_renyi_positions",
    "fibonacci",
    "get",
    "n_m",
    "pseudo_random_regular",
    "random_regular",
    "small_world",
    "structured_regular",
]


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

    Examples:
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

    Examples:
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
    rng = _runtime.rng(check_seed(seed, owner))
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

    Examples:
        >>> m = random_regular(100, 50, degree=5, seed=0)
        >>> set(m.sum(axis=1).tolist()), set(m.sum(axis=0).tolist())
        ({5.0}, {10.0})
    """
    n_in, n_out, degree, seed = _degree_arguments(
        "random_regular", n_in, n_out, density, degree, seed
    )
    rng = _runtime.rng(seed)
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
    row 0 rotated right by `i` ("Sparse Neural Networks Topologies").
    Every input has exactly `degree` outputs. `seed` is accepted for a common
    signature and ignored.

    Examples:
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
        return fib  # the Fibonacci numbers themselves
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
    ("Sparse Neural Networks Topologies"). Every input has exactly
    `degree` outputs. `seed` is ignored.

    Args:
        rescale: `"as_needed"` (default): the offsets are the
            Fibonacci numbers themselves while they fit in the row (all below
            `n_out`), and are rescaled as below only when they do not.
            `"always"`: the numbers are always stretched over the row
            (`floor(f * n_out / (f_max + 1))`), which spreads the connections
            over the whole row; offsets that coincide after rescaling are
            replaced by evenly spread free positions.

    Examples:
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
    """Circulant mask from one random row ("pseudo-random regular").

    Row 0 has `degree` ones at uniformly random distinct positions; row `i` is
    row 0 rotated right by `i`. Every input has exactly `degree` outputs and,
    for a square mask, every output exactly `degree` inputs. Cheaper to
    describe than `random_regular` (one row), but its rows are shifts of each
    other, so it is not an expander in general.

    Examples:
        >>> m = pseudo_random_regular(4, 10, degree=3, seed=0)
        >>> [np.flatnonzero(r).tolist() for r in m[:2]]
        [[5, 6, 9], [0, 6, 7]]
    """
    n_in, n_out, degree, seed = _degree_arguments(
        "pseudo_random_regular", n_in, n_out, density, degree, seed
    )
    row = np.sort(_runtime.rng(seed).choice(n_out, size=degree, replace=False))
    return _circulant(n_in, n_out, row)


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

    Examples:
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
    rng = _runtime.rng(seed)
    flat = np.zeros(n_in * n_out, dtype=np.float32)
    flat[rng.choice(inside, size=n_inside, replace=False)] = 1.0
    flat[rng.choice(across, size=n_across, replace=False)] = 1.0
    return flat.reshape(n_in, n_out)


def n_m(n_in: int, n_out: int, n: int = 2, m: int = 4, seed: int | None = None) -> np.ndarray:
    """N:M structured mask: in every group of `m` consecutive inputs, each output
    keeps exactly `n` connections, at random places (density `n / m`).

    The pattern of sparse tensor cores (2:4 on NVIDIA Ampere and later) and of
    tfmot's `sparsity_m_by_n`, along the input axis. `n_in` must be a multiple
    of `m`. Layers take it as `n_m=(n, m)` (or `topology="n_m"` with
    `topology_kwargs={"n": n, "m": m}`); SET, RigL and `MagnitudePruning` keep it.

    Examples:
        >>> mask = n_m(8, 3, n=2, m=4, seed=0)
        >>> mask.reshape(2, 4, 3).sum(axis=1)  # every group of 4 inputs: 2 per output
        array([[2., 2., 2.],
               [2., 2., 2.]], dtype=float32)
    """
    owner = "n_m"
    n_in = check_size("n_in", n_in, owner)
    n_out = check_size("n_out", n_out, owner)
    n, m = check_n_m((n, m), owner)
    seed = check_seed(seed, owner)
    if n_in % m:
        raise ValueError(
            f"`{owner}` needs `n_in` to be a multiple of m={m} (groups of m inputs). "
            f"Received: n_in={n_in}"
        )
    # Each (group, output) keeps the n smallest of m random keys.
    keys = _runtime.rng(seed).random((n_in // m, m, n_out))
    ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    return (ranks < n).astype(np.float32).reshape(n_in, n_out)


TOPOLOGIES: dict[str, Callable[..., np.ndarray]] = {
    "erdos_renyi": erdos_renyi,
    "random_regular": random_regular,
    "structured_regular": structured_regular,
    "fibonacci": fibonacci,
    "pseudo_random_regular": pseudo_random_regular,
    "small_world": small_world,
    "n_m": n_m,
}


def get(name: str, owner: str = "topologies.get") -> Callable[..., np.ndarray]:
    """Returns the builder registered under `name` (`TypeError` unless a string,
    `ValueError` unless a registered name; `owner` is named in the message)."""
    return TOPOLOGIES[check_choice("topology", name, owner, tuple(sorted(TOPOLOGIES)))]
