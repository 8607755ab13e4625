"""`SparseExpertMixture`: experts that are sparse sub-networks, mixed by a gate."""

from __future__ import annotations

import keras
import numpy as np
from keras import activations, initializers, ops

from keras_sparse_moe import _runtime, losses, validation
from keras_sparse_moe.layers import gates as gates_lib
from keras_sparse_moe.layers.experts import LayerExperts, SparseExperts
from keras_sparse_moe.layers.storage import DEFAULT_STORAGE
from keras_sparse_moe.ops import dispatch as dispatch_ops
from keras_sparse_moe.saving import VersionedConfig, read_config

__all__ = [
    "BALANCE_LOSSES",
    "BALANCE_PRESETS",
    "DISPATCH_MODES",
    "ROUTING_MODES",
    "SparseExpertMixture",
]

OWNER = "SparseExpertMixture"
DISPATCH_MODES = ("auto", "all")
ROUTING_MODES = ("token_choice", "expert_choice")


def _selected(routing, index, num_experts):
    """`(tokens, E)` 0/1: the experts each token is sent to (argmax without top-k)."""
    if index is None:
        index = ops.expand_dims(ops.argmax(routing.gates, axis=-1), -1)
    return ops.sum(ops.one_hot(index, num_experts, dtype="float32"), axis=1)


# name -> (function of (Routing, top-k index, num_experts, token mask or None), the
# Routing field it needs)
BALANCE_LOSSES = {
    "batch_entropy": (lambda r, i, e, m: losses.batch_entropy(r.gates, m), None),
    "sample_entropy": (lambda r, i, e, m: losses.sample_entropy(r.gates, m), None),
    "batch_variance": (lambda r, i, e, m: losses.batch_variance(r.gates, m), None),
    "sample_variance": (lambda r, i, e, m: losses.sample_variance(r.gates, m), None),
    "importance_cv2": (lambda r, i, e, m: losses.importance_cv2(r.gates, m), None),
    "load_cv2": (lambda r, i, e, m: losses.load_cv2(_load(r, m)), "load"),
    "switch_load_balancing": (
        lambda r, i, e, m: losses.switch_load_balancing(
            r.gates, _selected(r, i, e), alpha=1.0, mask=m
        ),
        None,
    ),
    "router_z_loss": (lambda r, i, e, m: losses.router_z_loss(r.logits, m), "logits"),
}


def _load(routing, mask):
    """The gate's smooth load, of the tokens `mask` keeps (None: all)."""
    if mask is None:
        return routing.load
    keep = ops.expand_dims(ops.cast(mask, "float32"), -1)
    return ops.sum(routing.token_load * keep, axis=0)


# entropy, variance: L = 0.1 * batch term + 0.01 * sample term. Switch: alpha = 0.01, z-loss 1e-3.
BALANCE_PRESETS = {
    "entropy": {"batch_entropy": 0.1, "sample_entropy": 0.01},
    "variance": {"batch_variance": 0.1, "sample_variance": 0.01},
    "switch": {"switch_load_balancing": 0.01, "router_z_loss": 1e-3},
}


def _check_expert_choice(gate, top_k):
    if gate.top_k is not None:
        raise ValueError(
            f"`{OWNER}`: with routing='expert_choice' the experts pick their tokens, and "
            f"`{type(gate).__name__}` already picks top_k={gate.top_k} experts per token. "
            "Use a gate that scores every expert (`SoftmaxGate`, `PTSNEGate`)."
        )
    if top_k is None:
        raise ValueError(
            f"`{OWNER}`: routing='expert_choice' needs `top_k`, the mean number of experts "
            "per token (each expert takes `ceil(capacity_factor * top_k * tokens / "
            "num_experts)` tokens). Received: top_k=None"
        )


def _check_same_batch(inputs_shape, gate_inputs_shape):
    """Static shapes only (no in-graph assert): one gate input per sample."""
    if gate_inputs_shape is None or not len(gate_inputs_shape):
        return
    batch, gate_batch = inputs_shape[0], gate_inputs_shape[0]
    if batch is not None and gate_batch is not None and batch != gate_batch:
        raise ValueError(
            f"`{OWNER}` needs one `gate_inputs` row per sample of `inputs`. Received: "
            f"inputs of shape {tuple(inputs_shape)}, gate_inputs of shape "
            f"{tuple(gate_inputs_shape)}"
        )


