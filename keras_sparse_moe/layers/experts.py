"""Expert banks of `SparseExpertMixture`: built-in sparse experts with routes, or user layers.

A bank owns everything about the experts and nothing about the gate. Both
kinds answer the same four questions, so the mixture never asks which kind it
holds:
- `tokens(inputs)`: the rows the gate and the experts see;
- `mix(tokens, weights, active, training)`: every expert on every token,
  weighted by the `(tokens, E)` gate `weights` (the dense path);
- `on_slots(slots, plan, index, training)`: each expert on its own
  `(E, capacity, ...)` slots only (the capacity dispatch);
- `outputs(flat, inputs)`: the mixture's output shaped like its input.

A bank whose `groups` is True also answers `on_groups(tokens, plan, index)`:
each expert on exactly its own rows of the expert-sorted layout (the dropless
dispatch of `keras_sparse_moe.ops.dispatch.group_plan`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sparse_moe import topologies
from keras_sparse_moe.layers.sparse_dense import SparseDense
from keras_sparse_moe.layers.sparse_kernel import DENSE_LIMIT
from keras_sparse_moe.layers.storage import STORAGES
from keras_sparse_moe.ops import dispatch

__all__ = ["LayerExperts", "SparseExperts"]


class SparseExperts(keras.layers.Layer):
    """`E` one-hidden-layer sparse experts, with optional sparse routes between them.

    Expert `e` is `input -> hidden units -> units`. The layers of all experts
    are stored together as `SparseDense` layers (`expert_hidden`:
    `input_dim x E*hidden`, `expert_output`: `hidden x E*units`), so SET, RigL
    and pruning evolve them like any `SparseDense`. With `route_density > 0`,
    `expert_routes` (`E*hidden x E*hidden`, a `small_world(..., rewire=1)`
    mask: links only between different experts) adds
    `sum_e h_e @ R[e -> f]` to expert `f`'s hidden units; a route from an
    expert the token did not select carries nothing.

    With `implementation="sparse"` the three layers store only their
    connections, and every contraction below is a `sparse_matmul` over them:
    expert compute grows with the number of connections, not with
    `input_dim * E * hidden`.

    This is the built-in bank of `SparseExpertMixture(num_experts=...)`; users
    configure it through the mixture's arguments.
    """

    def __init__(
        self,
        num_experts,
        units,
        hidden_units,
        density,
        route_density,
        activation,
        use_bias,
        kernel_initializer,
        seed=None,
        implementation="masked",
        route_implementation=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.implementation = implementation
        self.route_implementation = route_implementation or implementation
        self.units = units
        self.hidden_units = hidden_units
        seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
        common = {
            "density": density,
            "kernel_initializer": kernel_initializer,
            "dtype": self.dtype_policy,
            "implementation": implementation,
        }
        self.expert_hidden = SparseDense(
            num_experts * hidden_units,
            activation=activation,
            use_bias=use_bias,
            seed=seeds[0],
            name="expert_hidden",
            **common,
        )
        self.expert_output = SparseDense(
            num_experts * units, use_bias=use_bias, seed=seeds[1], name="expert_output", **common
        )
        self.expert_routes = None
        if route_density > 0 and num_experts > 1:
            # Density over all E*h x E*h pairs whose links all lie between experts.
            # Sparse storages draw them uniformly inside the pattern (no dense mask;
            # tiles: an equal share in each pair's tile). A storage holding the
            # dense kernel takes the clustered mask builder.
            masked = STORAGES[self.route_implementation].stores_dense
            self.expert_routes = SparseDense(
                num_experts * hidden_units,
                density=route_density * (num_experts - 1) / num_experts,
                topology="small_world" if masked else "erdos_renyi",
                topology_kwargs={"num_clusters": num_experts, "rewire": 1.0} if masked else None,
                implementation=self.route_implementation,
                allowed=topologies.BlockPattern.between_clusters(num_experts),
                use_bias=False,
                kernel_initializer=kernel_initializer,
                seed=seeds[2],
                dtype=self.dtype_policy,
                name="expert_routes",
            )
        for layer in self._kernel_layers:
            layer._pre_split_hint = True  # see SparseKernelLayer.load_own_variables

    def build(self, inputs_shape):
        dim = inputs_shape[-1]
        if dim is None:
            raise ValueError(
                "`SparseExpertMixture` needs a known last input dimension. Received: "
                f"inputs_shape={inputs_shape}"
            )
        self.input_dim = int(dim)
        h = self.hidden_units
        self.expert_hidden.build((None, self.input_dim))
        self.expert_output.build((None, h))
        if self.expert_routes is not None:
            self.expert_routes.build((None, self.num_experts * h))
        self.built = True

    @property
    def has_routes(self):
        return self.expert_routes is not None

    @property
    def token_shape(self):
        return (None, self.input_dim)

    def tokens(self, inputs):
        return ops.reshape(inputs, (-1, self.input_dim))

    def outputs(self, flat, inputs):
        return ops.reshape(flat, (*ops.shape(inputs)[:-1], self.units))

    def output_shape(self, inputs_shape):
        return tuple(inputs_shape[:-1]) + (self.units,)

    # ------------------------------------------------------------------ #
    # Every contraction goes through the layers' storage (`block_matmul`): expert e
    # owns the e-th block of columns of each kernel, whatever the storage.
    def _bias(self, layer, width):
        return None if layer.bias is None else ops.reshape(layer.bias, (self.num_experts, width))

    def _blocks(self, x):
        """`(E, c, k)` per-expert slots -> `(c, E * k)`."""
        e, c, k = self.num_experts, ops.shape(x)[1], x.shape[-1]
        return ops.reshape(ops.transpose(x, (1, 0, 2)), (c, e * k))

    def _unblock(self, y, width):
        """`(c, E * width)` -> `(E, c, width)`."""
        c = ops.shape(y)[0]
        return ops.transpose(ops.reshape(y, (c, self.num_experts, width)), (1, 0, 2))

    def hidden(self, x):
        """Expert hidden units: `(n, d)` shared by all experts -> `(n, E, h)`, or
        `(E, c, d)` per-expert slots -> `(E, c, h)`."""
        layer, e, h = self.expert_hidden, self.num_experts, self.hidden_units
        bias = self._bias(layer, h)
        if len(x.shape) == 2:
            hidden = ops.reshape(layer.storage.block_matmul(x, e, False, False), (-1, e, h))
        else:
            hidden = self._unblock(layer.storage.block_matmul(self._blocks(x), e, True, False), h)
            bias = None if bias is None else ops.expand_dims(bias, 1)
        return layer.activation(hidden if bias is None else hidden + bias)

    def _routes(self, hidden_tokens):
        """`(tokens, E, h)` hidden of the active experts -> what the routes add."""
        tokens = ops.shape(hidden_tokens)[0]
        flat = ops.reshape(hidden_tokens, (tokens, self.num_experts * self.hidden_units))
        routed = self.expert_routes.storage.matmul(flat)
        return ops.reshape(routed, (tokens, self.num_experts, self.hidden_units))

    def mix(self, tokens, weights, active, training=None):
        """Every expert on every token, weighted; `active` `(tokens, E)` 0/1 or None = all."""
        hidden = self.hidden(tokens)
        if self.expert_routes is not None:
            source = hidden
            if active is not None:
                source = hidden * ops.cast(ops.expand_dims(active, -1), hidden.dtype)
            hidden = hidden + self._routes(source)
        # The gate weighting folds into one contraction with the output kernels.
        weights = ops.cast(weights, hidden.dtype)
        weighted = hidden * ops.expand_dims(weights, -1)
        flat = ops.reshape(weighted, (-1, self.num_experts * self.hidden_units))
        outputs = self.expert_output.storage.block_matmul(flat, self.num_experts, True, True)
        bias = self._bias(self.expert_output, self.units)
        if bias is not None:
            outputs = outputs + ops.matmul(weights, bias)
        return outputs

    def on_slots(self, slots, plan, index, training=None):
        """`(E, c, d)` slots -> `(E, c, units)`: each expert computes only its slots."""
        hidden = self.hidden(slots)
        if self.expert_routes is not None:
            hidden = hidden + self._slot_routes(hidden, plan, index)
        storage, e = self.expert_output.storage, self.num_experts
        outs = self._unblock(storage.block_matmul(self._blocks(hidden), e, True, False), self.units)
        bias = self._bias(self.expert_output, self.units)
        if bias is not None:
            outs = outs + ops.expand_dims(bias, 1)
        return outs

    def _slot_routes(self, hidden, plan, index):
        """The routes' contribution to each slot: via the tokens' active hidden states."""
        e, h, k = self.num_experts, self.hidden_units, index.shape[-1]
        flat = ops.reshape(hidden, (-1, h))
        num_slots = ops.shape(flat)[0]
        static = isinstance(index.shape[0], (int, np.integer))
        if self._tiled_routes and k > 1 and static and not self.expert_routes.storage.probing:
            # Only the tiles between visited experts; a dropped choice reads the zero row.
            padded = ops.concatenate([flat, ops.zeros_like(flat[:1])], axis=0)
            per_pair = self._pair_routes_by_tile(padded, plan.slot, index)
            per_choice = ops.sum(ops.reshape(per_pair, (-1, k, k - 1, h)), axis=2)
            at_slot = ops.segment_sum(
                ops.reshape(per_choice, (-1, h)),
                ops.reshape(plan.slot, (-1,)),
                num_segments=num_slots + 1,
            )
            return ops.reshape(at_slot[:num_slots], (e, -1, h))
        expert_of_slot = ops.arange(num_slots, dtype="int32") // plan.capacity
        token_of_slot = ops.maximum(plan.token_of_slot, 0)
        routed = self._row_routes(flat, plan.slot, token_of_slot, expert_of_slot, index)
        return ops.reshape(routed, (e, -1, h))

    def _row_routes(self, hidden, row_of_choice, token_of_row, expert_of_row, index):
        """What the routes add to each row of `hidden` (`(rows, h)`, one (token,
        expert) pair a row), from the hidden states of the experts each token
        visited. `row_of_choice` (`(tokens, k)`) is the row of each choice, or
        `rows` for a dropped one."""
        e, h = self.num_experts, self.hidden_units
        num_rows = ops.shape(hidden)[0]
        padded = ops.concatenate([hidden, ops.zeros_like(hidden[:1])], axis=0)
        # (tokens, E): the row holding each visited (token, expert) pair, else the zero row.
        # (one_hot of a rank-2 index does not convert to ONNX: an equality does)
        chosen = ops.cast(ops.expand_dims(index, -1) == ops.arange(e, dtype=index.dtype), "int32")
        row_map = ops.sum(chosen * ops.expand_dims(row_of_choice - num_rows, -1), axis=1)
        routed = self._routes(ops.take(padded, row_map + num_rows, axis=0))
        picked = ops.take(ops.reshape(routed, (-1, h)), token_of_row * e + expert_of_row, axis=0)
        return picked

    @property
    def _kernel_layers(self):
        return [x for x in (self.expert_hidden, self.expert_output, self.expert_routes) if x]

    @property
    def stores_dense(self):
        """True when the bank's layers keep dense (masked) kernels."""
        return self.expert_hidden.storage.stores_dense

    @property
    def groups(self):
        """True: `on_groups` (the dropless dispatch) is available. It reads each
        layer's dense kernel (`dense_kernel()`): masked storage holds it; sparse
        storage scatters its connections into one at each call, so each expert
        still computes only its own rows (the all-experts path would contract
        every row with every connection). Not for kernels over `DENSE_LIMIT`
        entries: those take the all-experts path."""
        return all(
            layer.storage.stores_dense or int(np.prod(layer.kernel_shape)) <= DENSE_LIMIT
            for layer in self._densified_layers
        )

    @property
    def _tiled_routes(self):
        """True: the routes keep their connections by tile (`TileStorage`), and the
        grouped dispatch reads only the tiles between visited experts."""
        return self.expert_routes is not None and self.expert_routes.storage.reads_tiles

    @property
    def _densified_layers(self):
        """The layers whose dense kernel the grouped dispatch reads."""
        layers = self._kernel_layers
        return layers[:2] if self._tiled_routes else layers

    DENSIFY_COST = 3  # multiply-adds of the sparse product one densified entry costs

    def densify_pays(self, num_tokens):
        """Whether the grouped path suits `num_tokens` tokens. Always with masked
        storage. With sparse storage the grouped path writes every entry of the
        dense kernels, while the all-experts path multiplies every token by every
        connection: grouped when `tokens * connections >= DENSIFY_COST *
        entries` (a densified entry costs about three sparse multiply-adds on a
        CPU: measured at 784 -> 10 x 64 experts at 20 % and 1024 -> 64 x 256 at
        5 %, where one token takes the all-experts path 11x faster and 1,024
        tokens the grouped path 8x faster). An unknown count: grouped."""
        if self.stores_dense or not isinstance(num_tokens, (int, np.integer)):
            return True
        layers = self._densified_layers
        connections = sum(layer.storage.macs_per_row for layer in layers)
        entries = sum(int(np.prod(layer.kernel_shape)) for layer in layers)
        return int(num_tokens) * connections >= self.DENSIFY_COST * entries

    def group_block(self, num_tokens, top_k):
        """Rows per block of the grouped layout for this bank's matrices."""
        sizes = (self.input_dim * self.hidden_units, self.hidden_units * self.units)
        return dispatch.group_block(num_tokens, top_k, self.num_experts, max(sizes))

    def route_block(self, num_tokens, top_k):
        """Rows per block of the routes' layout: the `tokens * k * (k - 1)` ordered
        pairs of visited experts, grouped by their `(h, h)` tile (`E * E` groups)."""
        e, h = self.num_experts, self.hidden_units
        return dispatch.group_block(num_tokens, top_k * (top_k - 1), e * e, h * h)

    def route_form(self, num_tokens, top_k):
        """How the grouped dispatch computes the routes for `num_tokens` tokens:
        `"tiles"` (`_visited_routes`) or `"folded"` (`_output_with_folded_routes`);
        `"connections"` (`_visited_route_connections`) for routes kept by tile
        (`route_implementation="tiles"`); None without routes or with `top_k` 1.

        The folded form multiplies each row by `E * units` columns where the
        tiles multiply each ordered pair by `h`, but it needs no second plan,
        no gathers of pairs, and the `E^2 h^2 units` multiply-adds of folding
        the output kernels into the routes once a call. It is taken for a
        static token count when `E * units <= 2 * (k - 1) * h` and
        `tokens * k * (k - 1) >= E^2 * units` (the pairs' tile work at least
        the fold's). Measured on a 2-core CPU, JAX, 784 -> E x h experts at
        20 %, routes 2 %, top-2, folded / tiles time at 1,024 tokens: 10 x 64
        -> 10 units 0.85, 16 x 64 -> 8 0.89 (both folded by this rule), 10 x
        64 -> 32 0.86 but 1.24 at 256 and 1.14 at 4,096 tokens (tiles by
        this rule); 10 x 64 -> 10 at 256 tokens 0.97 (tiles). Those ratios
        were measured with the fold as a second grouped matmul after the
        output layer; as one matmul with it the demo size ran 4-7 % faster
        again on JAX, 4-8 % on TensorFlow (two interleaved runs each).
        """
        if self.expert_routes is None or top_k < 2:
            return None
        if self._tiled_routes:
            return "connections"
        if not isinstance(num_tokens, (int, np.integer)):
            return "tiles"
        e, h, u = self.num_experts, self.hidden_units, self.units
        pairs = int(num_tokens) * top_k * (top_k - 1)
        narrow = e * u <= 2 * (top_k - 1) * h
        return "folded" if narrow and pairs >= e * e * u else "tiles"

    def on_groups(self, tokens, plan, index, training=None):
        """`(rows, units)` output of each row's expert on its token (`dispatch.GroupPlan`)."""
        experts = dispatch.expert_of_row(plan)
        rows = ops.take(tokens, plan.token_of_row, axis=0)
        hidden = self._grouped_layer(self.expert_hidden, rows, self.hidden_units, plan, experts)
        hidden = self.expert_hidden.activation(hidden)
        form = self.route_form(index.shape[0], index.shape[-1])
        if form == "folded":
            return self._output_with_folded_routes(hidden, plan, index, experts)
        if form == "tiles":
            hidden = hidden + self._visited_routes(hidden, plan, index)
        elif form == "connections":
            hidden = hidden + self._visited_route_connections(hidden, plan, index, experts)
        return self._grouped_layer(self.expert_output, hidden, self.units, plan, experts)

    def _output_with_folded_routes(self, hidden, plan, index, experts):
        """The output layer with the routes folded into it. The output layer is
        linear, so a route's `h_s @ R[s -> t]` reaches the output as
        `h_s @ (R[s -> t] @ W_t)`. One grouped matmul multiplies each row
        (expert `s`) by `[W_s | R[s -> t] @ W_t for every t]` (`(h, units + E *
        units)`): its own output, then what it sends to each expert's output;
        each target choice adds its sources' `units` columns of its block.
        Equal to `_visited_routes` followed by the output layer."""
        e, h, u, k = self.num_experts, self.hidden_units, self.units, index.shape[-1]
        routes = ops.reshape(self.expert_routes.dense_kernel(), (e, h, e, h))
        kernel = ops.reshape(self.expert_output.dense_kernel(), (h, e, u))
        folded = ops.reshape(ops.einsum("sitj,jtu->situ", routes, kernel), (e, h, e * u))
        both = ops.concatenate([ops.transpose(kernel, (1, 0, 2)), folded], axis=-1)
        out = dispatch.grouped_matmul(hidden, both, plan)
        own, sent = out[:, :u], ops.reshape(out[:, u:], (-1, u))
        if self.expert_output.bias is not None:
            own = own + ops.take(self._bias(self.expert_output, u), experts, axis=0)
        source, target = _ordered_pairs(k)
        # Row `r`'s block for expert `t` is row `r * E + t` of `sent`.
        at = ops.take(plan.row_of_choice, source, axis=1) * e + ops.take(index, target, axis=1)
        return own + _on_target_rows(ops.take(sent, at, axis=0), plan, k)

    def _visited_routes(self, hidden, plan, index):
        """What the routes add to each row of the grouped layout, computed only
        between the experts its token visited: for each ordered pair (source
        choice, target choice) of a token, the source's hidden state times the
        `(h, h)` tile `R[source expert -> target expert]` of the route matrix.
        The pairs are sorted by tile like the rows by expert (`tiled_matmul`), so
        the work is `tokens * k * (k - 1) * h^2`, not `tokens * (E * h)^2`."""
        e, h, k = self.num_experts, self.hidden_units, index.shape[-1]
        source, target = _ordered_pairs(k)
        tiles = ops.take(index, source, axis=1) * e + ops.take(index, target, axis=1)
        pairs = dispatch.group_plan(tiles, e * e, self.route_block(index.shape[0], k))
        # Each pair row reads its source choice's hidden row (padding rows: row 0).
        source_rows = ops.reshape(ops.take(plan.row_of_choice, source, axis=1), (-1,))
        source_rows = ops.concatenate([source_rows, ops.zeros((1,), "int32")])
        inputs = ops.take(hidden, ops.take(source_rows, pairs.choice_of_row), axis=0)
        routed = dispatch.tiled_matmul(inputs, self.expert_routes.dense_kernel(), pairs, h)
        return _on_target_rows(ops.take(routed, pairs.row_of_choice, axis=0), plan, k)

    def _visited_route_connections(self, hidden, plan, index, experts):
        """`_visited_routes` in O(connections) (`_pair_routes_by_tile`) for the
        grouped layout. A symbolic token count (exports) and RigL's growth probe
        take every connection on the visited rows instead (`_row_routes`)."""
        k = index.shape[-1]
        if not isinstance(index.shape[0], (int, np.integer)) or self.expert_routes.storage.probing:
            token_of_row = plan.token_of_row
            return self._row_routes(hidden, plan.row_of_choice, token_of_row, experts, index)
        per_pair = self._pair_routes_by_tile(hidden, plan.row_of_choice, index)
        return _on_target_rows(per_pair, plan, k)

    def _pair_routes_by_tile(self, hidden, row_of_choice, index):
        """What each ordered pair of a token's visited experts (`_ordered_pairs`
        order) sends along the routes, reading only the connections of its tile
        (`TileStorage.tile_arrays`): `(tokens * k * (k - 1), h)`, from
        `tokens * k * (k - 1) * capacity` multiply-adds gathered and summed per
        target unit. `row_of_choice` is each choice's row of `hidden` (a
        dropped choice: a zero row)."""
        e, h, k = self.num_experts, self.hidden_units, index.shape[-1]
        storage = self.expert_routes.storage
        source, target = _ordered_pairs(k)
        pair_blocks = ops.take(index, source, axis=1) * e + ops.take(index, target, axis=1)
        tile = ops.take(storage.tile_of_block(), ops.reshape(pair_blocks, (-1,)))
        source_rows = ops.reshape(ops.take(row_of_choice, source, axis=1), (-1,))
        inputs = ops.take(hidden, source_rows, axis=0)  # (pairs, h)
        values, rows, cols = storage.tile_arrays(tile)
        products = ops.take_along_axis(inputs, rows, axis=1) * ops.cast(values, inputs.dtype)
        pairs = index.shape[0] * k * (k - 1)
        units = ops.expand_dims(ops.arange(pairs, dtype="int32") * h, -1) + cols
        routed = ops.segment_sum(
            ops.reshape(products, (-1,)), ops.reshape(units, (-1,)), num_segments=pairs * h
        )
        return ops.reshape(routed, (pairs, h))

    def _grouped_layer(self, layer, rows, width, plan, experts):
        """`rows @ W_e + b_e` for each row's expert `e` (the dense kernel of either storage)."""
        kernel = layer.dense_kernel()
        kernel = ops.reshape(kernel, (kernel.shape[0], self.num_experts, width))
        out = dispatch.grouped_matmul(rows, kernel, plan, expert_axis=1)
        if layer.bias is not None:
            out = out + ops.take(self._bias(layer, width), experts, axis=0)
        return out


