"""SET: sparse evolutionary training inside `model.fit` (Mocanu et al. 2018)."""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import initializers, ops

from keras_sparse_moe import _runtime, validation
from keras_sparse_moe.callbacks.base import SparseTrainingCallback
from keras_sparse_moe.layers.sparse_kernel import initial_values
from keras_sparse_moe.ops import rewiring

__all__ = ["SETEvolution"]


def check_update_every(update_every, owner, allow_epoch=True):
    """`"epoch"` (when allowed) or a number of steps >= 1."""
    if allow_epoch and isinstance(update_every, str):
        return validation.check_choice("update_every", update_every, owner, ("epoch",))
    return validation.check_int("update_every", update_every, owner, minimum=1)


def check_fraction(value, name, owner):
    return validation.check_float(name, value, owner, "a float in (0, 1)", lambda v: 0 < v < 1)


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SETEvolution(SparseTrainingCallback):
    """Evolves the connectivity of every `SparseDense` layer with SET.

    At each evolution, per layer: remove the fraction `zeta` of the smallest
    positive weights and `zeta` of the largest negative weights, then regrow as
    many connections at uniformly random empty positions. The number of
    connections is unchanged. Regrown weights start at zero (or from
    `regrow_initializer`); optimizer state (momentum, Adam moments) is reset at
    every position that changed. After the last epoch nothing evolves
    (`last_epoch="skip"`), or the fraction `zeta` is
    removed without regrowth (`last_epoch="prune"`). The
    rewiring is one compiled, vectorised function per layer run between
    training steps; no weight leaves the device and the model is not rebuilt.

    On the epoch schedule the evolution after epoch `e` runs when epoch `e + 1`
    begins, so a checkpoint or `keras.callbacks.BackupAndRestore` backup taken at
    the end of epoch `e` holds the network before it, whatever the order of the
    callbacks, and a resumed run replays it: resuming ends where the
    uninterrupted run ends.

    Reference: Mocanu et al., "Scalable training of artificial neural networks
    with adaptive sparse connectivity inspired by network science", 2018.

    Args:
        zeta: Fraction in (0, 1) of positive and of negative weights replaced.
        update_every: `"epoch"` (SET's schedule) or a number of steps.
        probability: Instead of a schedule, evolve after each step with this
            probability in (0, 1) (a per-step variant of SET).
        regrow_initializer: Initializer for regrown weights. Default zeros:
            on MNIST (SET paper's MLP, 8 epochs, two seeds) zeros beat
            random regrowth (`"glorot_uniform"`) per epoch, and
            only zero-started connections on blank pixels are removed again;
            per step (`probability`) random regrowth ended 0.3 points higher.
        last_epoch: What happens after the last epoch (epoch schedule only).
            `"skip"` (default): nothing, the network keeps its connections.
            `"prune"`: remove the fraction `zeta` as after every
            other epoch but regrow nothing, so the network ends with about
            `1 - zeta` of its connections and none that are new and untrained.
        exclude: Layers (or their names) left unchanged.
        seed: Optional int for reproducible regrowth.

    Logs (progress bar, `History`, TensorBoard): `density/<layer>` per layer and
    `set/rewired`, the connections replaced in the epoch: on the epoch schedule
    by the evolution at its start (0 in the first epoch), on step schedules the
    total of its evolutions; with `last_epoch="prune"`, `set/pruned` in the
    last epoch's logs, the connections removed.

    Examples:

        >>> import numpy as np, keras, keras_sparse_moe
        >>> model = keras.Sequential([keras.Input((20,)),
        ...     keras_sparse_moe.layers.SparseDense(32, density=0.2, activation="relu"),
        ...     keras.layers.Dense(1)])
        >>> model.compile("adam", "mse")
        >>> set_cb = keras_sparse_moe.callbacks.SETEvolution(zeta=0.3, seed=0)
        >>> h = model.fit(np.ones((64, 20)), np.ones((64, 1)), epochs=2, verbose=0,
        ...               callbacks=[set_cb])
        >>> h.history["set/rewired"][1] > 0  # the evolution after epoch 0, as epoch 1 begins
        True
    """

    name = "set"

    def __init__(
        self,
        zeta=0.3,
        update_every="epoch",
        probability=None,
        regrow_initializer="zeros",
        last_epoch="skip",
        exclude=None,
        seed=None,
    ):
        super().__init__(exclude=exclude, seed=seed)
        owner = "SETEvolution"
        self.zeta = check_fraction(zeta, "zeta", owner)
        self.update_every = check_update_every(update_every, owner)
        if probability is not None:
            probability = check_fraction(probability, "probability", owner)
            if update_every != "epoch":
                raise ValueError(
                    f"`{owner}` takes `probability` or a step `update_every`, not both. "
                    f"Received: update_every={update_every}, probability={probability}"
                )
        self.probability = probability
        validation.check_choice("last_epoch", last_epoch, owner, ("skip", "prune"))
        if last_epoch == "prune" and (update_every != "epoch" or probability is not None):
            raise ValueError(
                f"`{owner}` prunes after the last epoch only on the epoch schedule. "
                f"Received: last_epoch='prune', update_every={update_every!r}, "
                f"probability={probability}"
            )
        self.last_epoch = last_epoch
        self.regrow_initializer = initializers.get(regrow_initializer)
        self._regrow_zeros = isinstance(self.regrow_initializer, initializers.Zeros)

    def get_config(self):
        return {
            "zeta": self.zeta,
            "update_every": self.update_every,
            "probability": self.probability,
            "regrow_initializer": initializers.serialize(self.regrow_initializer),
            "last_epoch": self.last_epoch,
            "exclude": [x if isinstance(x, str) else x.name for x in self.exclude],
            "seed": self.seed,
        }

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        patterned = [layer.name for layer in self.sparse_layers if layer.n_m is not None]
        if self.last_epoch == "prune" and patterned:
            raise ValueError(
                "`SETEvolution(last_epoch='prune')` removes connections without regrowth, "
                f"which would break the N:M pattern of {patterned}. Use last_epoch='skip' "
                "or exclude those layers."
            )

    # ------------------------------------------------------------------ #
    @property
    def _on_epoch_schedule(self):
        return self.update_every == "epoch" and self.probability is None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        # The evolution due after epoch `epoch - 1`: run here, after any backup of
        # that epoch's end and after `BackupAndRestore` restored one.
        if self._on_epoch_schedule and epoch > 0:
            self._rewired_in_epoch = self.evolve()

    def on_epoch_end(self, epoch, logs=None):
        if self._on_epoch_schedule and epoch == self._epochs - 1 and self.last_epoch == "prune":
            pruned = self.evolve(regrow=False)
            if logs is not None:
                logs[f"{self.name}/pruned"] = pruned
        self._report(logs, self._rewired_in_epoch)

    def on_train_batch_end(self, batch, logs=None):
        previous, current = self._advance(batch)
        if self._on_epoch_schedule:
            return
        if self.probability is not None:
            # One draw per optimizer step, from (seed, step): a resumed run draws the same.
            steps = range(previous + 1, current + 1)
            due = any(_runtime.step_uniform(self._seed, s) < self.probability for s in steps)
        else:
            due = self._boundary(previous, current, self.update_every) is not None
        if due and not self._is_last_step(batch):
            self._record_step(logs, self.evolve())

    # ------------------------------------------------------------------ #
    def evolve(self, regrow=True):
        """Runs one SET evolution on every layer now; returns connections replaced.

        `regrow=False` only removes (`last_epoch="prune"`): returns the
        connections removed.
        """
        if not getattr(self, "sparse_layers", None):
            raise ValueError("`SETEvolution.evolve()` runs during `fit` (after `on_train_begin`).")
        self._sync_model_state()
        if not regrow:
            return sum(self._remove(layer) for layer in self.sparse_layers)
        return sum(
            self._evolve_layer(layer, stream) for stream, layer in enumerate(self.sparse_layers)
        )

    def _remove(self, layer):
        step = functools.partial(_set_remove, self.zeta)
        removed = layer.rewire(step, self.model.optimizer, ("set_remove", self.zeta))
        return int(ops.convert_to_numpy(removed))

    def _evolve_layer(self, layer, stream, attempt=0):
        k_max, n_candidates = regrowth_sizes(layer, self.zeta, attempt)
        extra = []
        if not self._regrow_zeros:
            # With the kernel's fans, so fan-based initializers scale right; no
            # dense draw (`k_max` values only).
            draw = initial_values(self.regrow_initializer, layer.weight_shape, k_max)
            extra = [draw(None, layer.variable_dtype)]
        if layer.n_m is None:
            step = functools.partial(_set_step, self.zeta, k_max, n_candidates)
            key = ("set", k_max, n_candidates, bool(extra))
        else:  # regrown inside each group: every group keeps its count
            step = functools.partial(_set_group_step, self.zeta, k_max, layer.n_m[1])
            key = ("set_n_m", k_max, layer.n_m[1], bool(extra))
        # Regrowth is drawn from (seed, optimizer step, layer, attempt) alone.
        seed = _runtime.step_seed(self._seed, self._step, 4 * stream + min(attempt, 3))
        flags = layer.rewire(step, self.model.optimizer, key, seed, *extra)
        count, current, enough = (int(f) for f in ops.convert_to_numpy(flags))  # one read
        if not current:
            layer.refresh_connections()  # the mask was changed elsewhere
            return self._evolve_layer(layer, stream, attempt)
        if not enough:
            if attempt >= 3:
                raise RuntimeError(f"SETEvolution found too few empty positions in {layer.name}.")
            return self._evolve_layer(layer, stream, attempt + 1)
        return count


