"""SparseDense(implementation="sparse"): step time, formulations, rewiring and scale.

Parts (each prints a markdown table; times are medians of rounds run in turns):

- `step`: fit-step time of a `width`-`width`-10 MLP whose hidden layer is a
  sparse-storage `SparseDense`, a masked one, or `keras.layers.Dense`, for
  widths 1024, 4096, 16384 and densities 0.5 %, 1 %, 5 %; batch 128, SGD
  with momentum, `jit_compile=True`. Ratios are to the Dense model of the same
  width, measured in the same rounds.
- `formulations`: forward + backward of `x @ W` at width 8192 (and the
  issue's 10000 at 0.4 %), as one gather + segment sum over all connections
  (the baseline), and as the library's chunked loop at several chunk sizes,
  with connections in random or column order.
- `rewiring`: one SET and one RigL update of a 1024 x 1024 layer at epsilon
  20, and of a 600k x 600k layer (24 M connections), sparse storage; RigL's
  growth scores (a forward/backward with probe connections) are timed apart.
- `set_profile`: where one SET evolution's time goes, pass by pass, beside
  two floors (an empty compiled call, one read of the stored entries).
- `rigl_sampling`: how close RigL's sampled growth comes to exact RigL.
- `layout`: the storage's two layouts side by side: one packed int32
  position a connection (what kernels under 2**31 entries keep) and an int32
  row and column (what larger ones keep), in a 784-1024-1024-10 MLP at 5 %:
  `predict_on_batch` at batch 1 and 64 and a fit step at batch 128.
- `scale`: `3312-H-H-H-5` at epsilon 20 on synthetic data of the Lung data's
  shape (203 samples, 3312 features, 5 classes), SET after every epoch; epoch
  time, SET time and peak resident memory.

    python benchmarks/bench_truly_sparse.py --part step
    python benchmarks/bench_truly_sparse.py --part scale --hidden 600000
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import sys
import time

import keras
import numpy as np
from interleaved import fit_step_times
from keras import ops

import keras_sparse_moe as ksm
from keras_sparse_moe.layers import SparseDense

BATCH = 128


def _header(**extra):
    items = " ".join(f"{k}={v}" for k, v in extra.items())
    print(
        f"backend={keras.backend.backend()} machine={platform.machine()} "
        f"cpus={os.cpu_count()} {items}"
    )


def _peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mlp(width, hidden):
    model = keras.Sequential(
        [keras.Input((width,)), hidden, keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        "sparse_categorical_crossentropy",
        jit_compile=True,
    )
    return model


def part_step(args):
    _header(batch=BATCH, repeats=args.repeats)
    print("| width | density | model | median step (ms) | ratio to Dense |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for width in args.widths:
        steps = max(2, min(args.steps, int(args.steps * (2048 / width) ** 2)))
        x = rng.standard_normal((steps * BATCH, width)).astype("float32")
        y = rng.integers(0, 10, steps * BATCH).astype("int32")
        for density in args.densities:
            models = {}
            if width * width <= args.dense_limit:
                models["Dense"] = _mlp(width, keras.layers.Dense(width, activation="relu"))
                models["masked"] = _mlp(
                    width, SparseDense(width, density=density, activation="relu", seed=0)
                )
            models["sparse"] = _mlp(
                width,
                SparseDense(
                    width, density=density, activation="relu", seed=0, implementation="sparse"
                ),
            )
            times = fit_step_times(models, x, y, BATCH, steps, args.repeats)
            base = statistics.median(times["Dense"]) if "Dense" in times else None
            for name, ts in times.items():
                med = statistics.median(ts)
                ratio = f"{med / base:.3f}" if base else "n/a"
                print(f"| {width} | {density:.1%} | {name} | {med * 1e3:.1f} | {ratio} |")
            del models
            keras.backend.clear_session()


def part_layout(args):
    from keras_sparse_moe.layers import storage

    _header(repeats=args.repeats)

    def build():
        keras.utils.set_random_seed(0)
        hidden = [
            SparseDense(1024, density=0.05, activation="relu", implementation="sparse", seed=s)
            for s in (0, 1)
        ]
        model = keras.Sequential([keras.Input((784,)), *hidden, keras.layers.Dense(10)])
        model.compile("adam", "mse", jit_compile=True)
        return model

    packed = build()
    limit, storage.INT32_MAX = storage.INT32_MAX, 0  # rows and columns, as a huge kernel
    models = {"packed positions": packed, "rows and columns": build()}
    storage.INT32_MAX = limit
    rng = np.random.default_rng(0)
    cases = {f"predict, batch {b}": b for b in (1, 64)} | {"fit step, batch 128": 128}
    print("| case | layout | median (ms) | ratio to rows and columns |\n|---|---|---|---|")
    for case, batch in cases.items():
        x = rng.standard_normal((batch, 784)).astype("float32")
        y = rng.standard_normal((batch, 10)).astype("float32")
        if case.startswith("fit"):
            calls = {name: functools.partial(m.train_on_batch, x, y) for name, m in models.items()}
        else:
            outputs = [m.predict_on_batch(x) for m in models.values()]
            np.testing.assert_allclose(*outputs, atol=1e-5)  # one function, two layouts
            calls = {name: functools.partial(m.predict_on_batch, x) for name, m in models.items()}
        times = {name: [] for name in calls}
        for call in calls.values():
            for _ in range(5):
                call()
        for _ in range(args.repeats):  # in turns
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(20):
                    call()
                times[name].append((time.perf_counter() - start) / 20)
        base = statistics.median(times["rows and columns"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {case} | {name} | {med * 1e3:.3f} | {med / base:.2f} |")


def _gather_segment_sum(x, values, rows, cols, n_out):
    """The baseline: one gather and one segment sum over all connections."""
    products = ops.take(ops.transpose(x), rows, axis=0) * ops.expand_dims(values, -1)
    return ops.transpose(ops.segment_sum(products, cols, num_segments=n_out))


def _compiled_value_and_grad(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(jax.grad(lambda x, v, r, c: ops.sum(fn(x, v, r, c) ** 2), argnums=(0, 1)))
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def run(x, v, r, c):
        with tf.GradientTape() as tape:
            tape.watch([x, v])
            loss = tf.reduce_sum(fn(x, v, r, c) ** 2)
        return tape.gradient(loss, [x, v])

    return run


def _time(fn, arguments, repeats):
    result = fn(*arguments)
    keras.tree.map_structure(ops.convert_to_numpy, result)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.tree.map_structure(ops.convert_to_numpy, fn(*arguments))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_formulations(args):
    from keras_sparse_moe.ops import sparse_matmul as module

    _header(batch=BATCH, repeats=args.repeats)
    print(
        "| width | density | formulation | forward+backward (ms) | ratio to baseline |"
        "\n|---|---|---|---|---|"
    )
    rng = np.random.default_rng(0)
    for width, density in ((8192, 0.01), (10000, 0.004)):
        rows, cols = ksm.topologies.erdos_renyi_positions(
            width, width, int(density * width * width), seed=0
        )
        by_column = np.lexsort((rows, cols))
        x = rng.standard_normal((BATCH, width)).astype("float32")
        values = rng.standard_normal(rows.size).astype("float32")
        variants = {"gather + segment sum (baseline)": (_gather_segment_sum, None, False)}
        for chunk in (512, 2048, 8192, 32768):
            variants[f"chunked loop, {chunk} per chunk"] = (module.sparse_matmul, chunk, False)
        variants["chunked loop, 2048, column order"] = (module.sparse_matmul, 2048, True)
        base = None
        original = module.chunk_size
        for name, (fn, chunk, ordered) in variants.items():
            if chunk is not None:
                module.chunk_size = lambda batch, nnz, chunk=chunk: chunk
            order = by_column if ordered else np.arange(rows.size)
            run = _compiled_value_and_grad(
                lambda x, v, r, c, fn=fn, width=width: fn(x, v, r, c, width)
            )
            seconds = _time(run, (x, values[order], rows[order], cols[order]), args.repeats)
            module.chunk_size = original
            base = base or seconds
            print(
                f"| {width} | {density:.1%} | {name} | {seconds * 1e3:.1f} | {seconds / base:.3f} |"
            )


def _evolution_model(shape, epsilon, implementation):
    n_in, n_out = shape
    layer = SparseDense(n_out, epsilon=epsilon, seed=0, implementation=implementation)
    model = keras.Sequential([keras.Input((n_in,)), layer])
    model.compile(keras.optimizers.Adam(1e-3), "mse", jit_compile=True)
    return model, layer


def _callback(model, callback, steps=1000):
    callback.set_model(model)
    callback.set_params({"epochs": 2, "steps": steps})
    callback.on_train_begin()
    callback._step = 0
    return callback


def _evolve(callback):
    """One SET evolution at the next optimizer step, as in `fit` (regrowth is drawn from
    (seed, step): a second evolution at the same step would redraw the candidates the
    first took, and redo itself with more)."""
    callback._step += 1
    callback.evolve()


def _timed_after(fn, before, repeats):
    """Median seconds of `fn()`, each call after an untimed `before()`."""
    fn()  # compiles
    samples = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def part_rewiring(args):
    """As in fit: each update follows a training step (untimed), so weights regrown at
    zero have moved; back to back, a third of them would tie at exactly zero."""
    _header(repeats=args.repeats)
    print("| layer | storage | update | median (ms) | connections |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, implementations in (((1024, 1024), ("masked", "sparse")), (args.wide, ("sparse",))):
        repeats = args.repeats if shape[0] <= 4096 else max(3, args.repeats // 5)
        batch = 128 if shape[0] <= 4096 else 8
        x = rng.random((batch, shape[0]), dtype=np.float32)
        y = rng.random((batch, shape[1]), dtype=np.float32)
        for implementation in implementations:
            model, layer = _evolution_model(shape, 20.0, implementation)
            model.train_on_batch(x, y)
            label = f"{shape[0]}x{shape[1]}"

            def train_step(model=model, x=x, y=y):
                model.train_on_batch(x, y)

            set_cb = _callback(model, ksm.callbacks.SETEvolution(zeta=0.3, seed=0))
            seconds = _timed_after(functools.partial(_evolve, set_cb), train_step, repeats)
            print(
                f"| {label} | {implementation} | SET zeta 0.3 | {seconds * 1e3:.2f} | "
                f"{layer.num_connections} |",
                flush=True,
            )
            rigl = _callback(model, ksm.callbacks.RigL(data=(x, y), seed=0, batch_size=batch))
            seeds = np.zeros((1, 2), "int32")
            scores = rigl._gradient_function()
            grads = scores(x, y, seeds)
            # Growth scores apart: the gradient at the candidates (sparse: 10 per
            # connection grown) or the dense gradient (masked), from one batch.
            seconds = _timed_after(
                lambda call=(scores, (x, y, seeds)): _time(*call, 1), train_step, repeats
            )
            print(
                f"| {label} | {implementation} | RigL growth scores, batch {batch} | "
                f"{seconds * 1e3:.2f} | |",
                flush=True,
            )
            seconds = _timed_after(
                lambda rigl=rigl, grads=grads: rigl.update(0.3, 0, grads), train_step, repeats
            )
            print(
                f"| {label} | {implementation} | RigL drop/grow 0.3 (scores given) | "
                f"{seconds * 1e3:.2f} | {layer.num_connections} |",
                flush=True,
            )
            del model, layer, set_cb, rigl, grads
            keras.backend.clear_session()
    print(f"peak resident memory {_peak_gb():.2f} GB")


def _set_passes(model, layer):
    """`(name, compiled function, arguments)` for each pass of one SET step of `layer`,
    on its arrays as they are (the writes in place on copies of them)."""
    from keras_sparse_moe import _runtime
    from keras_sparse_moe.callbacks.set_evolution import _set_step, regrowth_sizes
    from keras_sparse_moe.ops import rewiring

    storage = layer.storage
    optimizer_slots = _runtime.optimizer_slots(model.optimizer, storage.variables[0])
    variables = [*storage.variables, *optimizer_slots]
    # Copies: the evolutions timed beside these donate (JAX) the layer's own buffers.
    flat = [ops.convert_to_tensor(np.array(ops.convert_to_numpy(v)).ravel()) for v in variables]
    positions = None
    if storage.stores_dense:
        positions = ops.convert_to_tensor(np.array(storage.connection_positions()))
    k_max, n_candidates = regrowth_sizes(layer, 0.3)  # as `SETEvolution` draws them
    seed = np.array([1, 2], "int32")

    def step(flat, positions, seed):
        state = storage.state(flat)
        return _set_step(0.3, k_max, n_candidates, storage, state, positions, seed)[2]

    def drop(flat, positions):
        values, active = storage.weights(storage.state(flat), positions)
        return rewiring.set_drop(values, 0.3, active)

    def growth(flat, positions, drop, seed):
        count = ops.sum(ops.cast(drop, "int32"))
        state = storage.state(flat)
        return storage.random_growth(state, positions, drop, count, k_max, n_candidates, seed)

    def write(state, drop, grown):
        new_state, _ = storage.replace(storage.state(state), positions, drop, grown)
        return storage.flat(new_state), ops.sum(ops.cast(drop, "int32"))

    dropped = _runtime.compile_function(drop)(flat, positions)
    grown = _runtime.compile_function(growth)(flat, positions, dropped, seed)[0]
    copies = [keras.Variable(np.array(ops.convert_to_numpy(v))) for v in variables]
    compiled = _runtime.compile_function
    return [
        (
            "the compiled step alone (`_set_step`, writes not in place)",
            compiled(step),
            (flat, positions, seed),
        ),
        (
            "drop selection (`set_drop`: bisections over the weights)",
            compiled(drop),
            (flat, positions),
        ),
        (
            "regrowth candidates and membership test (`random_growth`)",
            compiled(growth),
            (flat, positions, dropped, seed),
        ),
        (
            "writes in place (`replace`: weights, mask or slots, optimizer moments)",
            functools.partial(_runtime.compile_update(write), copies),
            (dropped, grown),
        ),
        ("floor: an empty compiled call", compiled(lambda s: s + 1), (np.int32(0),)),
        (
            f"floor: one read of every stored entry ({int(flat[0].shape[0]):,})",
            compiled(ops.sum),
            (flat[0],),
        ),
    ]


def part_set_profile(args):
    """Where one SET evolution's time goes: each pass of the compiled step timed alone
    (compiled on its own, after an untimed training step), beside the whole evolution
    and two floors (an empty compiled call, one read of every stored entry)."""
    _header(repeats=args.repeats)
    print("| layer | storage | pass | median (ms) |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    shapes = [((1024, 1024), "masked"), ((1024, 1024), "sparse")]
    if args.wide[0] * args.wide[1] > 1024**2:
        shapes.append((tuple(args.wide), "sparse"))
    for shape, implementation in shapes:
        repeats = args.repeats if shape[0] <= 4096 else max(3, args.repeats // 5)
        batch = 128 if shape[0] <= 4096 else 8
        x = rng.random((batch, shape[0]), dtype=np.float32)
        y = rng.random((batch, shape[1]), dtype=np.float32)
        model, layer = _evolution_model(shape, 20.0, implementation)
        model.train_on_batch(x, y)
        set_cb = _callback(model, ksm.callbacks.SETEvolution(zeta=0.3, seed=0))

        def train_step(model=model, x=x, y=y):
            model.train_on_batch(x, y)

        rows = [("whole evolution (`SETEvolution.evolve`)", functools.partial(_evolve, set_cb))]
        for name, fn, arguments in _set_passes(model, layer):
            rows.append((name, lambda call=(fn, arguments): _time(*call, 1)))
        for name, fn in rows:
            seconds = _timed_after(fn, train_step, repeats)
            label = f"{shape[0]}x{shape[1]}"
            print(f"| {label} | {implementation} | {name} | {seconds * 1e3:.2f} |", flush=True)
        del model, layer, set_cb, rows
        keras.backend.clear_session()


def part_rigl_sampling(args):
    """RigL's sampled growth against exact RigL on one update, from one trained state.

    A 784-1024-10 MLP (hidden layer sparse storage, epsilon 20) trains one
    epoch on MNIST (or random data); then exact RigL (every position scored)
    and sampled RigL (`growth_candidates` per connection grown) each grow 30 %
    from copies of that state and the same batch. Reported: the share of the
    exact growth the sample also grows, and the share of the exact growth's
    gradient mass (sum of |dL/dW| over the grown positions) it reaches.
    """
    if args.data:
        data = ksm.datasets.load_image_classification(args.data)
        x, y = data.x_train[:10000], data.y_train[:10000]
    else:
        rng = np.random.default_rng(0)
        x, y = rng.random((10000, 784), dtype=np.float32), rng.integers(0, 10, 10000)
    hidden = SparseDense(1024, epsilon=20, activation="relu", seed=0, implementation="sparse")
    model = keras.Sequential([keras.Input((784,)), hidden, keras.layers.Dense(10)])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    state = [np.array(ops.convert_to_numpy(v)) for v in model.variables]
    batch = (x[:BATCH], y[:BATCH])
    exact = ksm.callbacks.RigL(data=batch, batch_size=BATCH, growth_candidates=None, seed=0)
    _callback(model, exact)
    full = exact._gradient_function()(*batch, np.zeros((1, 2), "int32"))[0]
    # |dL/dW| at every position: the exact scores, in row-major order.
    magnitude = np.abs(np.asarray(ops.convert_to_numpy(full[0]))).reshape(hidden.kernel_shape)
    before = hidden.dense_mask()
    exact.update(0.3, step=0)
    reference = hidden.dense_mask() & ~before
    _header(data=args.data or "random", grown=int(reference.sum()))
    print(
        "| growth candidates per connection grown | grown also by exact RigL | "
        "gradient mass vs exact |\n|---|---|---|"
    )
    for candidates in args.candidates:
        for variable, value in zip(model.variables, state):
            variable.assign(value)
        hidden.refresh_connections()
        rigl = ksm.callbacks.RigL(
            data=batch, batch_size=BATCH, growth_candidates=candidates, seed=1
        )
        _callback(model, rigl)
        rigl.update(0.3, step=0)
        grown = hidden.dense_mask() & ~before
        overlap = (grown & reference).sum() / reference.sum()
        mass = magnitude[grown].sum() / magnitude[reference].sum()
        print(f"| {candidates} | {overlap:.1%} | {mass:.1%} |", flush=True)


class _EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.evolutions = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self._start)


class _TimedSET(ksm.callbacks.SETEvolution):
    def evolve(self):
        start = time.perf_counter()
        result = super().evolve()
        self.seconds = getattr(self, "seconds", []) + [time.perf_counter() - start]
        return result


def part_scale(args):
    hidden = args.hidden
    samples, features, classes = 203, 3312, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, features)).astype("float32")
    y = rng.integers(0, classes, samples).astype("int32")
    start = time.perf_counter()
    layers = [
        SparseDense(
            hidden, epsilon=20.0, activation="relu", seed=i, implementation="sparse", name=f"h{i}"
        )
        for i in range(args.layers)
    ]
    # epsilon 20 asks for more than all 5 * H connections of the output layer: it is full.
    out = SparseDense(classes, density=1.0, seed=9, implementation="sparse", name="out")
    model = keras.Sequential([keras.Input((features,)), *layers, out])
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    built = time.perf_counter() - start
    connections = sum(layer.num_connections for layer in model.layers)
    neurons = features + args.layers * hidden + classes
    # SET after the last epoch too (update_every counts steps): one per epoch.
    steps = -(-samples // args.batch)
    timer, set_cb = _EpochTimes(), _TimedSET(zeta=0.3, update_every=steps, exclude=["out"], seed=0)
    history = model.fit(
        x,
        y,
        batch_size=args.batch,
        epochs=args.epochs,
        verbose=2,
        callbacks=[set_cb, timer],
    )
    losses = history.history["loss"]
    _header(batch=args.batch, epochs=args.epochs)
    print(
        "| model | neurons | connections | build (s) | first epoch (s, compiles) | "
        "later epochs, median (s) | SET (s, median) | peak RSS (GB) | loss, first -> last epoch |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    later = statistics.median(timer.epochs[1:]) if len(timer.epochs) > 1 else float("nan")
    evolutions = getattr(set_cb, "seconds", [float("nan")])
    set_time = statistics.median(evolutions[1:] or evolutions)
    name = "-".join(str(n) for n in [features, *[hidden] * args.layers, classes])
    print(
        f"| {name} | {neurons:,} | {connections:,} | {built:.1f} | {timer.epochs[0]:.1f} | "
        f"{later:.1f} | {set_time:.2f} | {_peak_gb():.2f} | {losses[0]:.3f} -> {losses[-1]:.3f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        choices=(
            "step",
            "formulations",
            "rewiring",
            "set_profile",
            "rigl_sampling",
            "layout",
            "scale",
        ),
        default="step",
    )
    parser.add_argument("--data", default=None, help="rigl_sampling: an .npz (MNIST)")
    parser.add_argument("--candidates", type=float, nargs="+", default=[1, 2, 4, 10, 40])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.005, 0.01, 0.05])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch at 2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dense-limit", type=int, default=16384**2, help="largest width**2 timed dense"
    )
    parser.add_argument("--wide", type=int, nargs=2, default=[600_000, 600_000])
    parser.add_argument("--hidden", type=int, default=600_000)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    {
        "step": part_step,
        "formulations": part_formulations,
        "rewiring": part_rewiring,
        "set_profile": part_set_profile,
        "rigl_sampling": part_rigl_sampling,
        "layout": part_layout,
        "scale": part_scale,
    }[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