def _ordered_pairs(k):
    """`(source, target)` choice indices of a token's `k (k - 1)` ordered pairs of
    different choices, grouped by target: `(j, t)` for every `t`, every `j != t`."""
    pairs = [(j, t) for t in range(k) for j in range(k) if j != t]
    return np.array([j for j, _ in pairs], "int32"), np.array([t for _, t in pairs], "int32")


def _on_target_rows(per_pair, plan, k):
    """`(tokens * k * (k - 1), width)` values of the ordered pairs (`_ordered_pairs`
    order) -> `(rows, width)`: each target choice's `k - 1` sources summed, at the
    choice's row of the grouped layout (zero on padding rows)."""
    width = per_pair.shape[-1]
    per_choice = ops.sum(ops.reshape(per_pair, (-1, k, k - 1, width)), axis=2)
    flat = ops.concatenate(
        [ops.reshape(per_choice, (-1, width)), ops.zeros((1, width), per_pair.dtype)], axis=0
    )
    return ops.take(flat, plan.choice_of_row, axis=0)


class LayerExperts(keras.layers.Layer):
    """A thin adapter giving a list of user layers the expert-bank interface.

    Every sample is a token; the experts must have equal output shapes.
    """

    def __init__(self, experts, units=None, **kwargs):
        super().__init__(**kwargs)
        self.expert_list = list(experts)
        self.num_experts = len(self.expert_list)
        self.units = units

    def build(self, inputs_shape):
        shapes = []
        for expert in self.expert_list:
            if not expert.built:
                expert.build(inputs_shape)
            shapes.append(tuple(expert.compute_output_shape(inputs_shape))[1:])
        if len(set(shapes)) > 1:
            raise ValueError(
                "`SparseExpertMixture` needs experts with equal output shapes. Received "
                f"output shapes (batch axis left out): {shapes}"
            )
        if self.units is not None and shapes[0][-1] != self.units:
            raise ValueError(
                f"`SparseExpertMixture` got `units={self.units}` but its experts output "
                f"{shapes[0]}."
            )
        self.expert_shape = shapes[0]
        self._token_shape = tuple(inputs_shape)
        self.built = True

    has_routes = False
    groups = False  # a user layer computes whole batches: no per-row dispatch

    @property
    def token_shape(self):
        return self._token_shape

    def tokens(self, inputs):
        return inputs

    def outputs(self, flat, inputs):
        return flat

    def output_shape(self, inputs_shape):
        return (inputs_shape[0],) + tuple(self.expert_shape)

    def mix(self, tokens, weights, active, training=None):
        outs = ops.stack([expert(tokens, training=training) for expert in self.expert_list], 1)
        w = ops.cast(weights, outs.dtype)
        w = ops.reshape(w, tuple(ops.shape(w)) + (1,) * (len(outs.shape) - 2))
        return ops.sum(w * outs, axis=1)

    def on_slots(self, slots, plan, index, training=None):
        return ops.stack(
            [expert(slots[i], training=training) for i, expert in enumerate(self.expert_list)]
        )
