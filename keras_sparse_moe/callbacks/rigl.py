"""RigL: drop by magnitude, grow by dense gradient, inside `model.fit` (Evci et al. 2020)."""

from __future__ import annotations

import contextlib
import functools
import math

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import _runtime, validation
from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.callbacks.set_evolution import check_fraction, check_update_every
from keras_sparse_moe.layers.sparse_kernel import DENSE_LIMIT
from keras_sparse_moe.ops import rewiring

__all__ = ["RigL"]

DECAYS = ("cosine", "constant")


@contextlib.contextmanager
def _growth_mode(layers, probes):
    """While tracing: every layer's growth probe (`SparseKernelLayer.growth_probe`)."""
    with contextlib.ExitStack() as stack:
        for layer, probe in zip(layers, probes):
            stack.enter_context(layer.growth_probe(probe))
        yield


def _draw_candidates(layers, candidates, seeds):
    """Per layer: None (masked), or the `(rows, cols)` of its candidate positions:
    every position when `candidates` is at least the kernel's size, else that
    many uniform random ones from its `(2,)` seed."""
    drawn = []
    for layer, count, seed in zip(layers, candidates, seeds):
        if count is None:
            drawn.append(None)
            continue
        drawn.append(layer.storage.draw_candidates(seed, count))
    return drawn


def compiled_growth_scores(model, layers, candidates=None):
    """A compiled `(x, y, seeds) -> one growth score per layer`.

    Masked layers (`candidates[i]` None): the dense gradient `dL/dW` of the
    full kernel. Unlike training, empty positions get their true gradient
    too: that is RigL's growth criterion. Sparse layers: `(scores, rows,
    cols)`, the gradient at `candidates[i]` candidate positions (all
    positions when it covers the kernel), read as the gradient of zero-valued
    probe connections added there: O(batch * candidates), no dense array.
    `seeds` is an int32 `(len(layers), 2)` array. The layers' flags are set
    only while the function is traced, so training steps are unaffected.
    """
    candidates = list(candidates or [None] * len(layers))
    return _runtime.compile_loss_gradients(
        model,
        [layer.kernel if c is None else None for layer, c in zip(layers, candidates)],
        draw=lambda seeds: _draw_candidates(layers, candidates, seeds),
        probing=lambda probes: _growth_mode(layers, probes),
    )


def compiled_dense_gradients(model, layers):
    """A compiled `(x, y) -> [dL/dW for each (masked) layer's full kernel]`."""
    scores = compiled_growth_scores(model, layers)
    seeds = np.zeros((len(layers), 2), "int32")
    return lambda x, y: scores(x, y, seeds)


