"""Capacity dispatch against a plain-Python reference: slots, overflow, combine."""

import functools

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_sparse_moe.ops import dispatch
from tests.test_case import jitted_on_jax, to_numpy


def _reference_plan(index, num_experts, capacity):
    """Choice-major, token order within a choice; slots fill up to `capacity`."""
    n, k = index.shape
    filled = [0] * num_experts
    slot = np.full((n, k), num_experts * capacity)
    token_of_slot = np.full(num_experts * capacity, -1)
    for j in range(k):
        for t in range(n):
            e = index[t, j]
            if filled[e] < capacity:
                slot[t, j] = e * capacity + filled[e]
                token_of_slot[slot[t, j]] = t
                filled[e] += 1
    return slot, slot < num_experts * capacity, token_of_slot


def _random_index(rng, n, k, num_experts):
    return np.stack([rng.permutation(num_experts)[:k] for _ in range(n)]).astype("int32")


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 40),
    num_experts=st.integers(1, 6),
    data=st.data(),
)
def test_plan_matches_reference(n, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    capacity = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    index = _random_index(np.random.default_rng(seed), n, k, num_experts)
    plan = jitted_on_jax(
        functools.partial(dispatch.dispatch_plan, num_experts=num_experts, capacity=capacity)
    )(index)
    slot, kept, token_of_slot = _reference_plan(index, num_experts, capacity)
    np.testing.assert_array_equal(to_numpy(plan.slot), slot)
    np.testing.assert_array_equal(to_numpy(plan.kept), kept)
    np.testing.assert_array_equal(to_numpy(plan.token_of_slot), token_of_slot)


def test_combine_and_gather_match_reference():
    rng = np.random.default_rng(1)
    n, k, num_experts, capacity, width = 30, 2, 4, 10, 3
    index = _random_index(rng, n, k, num_experts)
    weights = rng.random((n, k)).astype("float32")
    tokens = rng.standard_normal((n, width)).astype("float32")
    plan = dispatch.dispatch_plan(index, num_experts, capacity)
    slots = to_numpy(dispatch.gather_slots(tokens, plan))
    token_of_slot = to_numpy(plan.token_of_slot)
    filled = token_of_slot >= 0
    np.testing.assert_array_equal(slots[filled], tokens[token_of_slot[filled]])
    # Each expert scales its slots by (expert + 1): the combined output is
    # sum over kept choices of weight * (expert + 1) * token.
    scale = np.repeat(np.arange(1, num_experts + 1), capacity)[:, None].astype("float32")
    combined = to_numpy(dispatch.combine(slots * scale, plan, weights))
    kept = to_numpy(plan.kept)
    expected = np.zeros_like(tokens)
    for t in range(n):
        for j in range(k):
            if kept[t, j]:
                expected[t] += weights[t, j] * (index[t, j] + 1) * tokens[t]
    np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-6)
    assert not kept.all()  # the case exercised overflow


@pytest.mark.parametrize(
    "tokens, experts, k, factor, expected",
    [
        (64, 4, 2, 1.0, 32),
        (64, 4, 2, 1.25, 40),
        (10, 3, 1, 1.0, 4),
        (8, 2, 2, 4.0, 8),
        (1, 16, 1, 1.0, 1),
    ],
)
def test_expert_capacity(tokens, experts, k, factor, expected):
    assert dispatch.expert_capacity(tokens, experts, k, factor) == expected
    assert int(to_numpy(dispatch.expert_capacity(np.int32(tokens), experts, k, factor))) == expected


def test_top_k_weights_renormalise():
    gates = np.array([[0.1, 0.6, 0.3], [0.0, 0.0, 0.0]], dtype="float32")
    weights, index = dispatch.top_k_weights(gates, 2)
    np.testing.assert_array_equal(to_numpy(index)[0], [1, 2])
    np.testing.assert_allclose(to_numpy(weights), [[2 / 3, 1 / 3], [0.0, 0.0]], rtol=1e-6)


def test_top_k_matches_a_stable_sort_with_ties():
    values = np.random.default_rng(2).integers(0, 4, (50, 6)).astype("float32")  # many ties
    got_values, got_index = (to_numpy(v) for v in dispatch.top_k(values, 3))
    expected = np.argsort(-values, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got_index, expected)
    np.testing.assert_array_equal(got_values, np.take_along_axis(values, expected, axis=1))


# ------------------------------------------------------------------------- #
# Dropless grouped dispatch.


