"""`BlockPattern`: where a layer's connections may exist, stated per block."""

from __future__ import annotations

import numpy as np

from keras_sparse_moe.validation import check_size

__all__ = ["BlockPattern", "cluster_ids"]


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

    Examples:

        >>> import numpy as np
        >>> routes = BlockPattern.between_clusters(3)  # links only between different clusters
        >>> routes.dense((6, 6)).astype(int)[:2].tolist()
        [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
        >>> routes.count((6, 6))
        24
    """

    def __init__(self, blocks):
        original = blocks
        blocks = np.asarray(blocks)
        if not (np.issubdtype(blocks.dtype, np.number) or blocks.dtype == bool):
            raise TypeError(
                "`BlockPattern` got an invalid `blocks`. Expected a binary 2-D array of numbers "
                f"or bools. Received: blocks={original!r}"
            )
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

    def __hash__(self):  # equal patterns, equal hashes (compiled rewiring steps are shared by it)
        return hash((self.blocks.shape, self.blocks.tobytes()))

    def __repr__(self):
        allowed = int(self.blocks.sum())
        return f"BlockPattern(blocks of shape {self.blocks.shape}, {allowed} allowed)"
