"""`x @ W` for a weight matrix `W` given by its connection list: O(batch * nnz) work.

`W[rows[c], cols[c]] = values[c]` for each connection `c`; nothing of size
`n_in * n_out` is ever made. A row equal to `n_in` marks a parked slot: it
reads a zero input row, so it adds nothing and its value's gradient is
exactly zero (storage keeps a fixed number of slots; a pruned connection is
parked, not removed). `packed_sparse_matmul` takes one int32 position
`row * n_out + col` a connection instead (what sparse storage keeps), and
unpacks it chunk by chunk inside the loop.

The products are accumulated in chunks of connections inside a compiled
loop: each chunk gathers `(chunk, batch)` inputs, scales them and adds them
into the `(n_out, batch)` output. A chunk fits in the CPU caches, which makes
it 4-5x faster than one gather and one segment sum over all connections
(`benchmarks/bench_truly_sparse.py`). Forward and backward are written in
`keras.ops` plus one scatter-add per backend, and compile under XLA
(`jit_compile=True` on TensorFlow, `jax.jit`); the gradient is custom, so no
backend differentiates through the loop.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

__all__ = [
    "COMPACT_EXPORTS",
    "chunk_size",
    "packed_sparse_matmul",
    "serving_indices",
    "sparse_matmul",
    "unpack_positions",
]

_CHUNK_BYTES = 1 << 20  # one chunk's gathered inputs: about 1 MB
_DEFAULT_BATCH = 128  # assumed where the batch size is unknown when traced


def chunk_size(batch, nnz: int) -> int:
    """Connections per chunk for `batch` rows: about 1 MB of gathered float32 inputs,
    a multiple of 256 (at least 256, at most `nnz` rounded up to 256)."""
    # Unknown (None) or symbolic (JAX export) batch sizes: assume the default.
    batch = max(1, int(batch)) if isinstance(batch, (int, np.integer)) else _DEFAULT_BATCH
    chunk = max(256, (_CHUNK_BYTES // (4 * batch)) // 256 * 256)
    return min(chunk, -(-max(1, nnz) // 256) * 256)


def _scatter_add(target, index, updates):
    """`target[index[k]] += updates[k]` along the first axis (repeated indices add up)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.tensor_scatter_nd_add(target, tf.expand_dims(index, -1), updates)
    if backend == "jax":
        return target.at[index].add(updates)
    raise NotImplementedError(f"sparse_matmul supports TensorFlow and JAX, not {backend}.")