def _reference_groups(index, num_experts, block):
    """Rows by expert, then token order within an expert (assignment a = t * k + j),
    each expert's group padded to whole blocks."""
    n, k = index.shape
    row_of_choice = np.zeros((n, k), dtype=int)
    token_of_row, expert_of_block = [], []
    for e in range(num_experts):
        members = [(t, j) for t in range(n) for j in range(k) if index[t, j] == e]
        for t, j in members:
            row_of_choice[t, j] = len(token_of_row)
            token_of_row.append(t)
        pad = -len(members) % block
        token_of_row += [0] * pad
        expert_of_block += [e] * ((len(members) + pad) // block)
    return row_of_choice, np.array(token_of_row), np.array(expert_of_block)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), num_experts=st.integers(1, 6), data=st.data())
def test_group_plan_matches_reference(n, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    block = data.draw(st.sampled_from([1, 2, 4, 8]))
    index = _random_index(
        np.random.default_rng(data.draw(st.integers(0, 2**16))), n, k, num_experts
    )
    plan = jitted_on_jax(
        functools.partial(dispatch.group_plan, num_experts=num_experts, block=block)
    )(index)
    row_of_choice, token_of_row, expert_of_block = _reference_groups(index, num_experts, block)
    used = len(token_of_row)
    rows = to_numpy(plan.token_of_row).shape[0]
    # The layout has the static length promised, a whole number of blocks.
    assert rows == (n * k + num_experts * (block - 1)) // block * block >= used
    np.testing.assert_array_equal(to_numpy(plan.row_of_choice), row_of_choice)
    np.testing.assert_array_equal(to_numpy(plan.token_of_row)[:used], token_of_row)
    np.testing.assert_array_equal(to_numpy(plan.expert_of_block)[: used // block], expert_of_block)


FORMS = ["loop", "batched"] + (["ragged_dot"] if keras.backend.backend() == "jax" else [])


@pytest.fixture(params=FORMS)
def grouped_form(request, monkeypatch):
    """Every form of the grouped matmul (`dispatch.GROUPED_FORM`) on this backend."""
    monkeypatch.setattr(dispatch, "GROUPED_FORM", request.param)
    return request.param


def test_grouped_form_rejects_an_unknown_name(monkeypatch):
    monkeypatch.setattr(dispatch, "GROUPED_FORM", "fast")
    with pytest.raises(ValueError, match="GROUPED_FORM='fast'"):
        dispatch.grouped_form()
    if keras.backend.backend() != "jax":
        monkeypatch.setattr(dispatch, "GROUPED_FORM", "ragged_dot")
        with pytest.raises(ValueError, match="needs the JAX backend"):
            dispatch.grouped_form()


def _on_cpu():
    if keras.backend.backend() != "jax":
        return True  # this project's TensorFlow is tensorflow-cpu
    import jax

    return jax.default_backend() == "cpu"


@pytest.mark.skipif(not _on_cpu(), reason="accelerators always batch the blocks")
def test_cpus_batch_small_matrices_and_loop_over_big_ones():
    assert dispatch.GROUPED_FORM is None
    small, big = dispatch.SMALL_MATRIX, dispatch.SMALL_MATRIX + 1
    assert dispatch.grouped_form(small) == "batched"
    assert dispatch.grouped_form(big) == "loop"
    assert dispatch.grouped_form() == "loop"
    # The block cap follows the form: batched blocks may exceed the loop's MAX_BLOCK.
    assert dispatch.group_block(1 << 16, 2, 2, 16) == dispatch.MAX_BATCHED_BLOCK
    assert dispatch.group_block(1 << 16, 2, 2, big) == dispatch.MAX_BLOCK


@pytest.mark.parametrize("expert_axis", [0, 1])
@pytest.mark.parametrize("n, k, num_experts, block", [(1, 2, 16, 1), (37, 2, 5, 4), (64, 3, 4, 8)])
def test_grouped_matmul_and_combine_match_every_expert_weighted(
    n, k, num_experts, block, expert_axis, grouped_form
):
    rng = np.random.default_rng(n)
    index = _random_index(rng, n, k, num_experts)
    index[: n // 2, 0] = np.where(index[: n // 2, 1:].min(axis=1) > 0, 0, index[: n // 2, 0])
    x = rng.standard_normal((n, 6)).astype("float32")
    kernels = rng.standard_normal((num_experts, 6, 3)).astype("float32")
    weights = rng.random((n, k)).astype("float32")
    plan = dispatch.group_plan(index, num_experts, block)
    rows = x[to_numpy(plan.token_of_row)]
    stacked = kernels if expert_axis == 0 else kernels.transpose(1, 0, 2)
    out = dispatch.grouped_matmul(rows, stacked, plan, expert_axis=expert_axis)
    got = to_numpy(dispatch.combine_rows(out, plan, weights))
    every = np.einsum("nd,edu->neu", x, kernels)  # every expert on every token
    expected = np.einsum("nk,nku->nu", weights, np.take_along_axis(every, index[..., None], 1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tokens, k, experts, block",
    [(1, 2, 16, 1), (4096, 2, 16, 128), (1024, 2, 10, 32), (512, 2, 64, 4), (None, 2, 8, 8)],
)
def test_group_block_keeps_padding_small(tokens, k, experts, block, monkeypatch):
    monkeypatch.setattr(dispatch, "GROUPED_FORM", "loop")
    assert dispatch.group_block(tokens, k, experts) == block
    if tokens is not None:
        assert experts * (block - 1) <= tokens * k // 4


@pytest.mark.parametrize(
    "tokens, k, experts, matrix_size, block",
    [
        (1024, 2, 10, 784 * 64, 128),  # small matrices: big blocks, padding < real rows
        (1, 2, 10, 784 * 64, 1),  # ... but never more padding than rows
        (1024, 2, 64, 1024 * 256, 16),
        (4096, 2, 16, 1024 * 1024, 128),  # big matrices: the quarter rule
    ],
)
def test_group_block_grows_for_small_matrices(tokens, k, experts, matrix_size, block, monkeypatch):
    monkeypatch.setattr(dispatch, "GROUPED_FORM", "loop")
    assert dispatch.group_block(tokens, k, experts, matrix_size) == block
    assert experts * (block - 1) <= tokens * k


def _grouped_value_and_grads(fn, rows, kernel):
    """`(y, dL/drows, dL/dkernel)` of `L = sum(y * u)` for a fixed random `u`, compiled."""
    upstream = (
        np.random.default_rng(0)
        .standard_normal(tuple(to_numpy(fn(rows, kernel)).shape))
        .astype("float32")
    )
    if keras.backend.backend() == "jax":
        import jax

        def loss(r, w):
            y = fn(r, w)
            return keras.ops.sum(y * upstream), y

        (_, y), (g_rows, g_kernel) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        )(rows, kernel)
        return to_numpy(y), to_numpy(g_rows), to_numpy(g_kernel), upstream
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def run(r, w):
        with tf.GradientTape() as tape:
            tape.watch([r, w])
            y = fn(r, w)
            loss = tf.reduce_sum(y * upstream)
        return (y, *tape.gradient(loss, [r, w]))

    return (*(to_numpy(v) for v in run(tf.constant(rows), tf.constant(kernel))), upstream)


@pytest.mark.parametrize("expert_axis", [0, 1])
def test_grouped_matmul_gradients_match_numpy(expert_axis, grouped_form):
    rng = np.random.default_rng(5)
    n, k, num_experts, block = 29, 2, 4, 4
    index = _random_index(rng, n, k, num_experts)
    plan = dispatch.group_plan(index, num_experts, block)
    rows = rng.standard_normal((int(plan.token_of_row.shape[0]), 5)).astype("float32")
    kernels = rng.standard_normal((num_experts, 5, 3)).astype("float32")
    stacked = kernels if expert_axis == 0 else kernels.transpose(1, 0, 2)
    y, g_rows, g_kernel, u = _grouped_value_and_grads(
        lambda r, w: dispatch.grouped_matmul(r, w, plan, expert_axis=expert_axis), rows, stacked
    )
    expert = to_numpy(dispatch.expert_of_row(plan))
    np.testing.assert_allclose(y, np.einsum("ri,rio->ro", rows, kernels[expert]), atol=1e-5)
    np.testing.assert_allclose(g_rows, np.einsum("ro,rio->ri", u, kernels[expert]), atol=1e-5)
    expected = np.stack([rows[expert == e].T @ u[expert == e] for e in range(num_experts)])
    expected = expected if expert_axis == 0 else expected.transpose(1, 0, 2)
    np.testing.assert_allclose(g_kernel, expected, rtol=1e-5, atol=1e-4)


def test_tiled_matmul_gradients_match_numpy(grouped_form):
    rng = np.random.default_rng(6)
    n, k, tiles, tile = 21, 2, 3, 4
    plan = dispatch.group_plan(_random_index(rng, n, k, tiles * tiles), tiles * tiles, 2)
    rows = rng.standard_normal((int(plan.token_of_row.shape[0]), tile)).astype("float32")
    matrix = rng.standard_normal((tiles * tile, tiles * tile)).astype("float32")
    y, g_rows, g_matrix, u = _grouped_value_and_grads(
        lambda r, w: dispatch.tiled_matmul(r, w, plan, tile), rows, matrix
    )
    group = to_numpy(dispatch.expert_of_row(plan))
    blocks = matrix.reshape(tiles, tile, tiles, tile).transpose(0, 2, 1, 3).reshape(-1, tile, tile)
    np.testing.assert_allclose(y, np.einsum("ri,rio->ro", rows, blocks[group]), atol=1e-5)
    np.testing.assert_allclose(g_rows, np.einsum("ro,rio->ri", u, blocks[group]), atol=1e-5)
    expected = np.stack([rows[group == g].T @ u[group == g] for g in range(tiles * tiles)])
    expected = expected.reshape(tiles, tiles, tile, tile).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(g_matrix, expected.reshape(matrix.shape), rtol=1e-5, atol=1e-4)


def test_group_block_is_bigger_where_blocks_are_batched(monkeypatch):
    monkeypatch.setattr(dispatch, "GROUPED_FORM", "batched")
    block = dispatch.group_block(16384, 2, 16, 1024 * 1024)
    assert block == dispatch.MAX_BATCHED_BLOCK > dispatch.MAX_BLOCK
    assert 16 * (block - 1) <= 16384 * 2 // 4  # padding under a quarter of the rows


def test_tiled_matmul_reads_each_rows_tile():
    rng = np.random.default_rng(3)
    n, k, tiles, tile = 25, 2, 3, 4
    groups = _random_index(rng, n, k, tiles * tiles)
    matrix = rng.standard_normal((tiles * tile, tiles * tile)).astype("float32")
    x = rng.standard_normal((n, tile)).astype("float32")
    plan = dispatch.group_plan(groups, tiles * tiles, 2)
    out = to_numpy(dispatch.tiled_matmul(x[to_numpy(plan.token_of_row)], matrix, plan, tile))
    got = out[to_numpy(plan.row_of_choice)]  # (n, k, tile)
    for t in range(n):
        for j in range(k):
            i, c = divmod(int(groups[t, j]), tiles)
            block = matrix[i * tile : (i + 1) * tile, c * tile : (c + 1) * tile]
            np.testing.assert_allclose(got[t, j], x[t] @ block, rtol=1e-5, atol=1e-5)
    # Padding rows are marked: their choice is the count of assignments.
    choice = to_numpy(plan.choice_of_row)
    real = choice < n * k
    np.testing.assert_array_equal(np.sort(choice[real]), np.arange(n * k))


@pytest.mark.tensorflow_only
def test_an_unknown_token_count_gives_a_loop_free_graph_with_equal_outputs():
    """A serving signature (free batch size) traces the plan, the grouped matmul
    and the top-k with ops every export target has: no loop, no binary search,
    no bitcast (the ops ONNX, LiteRT's builtins or OpenVINO lacked)."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    num_experts, k, block = 5, 2, 4
    kernels = rng.standard_normal((num_experts, 6, 3)).astype("float32")
    gates = np.round(rng.random((37, num_experts)), 1).astype("float32")  # with ties
    x = rng.standard_normal((37, 6)).astype("float32")

    def mixture(x, gates):
        weights, index = dispatch.top_k_weights(gates, k)
        plan = dispatch.group_plan(index, num_experts, block)
        rows = keras.ops.take(x, plan.token_of_row, axis=0)
        return dispatch.combine_rows(dispatch.grouped_matmul(rows, kernels, plan), plan, weights)

    spec = [tf.TensorSpec((None, 6)), tf.TensorSpec((None, num_experts))]
    graph = tf.function(mixture).get_concrete_function(*spec).graph
    op_types = {op.type for op in graph.get_operations()}
    assert not op_types & {"While", "StatelessWhile", "UpperBound", "LowerBound", "Bitcast"}
    got = to_numpy(tf.function(mixture, input_signature=spec)(x, gates))
    weights, index = (to_numpy(t) for t in dispatch.top_k_weights(gates, k))
    # The portable top-k picks what the static one picks, ties to the lower index.
    served = tf.function(lambda g: dispatch.top_k(g, k)[1], input_signature=spec[1:])(gates)
    np.testing.assert_array_equal(to_numpy(served), index)
    every = np.einsum("nd,edu->neu", x, kernels)
    expected = np.einsum("nk,nku->nu", weights, np.take_along_axis(every, index[..., None], 1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_count_at_most_is_searchsorted_right():
    rng = np.random.default_rng(4)
    sorted_values = np.sort(rng.integers(0, 20, 9)).astype("int32")
    queries = rng.integers(-2, 23, 30).astype("int32")
    got = to_numpy(dispatch._count_at_most(sorted_values, queries))
    np.testing.assert_array_equal(got, np.searchsorted(sorted_values, queries, side="right"))