def regrowth_sizes(layer, zeta, attempt=0):
    """`(k_max, n_candidates)` of one SET evolution of `layer`: the most connections
    replaced, and the random candidates drawn to regrow them (doubled per `attempt`)."""
    size = int(np.prod(layer.kernel_shape))
    nnz = layer.num_connections
    k_max = max(1, min(nnz, math.floor(zeta * nnz)))
    # About (allowed - nnz) / size of the candidates land on empty allowed
    # positions. The margin makes a redraw (`enough` False) very unlikely.
    free = max((layer.num_allowed - nnz) / size, 1.0 / size)
    needed = k_max / free * 1.3 + 1024
    if not layer.storage.stores_dense:
        # Its hashed membership test also refuses candidates sharing a bucket:
        # a fifth at a quarter load, more once the table reaches its cap.
        accept = rewiring.acceptance(layer.kernel_shape, nnz + needed)
        needed = k_max / (free * accept) * 1.3 + 1024
    # Repeated candidates are rejected, so drawing about as many as there are
    # positions would waste most of them: small layers use a permutation.
    return k_max, min(int(needed * (2**attempt)), size)


def _set_step(zeta, k_max, n_candidates, storage, state, positions, seed, grown_values=None):
    """One SET evolution of a layer, compiled and written in place.

    Drops the fraction `zeta` of the positive and of the negative weights
    closest to zero and regrows as many at random empty positions where a
    connection is allowed (a position dropped now may be regrown), starting at
    `grown_values` (zeros when None). Rewires only if the connection list is
    current and enough empty positions were found (else it writes nothing and
    the flags tell the caller to redo it). Returns int32 flags `[replaced,
    list current, enough candidates]` (one host read).
    """
    values, active = storage.weights(state, positions)
    drop = rewiring.set_drop(values, zeta, active)
    count = ops.sum(ops.cast(drop, "int32"))
    grown, enough, current = storage.random_growth(
        state, positions, drop, count, k_max, n_candidates, seed
    )
    drop = storage.refillable(drop, grown)
    drop = ops.logical_and(drop, ops.logical_and(current, enough))
    new_state, new_positions = storage.replace(state, positions, drop, grown, grown_values)
    flags = ops.stack(
        [ops.sum(ops.cast(drop, "int32")), ops.cast(current, "int32"), ops.cast(enough, "int32")]
    )
    return new_state, new_positions, flags