def _chunks(array, chunk: int, fill, nnz: int):
    """`array` (nnz,) padded with `fill` to whole chunks, as `(num_chunks, chunk)`
    (`nnz` given: the positions' length may be known only at run time)."""
    count = -(-nnz // chunk)
    padded = ops.pad(array, [(0, count * chunk - nnz)], constant_values=fill)
    return ops.reshape(padded, (count, chunk)), count


def _padded_rows(x_t):
    """`x_t` `(n_in, batch)` with a zero row appended: what parked slots read."""
    return ops.concatenate([x_t, ops.zeros_like(x_t[:1])], axis=0)


def unpack_positions(positions, n_out: int):
    """`(rows, cols)` of int32 packed positions `row * n_out + col`."""
    positions = ops.cast(positions, "int32")
    rows = positions // n_out
    return rows, positions - rows * n_out


def _index_chunks(indices, chunk: int, nnz: int, n_in: int, n_out: int):
    """`indices` (`(rows, cols)` or packed `(positions,)`) cut into chunks; the
    padding is parked (row `n_in`)."""
    if len(indices) == 1:
        return (_chunks(indices[0], chunk, n_in * n_out, nnz)[0],)
    rows, cols = indices
    return _chunks(rows, chunk, n_in, nnz)[0], _chunks(cols, chunk, 0, nnz)[0]


def _chunk_rows_cols(index_chunks, i, n_out: int):
    """Rows and columns of chunk `i`: packed positions are unpacked here, inside
    the loop, so no array of all the rows or columns is made (a call on 100k
    packed connections took 0.2 ms longer with them unpacked beforehand)."""
    if len(index_chunks) == 1:
        return unpack_positions(index_chunks[0][i], n_out)
    return index_chunks[0][i], index_chunks[1][i]


def _matmul(x, values, indices, n_out: int):
    n_in = x.shape[1]
    if not isinstance(x.shape[0], (int, np.integer)):
        return _serving_matmul(x, values, indices, n_out)
    nnz = values.shape[0]
    chunk = chunk_size(x.shape[0], nnz)
    x_t = _padded_rows(ops.transpose(x))
    v, count = _chunks(values, chunk, 0.0, nnz)
    index_chunks = _index_chunks(indices, chunk, nnz, n_in, n_out)

    def body(i, y_t):
        r, c = _chunk_rows_cols(index_chunks, i, n_out)
        products = ops.take(x_t, r, axis=0) * ops.expand_dims(v[i], -1)
        return _scatter_add(y_t, c, products)

    y_t = ops.fori_loop(0, count, body, ops.zeros((n_out, ops.shape(x)[0]), x.dtype))
    return ops.transpose(y_t)


SERVING_DENSE_LIMIT = 1 << 24  # kernel entries up to which JAX's serving form densifies


def _serving_matmul(x, values, indices, n_out: int):
    """`_matmul` for a batch size unknown when traced (an exported model's
    signature), without the loop and the scatter-add that ONNX and OpenVINO
    cannot run. Every form keeps the exported file O(nnz).

    - TensorFlow: one gather and one segment sum over all connections
      (O(batch * nnz), all products held at once). A kernel densified from
      the connections would be folded into a dense constant by tf2onnx and
      OpenVINO's converter (a file of the kernel's dense size).
    - JAX, up to `SERVING_DENSE_LIMIT` kernel entries: the connections are
      scattered into a zero kernel that is multiplied densely. Both forms
      become ONNX's ScatterND with reduction "add", which onnxruntime runs
      with races between threads on repeated indices: a segment sum repeats
      every output column (wrong sums at 784 x 1024), the kernel only the
      parked slots' row, which is cut off. Larger kernels take the segment sum.
    """
    n_in = x.shape[1]
    rows, cols = unpack_positions(indices[0], n_out) if len(indices) == 1 else indices
    if keras.backend.backend() == "jax" and (n_in + 1) * n_out <= SERVING_DENSE_LIMIT:
        flat = rows * n_out + cols  # parked slots land in the extra row n_in
        dense = ops.scatter(flat[:, None], values, ((n_in + 1) * n_out,))
        return ops.matmul(x, ops.reshape(dense, (n_in + 1, n_out))[:n_in])
    x_t = _padded_rows(ops.transpose(x))
    products = ops.take(x_t, rows, axis=0) * ops.expand_dims(values, -1)
    return ops.transpose(ops.segment_sum(products, cols, num_segments=n_out))


COMPACT_EXPORTS = False  # True: TensorFlow exports keep 8 bytes a connection (see below)


def serving_indices(indices, x):
    """`indices` (int32 `(nnz,)` tensors) as they are, except on TensorFlow with
    `COMPACT_EXPORTS` where `x`'s batch size is unknown when traced (an exported
    model's signature): then cut to their own length plus a zero known only at
    run time.

    TensorFlow's converters turn variables into constants and fold what is
    computed from constants alone: tf2onnx, TFLite's and OpenVINO's store the
    rows and columns unpacked from the int32 positions (and int64 copies, and
    OpenVINO an int64 range over the connections): 16, 12 and 24 bytes a
    connection. That is also what makes those runtimes fast: onnxruntime and
    LiteRT sort the constant columns for their segment sum once, when loading.
    With `COMPACT_EXPORTS = True` the files keep the stored 8 bytes a connection
    and the runtimes unpack and sort every call: at 784 x 1024 x 5-10 %, ONNX
    Runtime 9-12x and LiteRT 3.5x slower at batch 1 (`benchmarks/bench_export.py`).
    Traces with a static batch (Keras' own) and JAX (jax2onnx writes the arrays
    as they are: 8 bytes) are unaffected.

    Examples:
        >>> import numpy as np
        >>> from keras_sparse_moe.ops import sparse_matmul as module
        >>> positions = [np.array([3, 1], "int32")]
        >>> [p.tolist() for p in module.serving_indices(positions, np.ones((2, 4)))]
        [[3, 1]]
    """
    static = isinstance(x.shape[0], (int, np.integer))
    if static or not COMPACT_EXPORTS or keras.backend.backend() != "tensorflow":
        return list(indices)
    zero = ops.minimum(ops.shape(x)[0], 0)  # a batch is never negative
    return [index[: ops.shape(index)[0] + zero] for index in indices]


def _matmul_gradients(x, values, indices, upstream, n_out: int):
    """`(dL/dx, dL/dvalues)` of `_matmul` given `dL/dy`: one loop, both gathers shared."""
    n_in, nnz = x.shape[1], values.shape[0]
    chunk = chunk_size(x.shape[0], nnz)
    x_t = _padded_rows(ops.transpose(x))
    dy_t = ops.transpose(upstream)
    v, count = _chunks(values, chunk, 0.0, nnz)
    index_chunks = _index_chunks(indices, chunk, nnz, n_in, n_out)

    def body(i, state):
        dx_t, dv = state
        r, c = _chunk_rows_cols(index_chunks, i, n_out)
        dy_rows = ops.take(dy_t, c, axis=0)
        dx_t = _scatter_add(dx_t, r, dy_rows * ops.expand_dims(v[i], -1))
        grads = ops.sum(ops.take(x_t, r, axis=0) * dy_rows, axis=1)
        dv = ops.slice_update(dv, (i, 0), ops.expand_dims(grads, 0))
        return dx_t, dv

    dx_t, dv = ops.fori_loop(
        0, count, body, (ops.zeros_like(x_t), ops.zeros((count, chunk), values.dtype))
    )
    return ops.transpose(dx_t[:n_in]), ops.reshape(dv, (-1,))[:nnz]


def sparse_matmul(x, values, rows, cols, n_out: int):
    """`x @ W`, `W` of shape `(n_in, n_out)` given by its connections.

    Args:
        x: `(batch, n_in)` float tensor.
        values: `(nnz,)` weights.
        rows, cols: int32 `(nnz,)` positions; a row of `n_in` is a parked
            (empty) slot. Repeated positions add up, as in a sum of matrices.
        n_out: Number of output columns.

    Returns:
        `(batch, n_out)` in `x`'s dtype, accumulated in float32. The gradient
        reaches `x` and `values` (O(batch * nnz)); positions have none.

    Examples:
        >>> import numpy as np
        >>> from keras import ops
        >>> y = sparse_matmul(np.ones((2, 3), "float32"), np.array([1.0, 2.0], "float32"),
        ...                   np.array([0, 2], "int32"), np.array([1, 1], "int32"), 2)
        >>> ops.convert_to_numpy(y).tolist()
        [[0.0, 3.0], [0.0, 3.0]]
    """
    return _product(x, values, (rows, cols), n_out)


def packed_sparse_matmul(x, values, positions, n_out: int):
    """`sparse_matmul` with each connection's int32 position `row * n_out + col`
    (a position of `n_in * n_out` or more is a parked slot).

    Examples:
        >>> import numpy as np
        >>> from keras import ops
        >>> y = packed_sparse_matmul(np.ones((2, 3), "float32"), np.array([1.0, 2.0], "float32"),
        ...                          np.array([1, 5], "int32"), 2)
        >>> ops.convert_to_numpy(y).tolist()
        [[0.0, 3.0], [0.0, 3.0]]
    """
    return _product(x, values, (positions,), n_out)


def _product(x, values, indices, n_out):
    dtype = x.dtype if hasattr(x, "dtype") else "float32"
    x = ops.cast(x, "float32")
    values = ops.cast(values, "float32")
    indices = tuple(ops.cast(index, "int32") for index in indices)
    return ops.cast(_differentiable(x, values, indices, int(n_out)), dtype)


def _differentiable(x, values, indices, n_out):
    # The positions are arguments, not closed over: exporters (jax2tf) trace the
    # gradient separately and cannot capture the forward pass's tracers.
    @ops.custom_gradient
    def product(x, values, *indices):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.cast(upstream, "float32")
            dx, dv = _matmul_gradients(x, values, indices, upstream, n_out)
            return (dx, dv, *(None for _ in indices))

        return _matmul(x, values, indices, n_out), grad

    return product(x, values, *indices)
