"""sparse_matmul: numpy reference for outputs and gradients, parked and repeated slots."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_sparse_moe.ops.sparse_matmul import chunk_size, packed_sparse_matmul, sparse_matmul
from tests.test_case import to_numpy


def _value_and_grads(x, values, rows, cols, n_out, upstream, jit, packed=False):
    """`(y, dL/dx, dL/dvalues)` for `L = sum(y * upstream)`, eager or compiled; with
    `packed`, through `packed_sparse_matmul` on the positions `rows * n_out + cols`."""
    backend = keras.backend.backend()

    def matmul(x, v):
        if packed:
            return packed_sparse_matmul(x, v, rows * n_out + cols, n_out)
        return sparse_matmul(x, v, rows, cols, n_out)

    if backend == "jax":
        import jax

        def loss(x, v):
            y = matmul(x, v)
            return ops.sum(y * upstream), y

        fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        fn = jax.jit(fn) if jit else fn
        (_, y), (gx, gv) = fn(x, values)
        return y, gx, gv
    import tensorflow as tf

    def run(x, v):
        with tf.GradientTape() as tape:
            tape.watch([x, v])
            y = matmul(x, v)
            loss = tf.reduce_sum(y * upstream)
        return (y, *tape.gradient(loss, [x, v]))

    fn = tf.function(run, jit_compile=True) if jit else run
    return fn(tf.constant(x), tf.constant(values))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("batch, n_in, n_out, nnz", [(5, 7, 6, 20), (3, 300, 200, 3000)])
def test_matches_dense_reference(jit, batch, n_in, n_out, nnz, packed):
    rng = np.random.default_rng(nnz)
    flat = rng.choice(n_in * n_out, nnz, replace=False)
    rows, cols = (flat // n_out).astype("int32"), (flat % n_out).astype("int32")
    rows[::7] = n_in  # parked slots: no contribution, zero gradient
    rows[1], cols[1] = rows[2], cols[2]  # a repeated position adds up
    x = rng.standard_normal((batch, n_in)).astype("float32")
    values = rng.standard_normal(nnz).astype("float32")
    upstream = rng.standard_normal((batch, n_out)).astype("float32")
    kernel = np.zeros((n_in + 1, n_out), "float32")
    np.add.at(kernel, (rows, cols), values)
    kernel = kernel[:n_in]
    padded = np.concatenate([x, np.zeros((batch, 1), "float32")], axis=1)
    y, gx, gv = _value_and_grads(x, values, rows, cols, n_out, upstream, jit, packed)
    np.testing.assert_allclose(to_numpy(y), x @ kernel, atol=1e-5)
    np.testing.assert_allclose(to_numpy(gx), upstream @ kernel.T, atol=1e-5)
    expected = np.einsum("bc,bc->c", padded[:, rows], upstream[:, cols])
    np.testing.assert_allclose(to_numpy(gv), expected, atol=1e-5)
    assert np.all(to_numpy(gv)[rows == n_in] == 0)


def test_chunks_cover_about_a_megabyte():
    assert chunk_size(128, 10**6) == 2048
    assert chunk_size(None, 10**6) == chunk_size(128, 10**6)  # unknown batch: 128 assumed
    assert chunk_size(1, 10**7) == 262144
    assert chunk_size(128, 300) == 512  # never more than the connections, in 256s


@pytest.mark.tensorflow_only
def test_an_unknown_batch_size_traces_without_loop_or_scatter_add():
    """A serving signature's free batch size takes the gather + segment-sum form
    (ONNX and OpenVINO have no TensorScatterAdd); outputs equal numpy's."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    n_in, n_out, nnz = 9, 7, 30
    values = rng.standard_normal(nnz).astype("float32")
    rows = rng.integers(0, n_in + 1, nnz).astype("int32")  # some slots parked (row n_in)
    cols = rng.integers(0, n_out, nnz).astype("int32")
    x = rng.standard_normal((4, n_in)).astype("float32")
    fn = tf.function(
        lambda x: sparse_matmul(x, values, rows, cols, n_out),
        input_signature=[tf.TensorSpec((None, n_in))],
    )
    op_types = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    assert not op_types & {"While", "StatelessWhile", "TensorScatterAdd"}
    dense = np.zeros((n_in + 1, n_out), "float32")
    np.add.at(dense, (rows, cols), values)
    np.testing.assert_allclose(to_numpy(fn(x)), x @ dense[:n_in], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("n_in, n_out, nnz", [(9, 7, 30), (300, 200, 3000)])
def test_serving_form_matches_numpy_with_parked_and_repeated_slots(n_in, n_out, nnz, packed):
    """The exported (free batch size) form of either backend sums repeated
    positions and ignores parked slots, as the compiled loop does."""
    from keras_sparse_moe.ops import sparse_matmul as module

    rng = np.random.default_rng(n_in)
    values = rng.standard_normal(nnz).astype("float32")
    rows = rng.integers(0, n_in + 1, nnz).astype("int32")
    cols = rng.integers(0, n_out, nnz).astype("int32")
    x = rng.standard_normal((5, n_in)).astype("float32")
    indices = (rows * n_out + cols,) if packed else (rows, cols)
    got = to_numpy(module._serving_matmul(x, values, indices, n_out))
    dense = np.zeros((n_in + 1, n_out), "float32")
    np.add.at(dense, (rows, cols), values)
    np.testing.assert_allclose(got, x @ dense[:n_in], rtol=1e-4, atol=1e-4)