def dense_kernel_gradients(model, layers, x, y):
    """Dense gradients of the compiled loss w.r.t. each masked layer's kernel (see above)."""
    return compiled_dense_gradients(model, layers)(x, y)


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class RigL(SparseTrainingCallback):
    """Rigged Lottery: periodically swaps weak connections for promising ones.

    Every `update_every` steps until `end_step`, each `SparseDense` layer drops
    the fraction `f(t)` of its connections with the smallest magnitude and
    grows as many where the dense gradient magnitude of one batch is largest
    among the positions empty before the drop (so a dropped connection is not
    regrown at once); new weights start at zero and their optimizer state
    is reset. `f(t) = drop_fraction / 2 * (1 + cos(pi * t / end_step))` with
    `decay="cosine"`. The connection count is unchanged.

    Keras callbacks do not see the training batch, so the dense gradient is
    taken on `data`: an `(x, y)` tuple of arrays from which a batch of
    `batch_size` rows is drawn at each update (cycling through it).

    Layers with `implementation="sparse"` never form the dense gradient: the
    gradient is read at `growth_candidates` random empty positions per
    connection to grow (as zero-valued probe connections, O(batch x
    candidates)), and the best of those grow. `growth_candidates=None`
    scores every position: exact RigL, for layers small enough to densify.

    Reference: Evci et al., "Rigging the Lottery: Making All Tickets Winners", 2020.

    Args:
        data: `(x, y)` arrays used for the dense gradient (a few thousand rows).
        update_every: Steps between updates (`ΔT`, 100 in the paper).
        drop_fraction: Initial fraction dropped per update, in (0, 1).
        decay: `"cosine"` or `"constant"`.
        end_step: Last step with updates; default 75 % of the training steps.
        batch_size: Rows of `data` per gradient (default 128).
        growth_candidates: For sparse layers, random candidate positions
            scored per connection grown (default 10), or None for all.
        exclude: Layers (or names) left unchanged.
        seed: Optional int.

    Logs: `density/<layer>` and `rigl/rewired`.
    """

    name = "rigl"

    def __init__(
        self,
        data=None,
        update_every=100,
        drop_fraction=0.3,
        decay="cosine",
        end_step=None,
        batch_size=128,
        growth_candidates=10,
        exclude=None,
        seed=None,
    ):
        super().__init__(exclude=exclude, seed=seed)
        owner = "RigL"
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"`{owner}` needs `data=(x, y)`: arrays for the dense gradient (Keras "
                f"callbacks do not see the training batch). Received: data={type(data).__name__}"
            )
        self.data = (np.asarray(data[0]), np.asarray(data[1]))
        if len(self.data[0]) != len(self.data[1]) or len(self.data[0]) == 0:
            raise ValueError(
                f"`{owner}` got `data` with mismatched or empty arrays. Received: "
                f"len(x)={len(self.data[0])}, len(y)={len(self.data[1])}"
            )
        self.update_every = check_update_every(update_every, owner, allow_epoch=False)
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction", owner)
        self.decay = validation.check_choice("decay", decay, owner, DECAYS)
        if end_step is not None:
            end_step = validation.check_int("end_step", end_step, owner, minimum=1)
        self.end_step = end_step
        self.batch_size = validation.check_int("batch_size", batch_size, owner, minimum=1)
        if growth_candidates is not None:
            growth_candidates = validation.check_float(
                "growth_candidates",
                growth_candidates,
                owner,
                "a number >= 1, or None (every position)",
                lambda g: g >= 1,
            )
        self.growth_candidates = growth_candidates
        self._gradients = None

    def get_config(self):
        """Every argument but `data` (arrays are not configuration): pass it to
        `from_config` inside the config, e.g. `RigL.from_config({**c, "data": (x, y)})`."""
        return {
            "update_every": self.update_every,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "end_step": self.end_step,
            "batch_size": self.batch_size,
            "growth_candidates": self.growth_candidates,
            "exclude": [x if isinstance(x, str) else x.name for x in self.exclude],
            "seed": self.seed,
        }

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._end_step = self.end_step
        if self._end_step is None:
            if self._steps_per_epoch is None:
                raise ValueError(
                    "`RigL` cannot infer `end_step` (unknown steps per epoch): pass end_step."
                )
            self._end_step = max(1, int(0.75 * self._epochs * self._steps_per_epoch))

    def fraction(self, step):
        """Fraction of connections replaced at `step`."""
        if step >= self._end_step:
            return 0.0
        if self.decay == "constant":
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self._end_step))

    def on_train_batch_end(self, batch, logs=None):
        previous, current = self._advance(batch)
        step = self._boundary(previous, current, self.update_every)
        if step is not None and not self._is_last_step(batch):
            self._record_step(logs, self.update(self.fraction(step), step))

    def _batch(self, step):
        """The rows of `data` for the update at `step`: consecutive, cycling, a function of step."""
        x, y = self.data
        start = (step // self.update_every) * self.batch_size
        rows = (start + np.arange(min(self.batch_size, len(x)))) % len(x)
        return x[rows], y[rows]

    def update(self, fraction, step=None, gradients=None):
        """Runs one drop-and-grow with `fraction` now; returns connections replaced.

        `step` (default: the optimizer's) chooses the rows of `data` used for
        the gradient and the candidates of sparse layers. `gradients`, one per
        layer the callback acts on (`callback.sparse_layers`), replaces that
        gradient (e.g. one computed elsewhere, or to time the rewiring alone):
        an array of the kernel's shape (`weight_shape`) for a masked layer, `(scores, rows,
        cols)` of candidate positions for a sparse one.
        """
        if fraction <= 0:
            return 0
        self._sync_model_state()
        step = self._step if step is None else step
        if gradients is None:
            x, y = self._batch(step)
            seeds = np.stack(
                [_runtime.step_seed(self._seed, step, i) for i in range(len(self.sparse_layers))]
            )
            grads = self._gradient_function()(x, y, seeds)
        else:
            grads = list(gradients)
            shapes = [
                layer.weight_shape if layer.storage.stores_dense else "(scores, rows, cols)"
                for layer in self.sparse_layers
            ]
            received = [tuple(g.shape) if hasattr(g, "shape") else "tuple" for g in grads]
            if len(grads) != len(shapes) or any(
                isinstance(s, tuple) and s != r for s, r in zip(shapes, received)
            ):
                raise ValueError(
                    "`RigL.update` needs one gradient per layer: shaped like the kernel for a "
                    f"masked layer, (scores, rows, cols) for a sparse one. Expected {shapes}. "
                    f"Received: {received}"
                )
        salt = np.asarray(_runtime.step_seed(self._seed, step, 1 << 20)[1], np.int32)
        return sum(
            self._update_layer(layer, grad, fraction, salt=salt)
            for layer, grad in zip(self.sparse_layers, grads)
        )

    def candidate_count(self, layer):
        """Candidate positions scored for a sparse `layer` (None for a masked one)."""
        if layer.storage.stores_dense:  # the dense gradient is the score
            return None
        size = int(np.prod(layer.kernel_shape))
        if self.growth_candidates is None or layer.n_m is not None:
            # An N:M layer grows inside each group: every position is scored.
            if size > DENSE_LIMIT:
                raise ValueError(
                    "`RigL(growth_candidates=None)` (and RigL on an N:M layer) scores every "
                    "position of a layer, and "
                    f"{layer.name}'s {layer.kernel_shape} kernel is too large for that. "
                    "Give a number of candidates per connection grown instead."
                )
            return size
        nnz = layer.num_connections
        k_max = max(1, math.floor(self.drop_fraction * nnz))
        free = max((layer.num_allowed - nnz) / size, 1.0 / size)
        return min(size, int(math.ceil(self.growth_candidates * k_max / free)))

    def _gradient_function(self):
        if self._gradients is None or self._gradients[0] is not self.model:
            candidates = [self.candidate_count(layer) for layer in self.sparse_layers]
            self._gradients = (
                self.model,
                compiled_growth_scores(self.model, self.sparse_layers, candidates),
            )
        return self._gradients[1]

    def _update_layer(self, layer, grad, fraction, exact=False, salt=0):
        nnz = layer.num_connections
        # Growth is among allowed positions empty before the drop: at most allowed - nnz.
        room = layer.num_allowed - nnz
        count = min(int(math.floor(fraction * nnz)), room)
        if count <= 0:
            return 0
        k_max = max(1, min(nnz, room, math.floor(self.drop_fraction * nnz)))
        growth = (grad,) if layer.storage.stores_dense else tuple(grad)
        if layer.n_m is None:
            step = functools.partial(_rigl_step, k_max, exact)
        else:  # grown inside each group: every group keeps its count
            step = functools.partial(_rigl_group_step, k_max, layer.n_m[1])
        # A numpy count: making a JAX device scalar would cost more (0.2 ms).
        flags = layer.rewire(
            step,
            self.model.optimizer,
            # Shapes are static per function.
            ("rigl", k_max, exact, layer.n_m, int(growth[0].shape[0])),
            np.asarray(count, np.int32),
            np.asarray(salt, np.int32),
            *growth,
        )
        replaced, current, bracketed = (int(f) for f in ops.convert_to_numpy(flags))  # one read
        if not current:
            layer.refresh_connections()  # the connections were changed elsewhere
            return self._update_layer(layer, grad, fraction, exact, salt)
        if not bracketed:  # the sampled threshold missed: select over the whole kernel
            return self._update_layer(layer, grad, fraction, True, salt)
        return replaced


def _count(flags):
    return ops.sum(ops.cast(flags, "int32"))


def _rigl_step(k_max, exact, storage, state, positions, count, salt, *growth):
    """One RigL drop-and-grow, compiled and written in place: grow the `count`
    positions with the largest gradient among those empty before the drop (and
    allowed), drop as many smallest magnitudes.

    `growth` is the storage's growth score (`scored_growth`). Writes nothing
    unless the connection list is current and the growth threshold bracketed
    its answer; returns int32 `[replaced, list current, bracketed]` (fewer
    replaced than `count` only when fewer candidates were acceptable).
    """
    grown, count, current, bracketed = storage.scored_growth(
        state, positions, count, k_max, exact, salt, *growth
    )
    values, active = storage.weights(state, positions)
    if active is None:
        active = ops.ones_like(values, "bool")
    drop = rewiring.select_smallest(rewiring.magnitude_keys(values), active, count)
    drop = storage.refillable(drop, grown)
    ok = ops.logical_and(current, bracketed)
    new_state, new_positions = storage.replace(state, positions, ops.logical_and(drop, ok), grown)
    flags = ops.stack([_count(drop), ops.cast(current, "int32"), ops.cast(bracketed, "int32")])
    return new_state, new_positions, flags


def _rigl_group_step(k_max, m, storage, state, positions, count, salt, *growth):
    """RigL on an N:M layer: the `count` smallest magnitudes are dropped, less
    those a group cannot regrow (each group drops at most as many as it has
    positions empty before the drop), and each group grows as many of its
    empty positions with the largest gradient. Every group keeps its count.
    `growth` scores every position, in flat order. Same flags as `_rigl_step`."""
    from keras_sparse_moe.ops import groups

    scores = ops.abs(ops.reshape(ops.cast(growth[0], "float32"), (-1,)))
    values, active = storage.weights(state, positions)
    if active is None:
        active = ops.ones_like(values, "bool")
    flat, occupied = storage.flat_positions(state, positions)
    current = storage.list_is_current(state, positions)
    shape = storage.shape
    drop = rewiring.select_smallest(rewiring.magnitude_keys(values), active, count)
    drop = groups.cap_drops(drop, values, flat, occupied, shape, m)
    grown = groups.grow_in_groups(drop, flat, occupied, scores, shape, m, k_max, False)
    drop = ops.logical_and(drop, current)
    new_state, new_positions = storage.replace(state, positions, drop, storage.growth_at(grown))
    one = ops.convert_to_tensor(1, "int32")
    flags = ops.stack([ops.sum(ops.cast(drop, "int32")), ops.cast(current, "int32"), one])
    return new_state, new_positions, flags