def _check_balance_losses(balance_losses, gate):
    if balance_losses is None:
        return {}
    if isinstance(balance_losses, str):
        if balance_losses not in BALANCE_PRESETS:
            raise ValueError(
                f"`{OWNER}` got an unknown `balance_losses` preset. Expected one of "
                f"{sorted(BALANCE_PRESETS)} or a dict {{loss name: weight}}. Received: "
                f"balance_losses={balance_losses!r}"
            )
        return dict(BALANCE_PRESETS[balance_losses])
    if not isinstance(balance_losses, dict):
        raise TypeError(
            f"`{OWNER}` got an invalid `balance_losses`. Expected None, a preset name "
            f"or a dict {{loss name: weight}}. Received: balance_losses={balance_losses!r}"
        )
    checked = {}
    for name, weight in balance_losses.items():
        if name not in BALANCE_LOSSES:
            raise ValueError(
                f"`{OWNER}` got an unknown balance loss {name!r}. Expected names from "
                f"{sorted(BALANCE_LOSSES)}. Received: balance_losses={balance_losses!r}"
            )
        validation.check_float(name, weight, OWNER, "a balance-loss weight >= 0", lambda w: w >= 0)
        needs = BALANCE_LOSSES[name][1]
        if needs and needs not in gate.provides:
            raise ValueError(
                f"`{OWNER}`: balance loss {name!r} needs router {needs}, which "
                f"`{type(gate).__name__}` does not provide (`NoisyTopKGate` provides a "
                "load; `SoftmaxGate` and `NoisyTopKGate` provide logits)."
            )
        checked[name] = float(weight)
    return checked


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SparseExpertMixture(VersionedConfig, keras.layers.Layer):
    """A mixture of experts whose experts are sparse sub-networks, mixed by a gate.

    Output `y(x) = sum_e G_e(x) * expert_e(x)`, where `G` is the gate's output.
    With `top_k`, each token keeps only its `top_k` largest gate values
    (renormalised to sum to one, unless `normalize_top_k=False`) and only
    those experts contribute.

    **Built-in experts** (`num_experts=E`): expert `e` is a one-hidden-layer
    sparse network `input -> expert_units -> units`; both layers are
    `SparseDense` layers whose connections are drawn at random at start
    (StochasticNet-style, `expert_density`), stored for all experts together
    in the bank `mixture.expert_bank` (`keras_sparse_moe.layers.experts.
    SparseExperts`; `expert_hidden`: `input_dim x E*expert_units`,
    `expert_output`: `expert_units x E*units`), so the dynamic-sparse-training
    callbacks (SET, RigL, pruning) evolve them like any `SparseDense`. With
    `route_density > 0` a third `SparseDense`, `expert_routes`, adds sparse routes from each
    expert's hidden units to the other experts' hidden units (a
    `small_world(..., rewire=1)` mask: only links between experts), so hidden
    unit `j` of expert `f` becomes `h_f[j] + sum_e h_e @ R[e -> f]`. Together
    the experts and routes form a clustered small-world topology. A route from
    an expert the gate did not select carries nothing. With `top_k` they are
    computed only between the experts a token visited: `k * (k - 1)` tiles of
    `expert_units^2` a token. Without `top_k` (or with `dispatch="all"`, or in
    the capacity dispatch) the masked routes cost a dense `(E*expert_units)^2`
    matmul per token. Routes kept by tile (`route_implementation="tiles"`, the
    default for large route matrices) store only their connections, and a
    token reads only the tiles between the experts it visited (`k * (k - 1)`
    tiles' connections), in the grouped and the capacity dispatch.

    **User experts** (`experts=[...]`): any Keras layers or models with equal
    output shapes, e.g. small CNNs.

    **What is mixed.** The output is `sum_e G_e(x) * expert_e(x)`, whatever
    the experts return. For a classifier, mix logits and apply
    one softmax, `softmax(sum_e G_e * NN_e(x))`: give the experts linear
    outputs and put `keras.layers.Softmax()` after the mixture (the built-in
    experts' output is linear). Experts ending in a softmax instead mix
    probabilities: a mixture of the experts' distributions.

    **Dispatch.** With `top_k`, each token goes to its `top_k` experts and
    each expert computes exactly the tokens sent to it: the (token, choice)
    pairs are sorted by expert into blocks of rows, each block is one matmul
    with its expert's weights, and the outputs are combined with the gate
    weights (`keras_sparse_moe.ops.dispatch.group_plan`). Nothing is dropped,
    shapes stay static (at most `tokens * top_k + E * (block - 1)` rows), so
    it compiles under XLA, the expert work grows with `top_k / E`, and a
    token's output never depends on the other tokens of its batch. This is
    the path at inference (`predict`, `evaluate`, exported models) and in
    training. With `capacity_factor`, training instead sends tokens to
    fixed-size expert buffers of `ceil(capacity_factor * top_k * tokens / E)`
    slots (`dispatch_plan`): assignments beyond capacity are dropped and
    counted in `overflow_counts`; when capacity suffices both paths give the
    same output. With `implementation="sparse"` the grouped path scatters
    the stored connections into dense expert kernels at each call (kernels up
    to `DENSE_LIMIT` entries), so it computes like masked storage while
    storing only the connections; it is taken where that costs less than
    multiplying every token by every connection (`densify_pays`: e.g. from
    60 tokens at 5 % density). Without `top_k` or with user `experts`,
    every expert computes every token and the unselected ones are weighted by
    zero (`dispatch_path()` says which path a call takes).

    **Expert choice** (`routing="expert_choice"`, Zhou et al., 2022): the
    experts pick their tokens instead. Expert `e` takes the
    `ceil(capacity_factor * top_k * tokens / E)` tokens of the batch with the
    highest gate values `G_e` (`capacity_factor` defaults to 1), so `top_k` is
    the mean number of experts per token and every expert computes exactly
    as many tokens (balanced by construction); a token may get no expert, one,
    or several, each weighted by its gate value. Training and inference
    choose alike, so a token's output depends on the rest of its batch.

    **Shared experts** (`num_shared_experts`, DeepSeekMoE): built-in experts
    every token visits, their outputs added with weight one beside the routed
    experts' mix; `shared_expert_density=1.0` makes them dense. The bank is
    `mixture.shared_bank`, sparse like the routed one (the callbacks evolve it).
    User layers go in `shared_experts=[...]`.

    **Bias balancing** (`selection_bias=True`, DeepSeek-V3): each token's
    `top_k` experts are chosen by `G + b`, `b` a per-expert bias
    (`mixture.expert_bias`), and weighted by `G` alone. The callback
    `keras_sparse_moe.callbacks.BiasBalancing` moves `b` against each
    expert's observed load between training steps: balance with no loss term.

    **Sequences and padding.** Inputs of rank 3 or more (`(batch, time, d)`)
    route every token, as keras-hub's MoE layers do. A Keras mask
    (`Embedding(mask_zero=True)`, `Masking`; Keras passes it as `mask`, or
    `inputs_mask` beside `gate_inputs`) keeps padded tokens out of the
    routing: they take no expert capacity (capacity and expert choice count
    the real tokens only), no expert picks them, and they are left out of the
    balancing losses, the expert load and `gate_values(..., mask=...)`. Their
    outputs are zero and the mask passes on to the next layer, so padding
    changes nothing about the real tokens. (A gate's own loss, `PTSNEGate`'s
    t-SNE loss, still sees every token.)

    **Balancing losses.** `balance_losses` names losses of
    `keras_sparse_moe.losses` with weights; in training each weighted loss, and
    each of the gate's own losses (`gate.loss_weights`, e.g. `PTSNEGate`'s
    t-SNE loss), is added with `add_loss`, and their running sums (with the
    dispatch overflow and, with `top_k`, each expert's count of assignments,
    `expert_load`) are kept in non-trainable variables that
    `keras_sparse_moe.callbacks.ActivationRateLogger` reports per epoch into
    `logs` (progress bar, `History`, TensorBoard). Router math is float32
    under mixed precision.

    Args:
        units: Output width of the built-in experts. With `experts`, optional
            (it is their output width; a given value must match).
        num_experts: Number of built-in experts (give this or `experts`).
        experts: List of Keras layers to use as experts (instead of `num_experts`).
        expert_units: Hidden units per built-in expert (default: `units`).
        expert_density: Connection density of the built-in experts' layers,
            in (0, 1] (default 0.1).
        route_density: Density of the routes between built-in experts (fraction
            of the possible links between different experts' hidden units),
            in [0, 1) (default 0: no routes).
        expert_activation: Activation of the built-in experts' hidden layer.
        gate: A `keras_sparse_moe.layers.Gate` (`SoftmaxGate`, `NoisyTopKGate`,
            `OracleGate`, ...), or `"softmax"` / None for a softmax gate over a
            `Dense` layer.
        top_k: Experts per token, in `[1, num_experts]`; default: the gate's own
            `k` (`NoisyTopKGate`) or None (every expert).
        capacity_factor: Positive float; with `top_k`, training uses the
            capacity dispatch with this slack (1.0 = exactly the average load).
        normalize_top_k: With `top_k`, whether the selected experts' gate
            values are renormalised to sum to one (default True, as GShard and
            Mixtral) or mix as they are (False, as Switch: a token's output
            is scaled by its router probability).
        router_jitter: Float in `[0, 1)`: in training, the gate reads its input
            multiplied by noise uniform in `[1 - jitter, 1 + jitter]`
            (Switch's and Mixtral's router jitter; the experts read the input
            as it is). Default 0: none.
        dispatch: `"auto"` (default: with `top_k`, each expert computes only
            its tokens) or `"all"` (every expert computes every token and the
            unselected ones are weighted by zero: the same output, the
            baseline of `benchmarks/bench_moe_vs_dense.py`).
        balance_losses: Dict `{loss name: weight}` with names from
            `BALANCE_LOSSES` (`"batch_entropy"`, `"sample_entropy"`,
            `"batch_variance"`, `"sample_variance"`, `"importance_cv2"`,
            `"load_cv2"`, `"switch_load_balancing"`, `"router_z_loss"`), or a
            preset: `"entropy"` (0.1 * batch + 0.01 * sample entropy),
            `"variance"` (the same with variances), `"switch"`.
        use_bias: Whether the built-in experts' layers use biases.
        kernel_initializer: Initializer of the built-in experts' kernels; the
            default He-uniform scales by fan-in, which is each expert's own.
        implementation: Storage of the built-in experts' `SparseDense` layers:
            `"masked"` or `"sparse"` (only the connections: stored weights grow
            with them, not with `input_dim * experts * width`; the all-experts
            and capacity paths also compute only them, while the grouped path
            densifies the kernels at each call); None (the default) is
            `"masked"`. User `experts` take none.
        route_implementation: Storage of the routes (`expert_routes`):
            `"masked"`, `"sparse"` or `"tiles"` (only the connections, kept
            by `(expert_units, expert_units)` tile: with `top_k` each token
            reads only the tiles between the experts it visits, so routes
            cost O(connections) in memory and time). None (the default):
            `"tiles"` with `implementation="sparse"` or when the route
            matrix `(E * expert_units)^2` has more than 4,194,304 entries
            (`validation.ROUTE_TILES_ABOVE`), else `implementation`.
        seed: Optional int making the built-in experts' topology reproducible.
        num_shared_experts: Int >= 0 (default 0): built-in experts, shaped like
            the routed ones, that every token visits (built-in experts only).
        shared_expert_density: Connection density of the shared experts, in
            (0, 1] (default: `expert_density`; 1.0: dense).
        shared_experts: List of Keras layers every token visits (instead of
            `num_shared_experts`), with the routed experts' output shape.
        routing: `"token_choice"` (default: each token picks its `top_k`
            experts) or `"expert_choice"` (each expert picks its tokens; needs
            `top_k` and a gate that scores every expert).
        selection_bias: Bool (default False): choose the `top_k` experts by
            the gates plus a per-expert bias set by the `BiasBalancing`
            callback (needs `top_k`, token choice).
        **kwargs: Base layer arguments.

    Call arguments:
        inputs: The experts' input. Built-in experts: `(..., input_dim)`, every
            position a token. User experts: `(batch, ...)`, every sample a token.
        gate_inputs: Optional separate gate input (`OracleGate` needs the
            expert index here). Default: the gate reads `inputs`.
        training: Python bool; enables gate noise and the balancing losses.
        mask: Optional boolean of the inputs' leading axes (`(batch, time)`):
            the real tokens; Keras passes it from `Embedding(mask_zero=True)`
            or `Masking` (as `inputs_mask` when `gate_inputs` is given too).

    Output shape:
        Built-in experts: `(..., units)`. User experts: their output shape.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> moe = keras_sparse_moe.layers.SparseExpertMixture(
        ...     units=8, num_experts=4, expert_units=16, expert_density=0.25,
        ...     top_k=2, capacity_factor=2.0, seed=0)
        >>> tuple(moe(np.ones((5, 12), dtype="float32")).shape)
        (5, 8)

        Sequences padded with zeros: the padding routes nowhere.

        >>> import keras
        >>> tokens = keras.Input((None,), dtype="int32")
        >>> hidden = keras.layers.Embedding(100, 12, mask_zero=True)(tokens)
        >>> model = keras.Model(tokens, moe(hidden))
        >>> y = model(np.array([[5, 7, 0, 0], [3, 0, 0, 0]]))
        >>> float(np.abs(y[0, 2:]).sum()), float(np.abs(y[1, 1:]).sum())
        (0.0, 0.0)
    """

    def __init__(
        self,
        units=None,
        num_experts=None,
        experts=None,
        expert_units=None,
        expert_density=None,
        route_density=None,
        expert_activation="relu",
        gate=None,
        top_k=None,
        capacity_factor=None,
        balance_losses=None,
        use_bias=True,
        kernel_initializer="he_uniform",
        seed=None,
        implementation=None,
        route_implementation=None,
        dispatch="auto",
        normalize_top_k=True,
        router_jitter=0.0,
        num_shared_experts=0,
        shared_expert_density=None,
        shared_experts=None,
        routing="token_choice",
        selection_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True  # a sequence's padding mask passes through
        self.seed = validation.check_seed(seed, OWNER)
        bank = validation.check_expert_bank(
            OWNER,
            units=units,
            num_experts=num_experts,
            experts=experts,
            expert_units=expert_units,
            expert_density=expert_density,
            route_density=route_density,
            implementation=implementation,
            route_implementation=route_implementation,
        )
        units, num_experts = bank["units"], bank["num_experts"]
        self.implementation = bank.get("implementation")  # None for user experts
        self.route_implementation = bank.get("route_implementation")
        self.units = units
        self.num_experts = num_experts
        self.expert_units = expert_units
        self.expert_density = expert_density
        self.route_density = route_density
        self.expert_activation = activations.get(expert_activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.gate = gates_lib.get(gate, num_experts, OWNER)

        self.top_k, self.capacity_factor = validation.check_routing(
            OWNER,
            top_k=top_k,
            gate_top_k=self.gate.top_k,
            num_experts=num_experts,
            capacity_factor=capacity_factor,
        )
        self.routing = validation.check_choice("routing", routing, OWNER, ROUTING_MODES)
        if self.routing == "expert_choice":
            _check_expert_choice(self.gate, self.top_k)
        self.selection_bias = validation.check_bool("selection_bias", selection_bias, OWNER)
        if self.selection_bias and (self.top_k is None or self.routing == "expert_choice"):
            raise ValueError(
                f"`{OWNER}`: `selection_bias` biases each token's choice of its `top_k` "
                "experts, so it needs `top_k` and routing='token_choice'. Received: "
                f"top_k={self.top_k}, routing={self.routing!r}"
            )
        self.dispatch = validation.check_choice("dispatch", dispatch, OWNER, DISPATCH_MODES)
        self.normalize_top_k = validation.check_bool("normalize_top_k", normalize_top_k, OWNER)
        self.router_jitter = validation.check_float(
            "router_jitter", router_jitter, OWNER, "a float in [0, 1)", lambda j: 0 <= j < 1
        )
        if self.router_jitter > 0 and self.gate.requires_gate_inputs:
            raise ValueError(
                f"`{OWNER}`: `{type(self.gate).__name__}` routes by a separate input (an "
                "index), which `router_jitter` cannot scale. Received: "
                f"router_jitter={self.router_jitter}"
            )
        # Only a jittering mixture holds a generator (a variable): others save as before.
        self.jitter_seed_generator = (
            keras.random.SeedGenerator(self.seed) if self.router_jitter > 0 else None
        )
        self.balance_losses = balance_losses
        self.balance_weights = _check_balance_losses(balance_losses, self.gate)

        self.loss_names = [*self.balance_weights, *self.gate.loss_weights]
        if experts is None:
            self.expert_bank = SparseExperts(
                num_experts,
                units,
                hidden_units=bank["expert_units"],
                density=bank["expert_density"],
                route_density=bank["route_density"],
                activation=self.expert_activation,
                use_bias=self.use_bias,
                kernel_initializer=self.kernel_initializer,
                seed=self.seed,
                implementation=self.implementation,
                route_implementation=self.route_implementation,
                dtype=self.dtype_policy,
                name="experts",
            )
        else:
            self.expert_bank = LayerExperts(experts, units, name="experts")
        self.num_shared_experts = validation.check_int(
            "num_shared_experts", num_shared_experts, OWNER, minimum=0
        )
        self.shared_expert_density = shared_expert_density
        self.shared_bank = self._shared_bank(experts, shared_experts, bank)

    def _shared_bank(self, experts, shared_experts, bank):
        """The experts every token visits (DeepSeekMoE's shared experts), or None:
        `num_shared_experts` built-in ones beside built-in routed experts, or user
        layers (`shared_experts`)."""
        count, density = self.num_shared_experts, self.shared_expert_density
        if shared_experts is not None:
            if count or density is not None:
                raise ValueError(
                    f"`{OWNER}` takes either `num_shared_experts` (built-in, with "
                    "`shared_expert_density`) or `shared_experts` (a list of layers). "
                    f"Received: num_shared_experts={count}, shared_expert_density="
                    f"{density!r} and shared_experts"
                )
            bad = not isinstance(shared_experts, (list, tuple)) or not shared_experts
            if bad or not all(isinstance(e, keras.layers.Layer) for e in shared_experts):
                raise TypeError(
                    f"`{OWNER}` got an invalid `shared_experts`. Expected a non-empty list "
                    f"of Keras layers. Received: shared_experts={shared_experts!r}"
                )
            return LayerExperts(shared_experts, self.units, name="shared_experts")
        if not count and density is None:
            return None
        if experts is not None or not count:
            raise ValueError(
                f"`{OWNER}`: `num_shared_experts` (and `shared_expert_density`) make built-in "
                "shared experts, beside built-in routed experts (`num_experts`); user layers "
                "go in `shared_experts`. Received: "
                f"num_shared_experts={count}, shared_expert_density={density!r}, "
                f"experts={'None' if experts is None else 'a list'}"
            )
        density = bank["expert_density"] if density is None else density
        return SparseExperts(
            count,
            self.units,
            hidden_units=bank["expert_units"],
            density=validation.check_density(density, OWNER, "shared_expert_density"),
            route_density=0.0,
            activation=self.expert_activation,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            seed=None if self.seed is None else self.seed + 3,
            implementation=self.implementation,
            dtype=self.dtype_policy,
            name="shared_experts",
        )

    # ------------------------------------------------------------------ #
    def build(self, inputs_shape, gate_inputs_shape=None):
        if self.gate.requires_gate_inputs and gate_inputs_shape is None:
            raise ValueError(
                f"`{OWNER}`: `{type(self.gate).__name__}` routes by a separate input. "
                "Call the mixture as `mixture(x, gate_inputs=expert_index)`."
            )
        if len(inputs_shape) < 2:
            raise ValueError(
                f"`{OWNER}` needs inputs of rank >= 2 (batch, ..., features). "
                f"Received: inputs_shape={tuple(inputs_shape)}"
            )
        _check_same_batch(inputs_shape, gate_inputs_shape)
        self.expert_bank.build(inputs_shape)
        if self.shared_bank is not None:
            token_shape = self.expert_bank.token_shape
            self.shared_bank.build(token_shape)
            shapes = [
                bank.output_shape(token_shape) for bank in (self.expert_bank, self.shared_bank)
            ]
            if shapes[0] != shapes[1]:
                raise ValueError(
                    f"`{OWNER}` adds the shared experts' output to the routed experts', so "
                    f"their shapes must agree. Received: routed {shapes[0]}, shared {shapes[1]}"
                )
        token_shape = self.expert_bank.token_shape
        if not self.gate.built:
            self.gate.build(gate_inputs_shape if gate_inputs_shape is not None else token_shape)
        # Running sums, updated in training steps: kept like metric state.
        if self.loss_names:
            self.loss_sums = _runtime.add_statistic(
                self, "balance_loss_sums", (len(self.loss_names),)
            )
            self.loss_steps = _runtime.add_statistic(self, "balance_loss_steps", ())
        if self.selection_bias:
            # Added to the gates for the choice of experts only; `BiasBalancing` sets it.
            self.expert_bias = self.add_weight(
                shape=(self.num_experts,),
                initializer="zeros",
                trainable=False,
                autocast=False,
                name="expert_bias",
            )
        if self.capacity_factor is not None and self.routing == "token_choice":
            # [dropped assignments, all assignments] seen in training.
            self.overflow_counts = _runtime.add_statistic(self, "overflow_counts", (2,))
        if self.counts_load:
            # (token, choice) assignments each expert received in training. Created
            # last: files saved before it existed load with it at zero.
            self.expert_load = _runtime.add_statistic(self, "expert_load", (self.num_experts,))
        self.built = True

    @property
    def counts_load(self) -> bool:
        """True when training counts each expert's assignments (`expert_load`):
        token-choice routing with `top_k`."""
        return self.top_k is not None and self.routing == "token_choice"

    def load_own_variables(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        if self.counts_load and len(store.keys()) == len(own) - 1:
            # Saved before top-k mixtures counted their experts' load: that count starts at zero.
            for i, variable in enumerate(own[:-1]):
                variable.assign(store[f"{i}"])
            return
        super().load_own_variables(store)

    # ------------------------------------------------------------------ #
    def _route(self, tokens, gate_inputs, training):
        """Gate routing, plus the top-k `(weights, index)` (index None without top-k)."""
        source = tokens if gate_inputs is None else gate_inputs
        if training and self.jitter_seed_generator is not None:
            jitter = self.router_jitter
            noise = keras.random.uniform(
                ops.shape(source), 1.0 - jitter, 1.0 + jitter, seed=self.jitter_seed_generator
            )
            source = ops.multiply(source, ops.cast(noise, source.dtype))
        routing = self.gate.route(source, training=training)
        if self.top_k is None or self.routing == "expert_choice":
            return routing, routing.gates, None
        scores = None
        if self.selection_bias:
            scores = routing.gates + ops.cast(self.expert_bias, routing.gates.dtype)
        weights, index = dispatch_ops.top_k_weights(
            routing.gates, self.top_k, normalize=self.normalize_top_k, scores=scores
        )
        return routing, weights, index

    def _expert_choice(self, gates, valid=None):
        """`(values, token_of_slot)`, `(E, capacity)`: each expert's chosen tokens."""
        return dispatch_ops.expert_choice(
            gates, self.top_k, self.capacity_factor or 1.0, valid=valid
        )

    def _num_tokens(self, tokens):
        n = tokens.shape[0]
        return n if isinstance(n, (int, np.integer)) else ops.shape(tokens)[0]

    def _dense_weights(self, weights, index):
        if index is None:
            return weights
        chosen = ops.one_hot(index, self.num_experts, dtype="float32")
        return ops.sum(chosen * ops.expand_dims(weights, -1), axis=1)

    def gate_values(self, inputs, gate_inputs=None, mask=None):
        """The `(tokens, num_experts)` mixing weights for `inputs` (inference mode).

        Without `top_k` these are the gate's values; with `top_k`, the selected
        experts' values (renormalised, unless `normalize_top_k=False`) and
        zeros elsewhere. With `mask` (a Keras mask of the inputs' leading
        axes) only the tokens it keeps are returned: `(kept tokens, E)`.
        """
        routing, weights, index = self._inference_route(inputs, gate_inputs)
        valid = self._token_mask(ops.convert_to_tensor(inputs), mask)
        if self.routing == "expert_choice":
            chosen = self._expert_choice(routing.gates, valid)
            values = dispatch_ops.expert_choice_weights(*chosen, self._num_tokens(routing.gates))
        else:
            values = self._dense_weights(weights, index)
        if valid is None:
            return values
        keep = np.flatnonzero(np.asarray(ops.convert_to_numpy(valid)))
        return ops.take(values, keep, axis=0)

    def gate_embedding(self, inputs, gate_inputs=None):
        """The gate's `(tokens, d)` embedding of `inputs` (inference mode), e.g.
        `PTSNEGate`'s 2-D map; None for gates without one."""
        return self._inference_route(inputs, gate_inputs)[0].embedding

    def _inference_route(self, inputs, gate_inputs):
        inputs = ops.convert_to_tensor(inputs)
        if gate_inputs is not None:
            gate_inputs = ops.convert_to_tensor(gate_inputs)
        if not self.built:
            self.build(
                tuple(inputs.shape), None if gate_inputs is None else tuple(gate_inputs.shape)
            )
        return self._route(self.expert_bank.tokens(inputs), gate_inputs, training=False)

    # ------------------------------------------------------------------ #
    def call(self, inputs, gate_inputs=None, training=None, mask=None, inputs_mask=None):
        if gate_inputs is not None:
            _check_same_batch(inputs.shape, gate_inputs.shape)
        bank = self.expert_bank
        tokens = bank.tokens(inputs)
        valid = self._token_mask(inputs, mask if mask is not None else inputs_mask)
        routing, weights, index = self._route(tokens, gate_inputs, training)
        if valid is not None:  # padding mixes nothing (and counts nowhere below)
            weights = ops.where(ops.expand_dims(valid, -1), weights, ops.zeros_like(weights))
        path = self.dispatch_path(training, tokens.shape[0])
        if self.routing == "expert_choice":
            outputs = self._expert_choice_outputs(tokens, routing.gates, path, training, valid)
        elif path == "grouped":
            plan = dispatch_ops.group_plan(
                index,
                self.num_experts,
                bank.group_block(tokens.shape[0], self.top_k),
            )
            rows = bank.on_groups(tokens, plan, index, training)
            outputs = dispatch_ops.combine_rows(rows, plan, weights)
        elif path == "capacity":
            outputs, kept = self._dispatched(tokens, weights, index, training, valid)
            real = ops.ones_like(kept) if valid is None else ops.expand_dims(valid, -1)
            real = ops.cast(ops.broadcast_to(real, ops.shape(kept)), "float32")
            dropped = ops.sum(real * (1.0 - ops.cast(kept, "float32")))
            self.overflow_counts.assign_add(ops.stack([dropped, ops.sum(real)]))
        else:
            # Which experts a token selected matters only to the routes.
            active = None
            if bank.has_routes and index is not None:
                active = self._dense_weights(ops.ones_like(weights), index)
            outputs = bank.mix(tokens, self._dense_weights(weights, index), active, training)
        if self.shared_bank is not None:
            every = ops.ones((self._num_tokens(tokens), self.shared_bank.num_experts), "float32")
            outputs = outputs + self.shared_bank.mix(tokens, every, None, training)
        if valid is not None:
            outputs = ops.where(ops.expand_dims(valid, -1), outputs, ops.zeros_like(outputs))
        if training and self.counts_load:
            chosen = ops.one_hot(index, self.num_experts, dtype="float32")
            if valid is not None:
                chosen = chosen * ops.reshape(ops.cast(valid, "float32"), (-1, 1, 1))
            self.expert_load.assign_add(ops.sum(chosen, axis=(0, 1)))
        if training and self.loss_names:
            self._add_losses(routing, index, valid)
        return bank.outputs(outputs, inputs)

    def _token_mask(self, inputs, mask):
        """The `(tokens,)` bool of the tokens that count, from a Keras mask of the
        inputs' leading axes (None: every token counts)."""
        if mask is None:
            return None
        rank = len(inputs.shape)
        if len(mask.shape) != rank - 1 or not isinstance(self.expert_bank, SparseExperts):
            raise ValueError(
                f"`{OWNER}` takes a mask over the leading axes of inputs of rank >= 2 (one flag "
                "a token), for its built-in experts (user `experts` take whole samples). "
                f"Received: inputs of shape {tuple(inputs.shape)}, mask of shape "
                f"{tuple(mask.shape)}"
            )
        return ops.reshape(ops.cast(mask, "bool"), (-1,))

    def _expert_choice_outputs(self, tokens, gates, path, training, valid=None):
        """Expert-choice routing: each expert computes the tokens it picked (path
        `"expert_choice"`), or every expert every token, weighted by the picks."""
        bank, num_tokens = self.expert_bank, self._num_tokens(tokens)
        values, token_of_slot = self._expert_choice(gates, valid)
        if path == "all":
            weights = dispatch_ops.expert_choice_weights(values, token_of_slot, num_tokens)
            active = ops.cast(weights > 0, "float32") if bank.has_routes else None
            return bank.mix(tokens, weights, active, training)
        slots = ops.take(tokens, ops.reshape(token_of_slot, (-1,)), axis=0)
        slots = ops.reshape(slots, (self.num_experts, -1) + tuple(slots.shape[1:]))
        outs = bank.on_slots(slots, None, None, training)
        return dispatch_ops.combine_expert_choice(outs, values, token_of_slot, num_tokens)

    def dispatch_path(self, training=False, num_tokens=None) -> str:
        """How a call computes the experts: `"grouped"` (with `top_k`, each
        expert computes exactly its tokens' rows: dropless), `"capacity"` (in
        training with `capacity_factor`: fixed-size expert buffers) or `"all"`
        (every expert on every token: no `top_k`, `dispatch="all"`, user
        experts, or sparse storage of kernels too big to densify).

        `num_tokens` is the token count as traced. On JAX a symbolic one (an
        export with a free batch size) also gives `"all"`: jax2onnx cannot
        sort a symbolic number of assignments. The outputs are the same (an
        unselected expert has weight zero); the exported model computes every
        expert. TensorFlow exports keep the grouped path, except with sparse
        storage: its grouped path scatters the connections into dense kernels,
        which the converters would fold into dense constants (the exported
        file would no longer grow by 8 bytes a connection).
        """
        if self.routing == "expert_choice":
            # Routes need every visited expert's hidden state: the all-experts path.
            plain = self.dispatch == "auto" and not self.expert_bank.has_routes
            return "expert_choice" if plain else "all"
        if self.top_k is None or self.dispatch == "all":
            return "all"
        if training and self.capacity_factor is not None:
            return "capacity"
        symbolic = num_tokens is not None and not isinstance(num_tokens, (int, np.integer))
        if symbolic and (
            keras.backend.backend() == "jax" or not getattr(self.expert_bank, "stores_dense", True)
        ):
            return "all"
        bank = self.expert_bank
        return "grouped" if bank.groups and bank.densify_pays(num_tokens) else "all"

    def _add_losses(self, routing, index, valid=None):
        """Every weighted loss, the balancing ones and the gate's own, in one place."""
        weights = {**self.balance_weights, **self.gate.loss_weights}
        values = []
        for name in self.loss_names:
            if name in self.balance_weights:
                value = BALANCE_LOSSES[name][0](routing, index, self.num_experts, valid)
            else:
                value = routing.losses[name]
            self.add_loss(weights[name] * value)
            values.append(ops.cast(value, "float32"))
        self.loss_sums.assign_add(ops.stack(values))
        self.loss_steps.assign_add(1.0)

    def _dispatched(self, tokens, weights, index, training, valid=None):
        """Capacity dispatch: each expert computes only its slots. Padding (not
        `valid`) takes none, and the capacity is that of the real tokens."""
        e = self.num_experts
        capacity = dispatch_ops.expert_capacity(
            ops.shape(tokens)[0], e, self.top_k, self.capacity_factor
        )
        limit = None
        if valid is not None:
            real = ops.sum(ops.cast(valid, "int32"))
            limit = dispatch_ops.expert_capacity(real, e, self.top_k, self.capacity_factor)
        plan = dispatch_ops.dispatch_plan(index, e, capacity, valid=valid, limit=limit)
        slots = dispatch_ops.gather_slots(tokens, plan)
        slots = ops.reshape(slots, (e, -1) + tuple(slots.shape[1:]))
        outs = self.expert_bank.on_slots(slots, plan, index, training)
        outs = ops.reshape(outs, (-1,) + tuple(outs.shape[2:]))
        return dispatch_ops.combine(outs, plan, weights), plan.kept

    # ------------------------------------------------------------------ #
    def compute_output_shape(self, inputs_shape, gate_inputs_shape=None):
        return self.expert_bank.output_shape(inputs_shape)

    @property
    def balance_loss_means(self) -> dict:
        """Mean of each loss (unweighted: the balancing losses, then the gate's own,
        e.g. `"tsne_kl"`) over training steps since the last reset."""
        if not self.loss_names:
            return {}
        steps = max(1.0, float(ops.convert_to_numpy(self.loss_steps)))
        sums = ops.convert_to_numpy(self.loss_sums)
        return {name: float(s) / steps for name, s in zip(self.loss_names, sums)}

    @property
    def overflow_fraction(self):
        """Fraction of (token, choice) assignments dropped for capacity since the last reset."""
        if getattr(self, "overflow_counts", None) is None:
            return None
        dropped, total = ops.convert_to_numpy(self.overflow_counts)
        return float(dropped) / max(1.0, float(total))

    @property
    def load_fractions(self):
        """Each expert's share of the (token, choice) assignments in training since
        the last reset (`(E,)` floats summing to one; zeros before any step), or
        None without `top_k` or with expert choice (every expert takes the same).
        Under `tf.distribute` the count reads as the replicas' mean, which
        leaves the shares those of the global batch."""
        if not self.counts_load:
            return None
        load = np.asarray(ops.convert_to_numpy(self.expert_load), "float64")
        return load / load.sum() if load.sum() else load

    def reset_statistics(self):
        """Zeroes the running loss sums, overflow counts and expert loads."""
        for name in ("loss_sums", "loss_steps", "overflow_counts", "expert_load"):
            variable = getattr(self, name, None)
            if variable is not None:
                variable.assign(np.zeros(variable.shape, dtype="float32"))

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        user_experts = getattr(self.expert_bank, "expert_list", None)
        user_shared = getattr(self.shared_bank, "expert_list", None)
        return {
            **super().get_config(),
            "units": self.units,
            "num_experts": self.num_experts if user_experts is None else None,
            "experts": None if user_experts is None else [serialize(e) for e in user_experts],
            "expert_units": self.expert_units,
            "expert_density": self.expert_density,
            "route_density": self.route_density,
            "expert_activation": activations.serialize(self.expert_activation),
            "gate": serialize(self.gate),
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "balance_losses": self.balance_losses,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "seed": self.seed,
            "implementation": self.implementation,
            "route_implementation": self.route_implementation,
            "dispatch": self.dispatch,
            "normalize_top_k": self.normalize_top_k,
            "router_jitter": self.router_jitter,
            "num_shared_experts": self.num_shared_experts,
            "shared_expert_density": self.shared_expert_density,
            "shared_experts": None if user_shared is None else [serialize(e) for e in user_shared],
            "routing": self.routing,
            "selection_bias": self.selection_bias,
        }

    @classmethod
    def from_config(cls, config):
        config = read_config(config, cls.__name__)
        deserialize = keras.saving.deserialize_keras_object
        config["gate"] = deserialize(config["gate"])
        if config.get("shared_experts") is not None:
            config["shared_experts"] = [deserialize(e) for e in config["shared_experts"]]
        if config.get("experts") is not None:
            config["experts"] = [deserialize(e) for e in config["experts"]]
            # Files saved before `implementation=None` became the default hold the
            # default storage's name here, which user experts never used.
            config.pop("implementation", None)
            config.pop("route_implementation", None)
        elif "route_implementation" not in config:
            # Saved before the routes had a storage of their own: the experts'.
            config["route_implementation"] = config.get("implementation") or DEFAULT_STORAGE
        return cls(**config)