def _set_group_step(zeta, k_max, m, storage, state, positions, seed, grown_values=None):
    """SET on an N:M layer: the drop of `_set_step`, each dropped connection
    regrown at a uniformly random empty position of its own group (a position
    dropped now may be regrown), so every group keeps its count. Same flags."""
    from keras_sparse_moe.ops import groups

    values, active = storage.weights(state, positions)
    drop = rewiring.set_drop(values, zeta, active)
    flat, occupied = storage.flat_positions(state, positions)
    current = storage.list_is_current(state, positions)
    shape = storage.shape
    scores = _runtime.stateless_randint(seed, (int(shape[0]) * int(shape[1]),), 1 << 24)
    grown = groups.grow_in_groups(drop, flat, occupied, scores, shape, m, k_max, True)
    drop = ops.logical_and(drop, current)
    new_state, new_positions = storage.replace(
        state, positions, drop, storage.growth_at(grown), grown_values
    )
    one = ops.convert_to_tensor(1, "int32")  # regrowth in a group never runs short
    flags = ops.stack([ops.sum(ops.cast(drop, "int32")), ops.cast(current, "int32"), one])
    return new_state, new_positions, flags


def _set_remove(zeta, storage, state, positions):
    """SET's removal without regrowth (the last epoch of a run): returns the count removed."""
    values, active = storage.all_weights(state)
    drop = rewiring.set_drop(values, zeta, active)
    return storage.remove(state, drop), None, ops.sum(ops.cast(drop, "int32"))


_set_remove.reads_positions = False  # it removes only (see `SparseKernelLayer.rewire`)
