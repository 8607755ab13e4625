"""`PTSNEGate`: a parametric t-SNE map of the inputs on which experts own regions."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import _runtime
from keras_sparse_moe.layers.gates import Gate, Routing
from keras_sparse_moe.ops import tsne
from keras_sparse_moe.ops.tsne import check_dof
from keras_sparse_moe.saving import read_config
from keras_sparse_moe.validation import check_float, check_int, check_seed

__all__ = ["EXPERT_POSITIONS", "PTSNEGate", "grid_positions"]

OWNER = "PTSNEGate"
EXPERT_POSITIONS = ("grid", "kmeans", "trainable")


def grid_positions(num_experts: int, n_components: int = 2) -> np.ndarray:
    """`num_experts` points on a regular grid in `[-1, 1]` over the first two map axes.

    >>> grid_positions(4).tolist()
    [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]
    """
    columns = num_experts if n_components == 1 else math.ceil(math.sqrt(num_experts))
    rows = math.ceil(num_experts / columns)
    axis = lambda count: np.linspace(-1.0, 1.0, count) if count > 1 else np.zeros(1)  # noqa: E731
    xs, ys = np.meshgrid(axis(columns), axis(rows))
    points = np.zeros((num_experts, n_components), dtype="float32")
    points[:, 0] = xs.ravel()[:num_experts]
    if n_components > 1:
        points[:, 1] = ys.ravel()[:num_experts]
    return points


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class PTSNEGate(Gate):
    """A gate whose experts own regions of a parametric t-SNE map of its input.

    An embedding network maps each token to a point `y` of a low-dimensional
    map (2-D by default), trained with the t-SNE loss `KL(P ‖ Q)` of every
    batch (van der Maaten 2009; `keras_sparse_moe.ops.tsne`), so that
    neighbours in the input stay neighbours on the map. The map is
    standardised (`z = (y − centre) / sqrt(scale)`, running statistics kept
    in training), each expert `e` has a position `c_e` on it, and the gate
    values fall off with the distance:
    `G(x) = softmax(−‖z − c_e‖² / temperature)`. The experts thus own the
    Voronoi regions of their positions, which `keras_sparse_moe.plots.
    gate_map` draws.

    The t-SNE loss (weight `tsne_weight`) is the gate's own: in a
    `SparseExpertMixture` it is added with the balancing losses (and its
    running mean shows as `"<mixture>/tsne_kl"` with `ActivationRateLogger`);
    a gate called alone adds it in training. The affinities are computed per
    batch in the graph, so batches may be shuffled; the perplexity must stay
    well below the batch size.

    A batch of a hundred random samples holds few true neighbours, so a map
    trained by the per-batch loss alone stays coarse. For a fine map, start
    the embedding from a `keras_sparse_moe.ParametricTSNE` fitted on the
    training set (`embedding=ParametricTSNE(...).fit(x).network_`; its
    affinities are global) and keep `tsne_weight` small (e.g. 0.1), or set
    `task_gradient=False` to keep the task from reshaping it.

    Args:
        num_experts: Positive int.
        embedding: Optional Keras layer or model mapping the gate input to
            `(batch, n_components)`. Default: `Flatten`, two ReLU `Dense(256)`
            layers and a linear `Dense(n_components)`.
        n_components: Width of the map (default 2), the default embedding's output.
        perplexity: Effective number of neighbours of the t-SNE loss (float > 0,
            below the batch size − 1).
        dof: Degrees of freedom `α` of the map's Student-t: a float > 0,
            `"auto"` (`max(1, n_components − 1)`) or `"trainable"`.
        tsne_weight: Weight of the t-SNE loss (float >= 0).
        expert_positions: `"kmeans"` (default: positions follow the map by
            online k-means, started at the first batch's points), `"grid"`
            (fixed on a grid in `[-1, 1]²`), `"trainable"` (learned by the task
            loss, from the grid) or an array `(num_experts, n_components)` of
            fixed positions in standardised map units.
        temperature: Positive float; smaller makes each expert's region sharper.
        task_gradient: If False, the task loss does not train the embedding
            (the map is a pure t-SNE map; the gate only reads it).
        momentum: Momentum of the running map statistics and k-means positions.
        seed: Optional int seeding the default embedding.
        **kwargs: Base layer arguments.

    Call arguments:
        inputs: `(batch, ...)` gate input (e.g. the flattened images).
        training: Python bool; adds the t-SNE loss and updates the running statistics.

    Output shape:
        `(batch, num_experts)` gate values.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> gate = keras_sparse_moe.layers.PTSNEGate(4, perplexity=5.0, seed=0)
        >>> g = np.asarray(gate(np.random.rand(32, 12).astype("float32")))
        >>> g.shape, bool(np.allclose(g.sum(axis=1), 1.0, atol=1e-5))
        ((32, 4), True)
        >>> tuple(gate.embed(np.zeros((3, 12), "float32")).shape)
        (3, 2)
    """

    provides = frozenset({"logits", "embedding"})

    def __init__(
        self,
        num_experts,
        embedding=None,
        n_components=2,
        perplexity=30.0,
        dof=1.0,
        tsne_weight=1.0,
        expert_positions="kmeans",
        temperature=0.25,
        task_gradient=True,
        momentum=0.99,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        self.n_components = check_int("n_components", n_components, OWNER)
        self.perplexity = tsne.check_perplexity(perplexity, None, OWNER)
        self.dof = dof
        self._dof_value = check_dof(dof, n_components, OWNER)
        self.tsne_weight = check_float(
            "tsne_weight", tsne_weight, OWNER, "a float >= 0", lambda v: v >= 0
        )
        self._fixed_positions = None
        if isinstance(expert_positions, str):
            if expert_positions not in EXPERT_POSITIONS:
                raise ValueError(
                    f"`{OWNER}` got an unknown `expert_positions`. Expected one of "
                    f"{EXPERT_POSITIONS} or an array of shape (num_experts="
                    f"{self.num_experts}, n_components={n_components}). Received: "
                    f"expert_positions={expert_positions!r}"
                )
        else:
            positions = np.asarray(expert_positions, dtype="float32")
            if positions.shape != (self.num_experts, n_components):
                raise ValueError(
                    f"`{OWNER}` needs one position per expert: an array of shape "
                    f"(num_experts={self.num_experts}, n_components={n_components}). "
                    f"Received: expert_positions of shape {positions.shape}"
                )
            self._fixed_positions = positions
            expert_positions = positions.tolist()
        self.expert_positions = expert_positions
        self.temperature = check_float(
            "temperature", temperature, OWNER, "a float > 0", lambda v: v > 0
        )
        self.task_gradient = bool(task_gradient)
        self.momentum = check_float(
            "momentum", momentum, OWNER, "a float in [0, 1)", lambda v: 0 <= v < 1
        )
        self.seed = check_seed(seed, OWNER)
        if embedding is None:
            init = keras.initializers.GlorotUniform
            embedding = keras.Sequential(
                [
                    keras.layers.Flatten(),
                    keras.layers.Dense(256, "relu", kernel_initializer=init(seed)),
                    keras.layers.Dense(
                        256, "relu", kernel_initializer=init(None if seed is None else seed + 1)
                    ),
                    keras.layers.Dense(
                        n_components, kernel_initializer=init(None if seed is None else seed + 2)
                    ),
                ],
                name="embedding",
            )
        if not isinstance(embedding, keras.layers.Layer):
            raise TypeError(
                f"`{OWNER}` got an invalid `embedding`. Expected a Keras layer or model "
                f"mapping the gate input to (batch, n_components). Received: "
                f"embedding={embedding!r}"
            )
        self.embedding = embedding

    # ------------------------------------------------------------------ #
    def build(self, input_shape):
        if not self.embedding.built:
            self.embedding.build(input_shape)
        out = tuple(self.embedding.compute_output_shape(input_shape))
        if len(out) != 2 or out[-1] != self.n_components:
            raise ValueError(
                f"`{OWNER}`'s embedding must output (batch, n_components={self.n_components})."
                f" Received: output shape={out}"
            )
        mode = "fixed" if self._fixed_positions is not None else self.expert_positions
        start = self._fixed_positions
        if start is None:
            start = grid_positions(self.num_experts, self.n_components)
        if mode == "trainable":
            self.positions = self.add_weight(
                name="expert_positions",
                shape=start.shape,
                initializer=keras.initializers.Constant(start),
                autocast=False,
            )
        else:  # fixed, or k-means running means: updated in training steps
            self.positions = _runtime.add_statistic(
                self, "expert_positions", start.shape, keras.initializers.Constant(start)
            )
        # Running map statistics; 0 in `started` until the first training batch
        # sets them (and the k-means positions).
        self.map_centre = _runtime.add_statistic(self, "map_centre", (self.n_components,))
        self.map_scale = _runtime.add_statistic(self, "map_scale", (), "ones")
        self.started = _runtime.add_statistic(self, "started", ())
        trainable_dof = self.dof == "trainable"
        self.log_dof = self.add_weight(
            name="log_dof",
            shape=(),
            initializer=keras.initializers.Constant(
                0.0 if trainable_dof else math.log(self._dof_value)
            ),
            trainable=trainable_dof,
            autocast=False,
        )
        self.built = True

    @property
    def loss_weights(self):
        # A zero weight leaves the loss out, and with it the per-step bisection.
        return {"tsne_kl": self.tsne_weight} if self.tsne_weight > 0 else {}

    def embed(self, inputs, training=False):
        """The raw map points `y` `(batch, n_components)` of `inputs`."""
        return ops.cast(self.embedding(inputs, training=training), "float32")

    def standardise(self, points):
        """Map points in standardised units (the units of the expert positions)."""
        return (points - self.map_centre) / ops.sqrt(self.map_scale)

    def _update_statistics(self, points):
        """Running map centre and scale, and the k-means positions (training only)."""
        points = ops.stop_gradient(points)
        first = self.started < 0.5
        rate = ops.where(first, 1.0, 1.0 - self.momentum)
        centre = ops.mean(points, axis=0)
        scale = ops.mean(ops.sum(ops.square(points - centre), axis=1)) / self.n_components
        self.map_centre.assign(self.map_centre + rate * (centre - self.map_centre))
        self.map_scale.assign(ops.maximum(self.map_scale + rate * (scale - self.map_scale), 1e-12))
        if self.expert_positions == "kmeans":
            z = self.standardise(points)
            n = ops.shape(z)[0]
            # First batch: start at spread-out points of the batch (every n/E-th).
            picks = ops.minimum(
                ops.arange(self.num_experts, dtype="int32") * (n // self.num_experts), n - 1
            )
            seeded = ops.take(z, picks, axis=0)
            positions = ops.where(first, seeded, self.positions.value)
            nearest = ops.argmin(_sq_distances(z, positions), axis=1)
            member = ops.one_hot(nearest, self.num_experts, dtype="float32")  # (n, E)
            count = ops.sum(member, axis=0)
            means = ops.matmul(ops.transpose(member), z) / ops.maximum(count, 1.0)[:, None]
            step = (1.0 - self.momentum) * ops.cast(count > 0, "float32")[:, None]
            self.positions.assign(positions + step * (means - positions))
        self.started.assign(1.0)

    def route(self, inputs, training=None):
        if training and inputs.shape[0] is not None:
            tsne.check_perplexity(self.perplexity, inputs.shape[0], OWNER)
        points = self.embed(inputs, training=training)
        if training:
            self._update_statistics(points)
        gate_points = points if self.task_gradient else ops.stop_gradient(points)
        z = self.standardise(gate_points)
        logits = -_sq_distances(z, ops.cast(self.positions, "float32")) / self.temperature
        losses = None
        if training and self.loss_weights:
            p = tsne.joint_affinities(inputs, self.perplexity)
            losses = {"tsne_kl": tsne.tsne_kl(p, points, dof=ops.exp(self.log_dof))}
        return Routing(ops.softmax(logits, axis=-1), logits=logits, embedding=points, losses=losses)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    @property
    def dof_value(self) -> float:
        """The degrees of freedom in use (learned with `dof="trainable"`)."""
        return float(np.exp(ops.convert_to_numpy(self.log_dof)))

    def get_config(self):
        return {
            **super().get_config(),
            "embedding": keras.saving.serialize_keras_object(self.embedding),
            "n_components": self.n_components,
            "perplexity": self.perplexity,
            "dof": self.dof,
            "tsne_weight": self.tsne_weight,
            "expert_positions": self.expert_positions,
            "temperature": self.temperature,
            "task_gradient": self.task_gradient,
            "momentum": self.momentum,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = read_config(config, cls.__name__)
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)


def _sq_distances(a, b):
    """`(n, m)` squared distances between the rows of `a` and `b` (small widths: direct)."""
    return ops.sum(ops.square(ops.expand_dims(a, 1) - ops.expand_dims(b, 0)), axis=-1)
