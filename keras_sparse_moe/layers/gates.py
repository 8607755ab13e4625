"""Gates of a mixture of experts: softmax over any network, noisy top-k, oracle.

A gate maps its input to gate values `G(x)`, one row per token on the
simplex over `num_experts`. Calling a gate returns those values, so a gate is
an ordinary Keras layer. `SparseExpertMixture` calls `route()` instead, which
returns a `Routing`: the gate values plus what the balancing losses need (the
router logits for the z-loss, `NoisyTopKGate`'s smooth load), the gate's own
embedding of the tokens (`PTSNEGate`'s 2-D map) and the gate's own losses
(the t-SNE loss, which needs the gate's input). A new gate subclasses `Gate`,
implements `route()` and names what it fills in `provides`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import ops

from keras_sparse_moe import validation
from keras_sparse_moe.ops import dispatch
from keras_sparse_moe.saving import VersionedConfig, read_config

__all__ = ["Gate", "NoisyTopKGate", "OracleGate", "Routing", "SoftmaxGate", "get"]


class Routing(NamedTuple):
    """What a gate decided for a batch of tokens.

    Attributes:
        gates: `(tokens, num_experts)` float32 gate values.
        logits: `(tokens, num_experts)` float32 router logits, or None.
        load: `(num_experts,)` smooth load estimate (`NoisyTopKGate`), or None.
        token_load: `(tokens, num_experts)` each token's part of `load` (its sum
            over the tokens), for masks that leave padding out; or None.
        embedding: `(tokens, d)` the gate's embedding of the tokens
            (`PTSNEGate`: the 2-D map), or None.
        losses: Dict `{name: unweighted scalar}` of the gate's own losses,
            filled in training only; the gate's `loss_weights` weigh them.
    """

    gates: Any
    logits: Any = None
    load: Any = None
    embedding: Any = None
    losses: Any = None
    token_load: Any = None


def _f32(x):
    return ops.cast(x, "float32")


def check_gate_width(owner, shape, num_experts):
    """Static check that a gate network produces `(tokens, num_experts)` logits."""
    shape = tuple(shape)
    if len(shape) < 2 or (shape[-1] is not None and shape[-1] != num_experts):
        raise ValueError(
            f"`{owner}`'s network must output logits of shape (batch, num_experts="
            f"{num_experts}). Received: output shape={shape}"
        )


class Gate(VersionedConfig, keras.layers.Layer):
    """Base class of the gates; subclasses implement `route()`.

    Args:
        num_experts: Positive int, the number of experts gated.
        **kwargs: Base layer arguments. The gate computes in float32 unless a
            `dtype` is given: router math must not run in float16.

    Attributes:
        top_k: The number of experts the gate itself selects per token
            (`NoisyTopKGate`), or None when every expert gets a value.
        requires_gate_inputs: True when the gate reads something other than the
            experts' input (`OracleGate` reads the expert index).
        provides: The `Routing` fields `route()` fills (besides `gates`):
            `"logits"` (for `router_z_loss`), `"load"` (for `load_cv2`),
            `"embedding"`.
        loss_weights: Dict `{name: weight}` of the gate's own losses (empty
            for the gates here; `PTSNEGate` has its t-SNE loss).
    """

    top_k = None
    requires_gate_inputs = False
    provides = frozenset({"logits"})

    def __init__(self, num_experts, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.check_size("num_experts", num_experts, type(self).__name__)

    @property
    def loss_weights(self) -> dict:
        return {}

    def route(self, inputs, training=None) -> Routing:
        """The `Routing` of `inputs`; the gate's own losses are filled when `training`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `route()`.")

    def call(self, inputs, training=None):
        routing = self.route(inputs, training=training)
        if training:
            for name, weight in self.loss_weights.items():
                self.add_loss(weight * routing.losses[name])
        return routing.gates

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class SoftmaxGate(Gate):
    """`G(x) = softmax(network(x))`: a gate over any Keras network.

    The network maps the gate input to `num_experts` logits: the default is one
    `Dense(num_experts)` layer; a small CNN gives a convolutional gate.

    Args:
        num_experts: Positive int.
        network: Optional Keras layer or model producing `(batch, num_experts)`
            logits. Default: `keras.layers.Dense(num_experts)`.
        **kwargs: Base layer arguments.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> gate = keras_sparse_moe.layers.SoftmaxGate(3)
        >>> g = gate(np.ones((2, 5), dtype="float32"))
        >>> tuple(g.shape), bool(np.allclose(np.sum(g, axis=-1), 1.0))
        ((2, 3), True)
    """

    def __init__(self, num_experts, network=None, **kwargs):
        super().__init__(num_experts, **kwargs)
        if network is None:
            network = keras.layers.Dense(self.num_experts, dtype=self.dtype_policy, name="logits")
        if not isinstance(network, keras.layers.Layer):
            raise TypeError(
                "`SoftmaxGate` got an invalid `network`. Expected a Keras layer or "
                f"model producing logits. Received: network={network!r}"
            )
        self.network = network

    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        try:
            out = self.network.compute_output_shape(input_shape)
        except Exception:  # noqa: BLE001 - some layers cannot tell; checked in call
            out = None
        if out is not None:
            check_gate_width("SoftmaxGate", out, self.num_experts)
        self.built = True

    def route(self, inputs, training=None):
        logits = self.network(inputs, training=training)
        check_gate_width("SoftmaxGate", logits.shape, self.num_experts)
        logits = _f32(logits)
        return Routing(ops.softmax(logits, axis=-1), logits=logits)

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
        }

    @classmethod
    def from_config(cls, config):
        config = read_config(config, cls.__name__)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class NoisyTopKGate(Gate):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

    `H = x W_g + N(0, 1) * softplus(x W_noise)` (noise only in training),
    `G = softmax(KeepTopK(H, k))`: exactly `k` experts get a non-zero value per
    token. `W_g` and `W_noise` start at zero. `route()` also returns the smooth
    load estimate `load_e = sum_x P(x, e)` with
    `P(x, e) = Phi((x W_g)_e - kth_excluding(H, k, e)) / softplus((x W_noise)_e))`,
    whose CV² is the paper's load loss (`keras_sparse_moe.losses.load_cv2`).

    Args:
        num_experts: Positive int.
        top_k: Experts selected per token, `1 <= top_k <= num_experts`.
        noise_epsilon: Small float added to the noise scale (keeps it positive).
        seed: Optional int seeding the noise.
        **kwargs: Base layer arguments.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> gate = keras_sparse_moe.layers.NoisyTopKGate(4, top_k=2)
        >>> g = gate(np.random.rand(3, 5).astype("float32"))
        >>> np.count_nonzero(np.asarray(g), axis=-1).tolist()
        [2, 2, 2]
    """

    provides = frozenset({"logits", "load"})

    def __init__(self, num_experts, top_k, noise_epsilon=1e-2, seed=None, **kwargs):
        super().__init__(num_experts, **kwargs)
        owner = "NoisyTopKGate"
        self.top_k = validation.check_int("top_k", top_k, owner, 1, self.num_experts)
        self.noise_epsilon = validation.check_float(
            "noise_epsilon", noise_epsilon, owner, "a float >= 0", lambda e: e >= 0
        )
        self.seed = validation.check_seed(seed, "NoisyTopKGate")
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(
                "`NoisyTopKGate` needs a known last input dimension. Received: "
                f"input_shape={input_shape}"
            )
        self.gate_kernel = self.add_weight(
            name="gate_kernel", shape=(dim, self.num_experts), initializer="zeros"
        )
        self.noise_kernel = self.add_weight(
            name="noise_kernel", shape=(dim, self.num_experts), initializer="zeros"
        )
        self.built = True

    def route(self, inputs, training=None):
        x = _f32(inputs)
        clean = ops.matmul(x, _f32(self.gate_kernel))
        noise_std = ops.softplus(ops.matmul(x, _f32(self.noise_kernel))) + self.noise_epsilon
        if training:
            noisy = (
                clean + keras.random.normal(ops.shape(clean), seed=self.seed_generator) * noise_std
            )
        else:
            noisy = clean
        k = self.top_k
        top_values, top_index = dispatch.top_k(noisy, min(k + 1, self.num_experts))
        chosen = ops.one_hot(top_index[..., :k], self.num_experts, dtype="float32")
        weights = ops.softmax(top_values[..., :k], axis=-1)
        gates = ops.sum(chosen * ops.expand_dims(weights, -1), axis=-2)
        if training and k < self.num_experts:
            # P(expert e stays in the top k if its noise were redrawn): the
            # threshold is the k-th largest of the others' noisy logits.
            if_in = top_values[..., k : k + 1]
            if_out = top_values[..., k - 1 : k]
            selected = ops.sum(chosen, axis=-2) > 0
            threshold = ops.where(selected, if_in, if_out)
            z = (clean - threshold) / noise_std
            token_load = 0.5 * (1.0 + ops.erf(z / ops.sqrt(2.0)))
        else:
            token_load = ops.cast(gates > 0, "float32")
        token_load = ops.reshape(token_load, (-1, self.num_experts))
        load = ops.sum(token_load, axis=0)
        return Routing(gates, logits=noisy, load=load, token_load=token_load)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_experts,)

    def get_config(self):
        return {
            **super().get_config(),
            "top_k": self.top_k,
            "noise_epsilon": self.noise_epsilon,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class OracleGate(Gate):
    """Routes each sample to the expert its integer label names (a baseline).

    The gate input is the expert index, shape `(batch,)` or `(batch, 1)`, and
    the gate values are its one-hot row: a baseline that sends each dataset
    (say MNIST and CIFAR) to its own expert. An index outside `[0, num_experts)`
    gives an all-zero row. Pass the index to the mixture as
    `mixture(x, gate_inputs=index)`.

    Args:
        num_experts: Positive int.
        **kwargs: Base layer arguments.

    Examples:

        >>> import numpy as np
        >>> import keras_sparse_moe
        >>> gate = keras_sparse_moe.layers.OracleGate(3)
        >>> np.asarray(gate(np.array([2, 0]))).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """

    requires_gate_inputs = True
    provides = frozenset()

    def build(self, input_shape):
        if len(input_shape) > 2 or (len(input_shape) == 2 and input_shape[-1] not in (1, None)):
            raise ValueError(
                "`OracleGate` reads one integer expert index per sample, shape "
                f"(batch,) or (batch, 1). Received: input_shape={input_shape}"
            )
        self.built = True

    def route(self, inputs, training=None):
        index = ops.reshape(ops.cast(inputs, "int32"), (-1,))
        gates = ops.one_hot(index, self.num_experts, dtype="float32")
        return Routing(gates)


_NAMES = {"softmax": SoftmaxGate}


def get(gate, num_experts: int, owner: str = "SparseExpertMixture") -> Gate:
    """A `Gate` from an instance, None (a softmax gate) or the name `"softmax"`."""
    if gate is None:
        gate = "softmax"
    if isinstance(gate, str):
        if gate not in _NAMES:
            raise ValueError(
                f"`{owner}` got an unknown `gate` name. Expected one of "
                f"{sorted(_NAMES)} or a `keras_sparse_moe.layers.Gate`. Received: gate={gate!r}"
            )
        return _NAMES[gate](num_experts)
    if not isinstance(gate, Gate):
        hint = (
            " Wrap a logits network as `SoftmaxGate(num_experts, network=...)`."
            if isinstance(gate, keras.layers.Layer)
            else ""
        )
        raise TypeError(
            f"`{owner}` got an invalid `gate`. Expected a `keras_sparse_moe.layers.Gate`."
            f"{hint} Received: gate={gate!r}"
        )
    if gate.num_experts != num_experts:
        raise ValueError(
            f"`{owner}`'s gate has num_experts={gate.num_experts}, but the mixture has "
            f"{num_experts} experts."
        )
    return gate
