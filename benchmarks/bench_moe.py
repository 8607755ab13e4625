"""Fit-step time of the capacity dispatch relative to evaluating every expert.

`SparseExpertMixture` with E=16 built-in sparse experts (d=1024 ->
expert_units -> 1024), top-2 routing, 4096 tokens per step, `jit_compile=True`.
"all experts" runs every expert on every token and weights the unselected ones
by zero, as dense MoE layers do; "capacity dispatch" gathers each expert's
tokens into `ceil(capacity_factor * k * tokens / E)` slots. The FLOP floor of
the ratio is `k / E` (0.125), or `capacity_factor * k / E` with the slack. The
models are timed in turns (one epoch of `--steps` steps each, repeated) so
machine noise hits all alike; the table gives median step times and ratios.

    python benchmarks/bench_moe.py [--expert-units 256] [--steps 3] [--repeats 5]

With `--compile-tokens N ...` it measures instead how long the first compiled
training step of the capacity dispatch (the first `--capacity-factors` value)
takes at each token count, each in a fresh process (so no compilation cache is
shared), next to the second step:

    python benchmarks/bench_moe.py --dim 256 --expert-units 256 \\
        --capacity-factors 1.25 --compile-tokens 512 1024 4096
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
from interleaved import fit_step_times

from keras_sparse_moe.layers import SparseExpertMixture


def model_for(args, capacity_factor, seed=0):
    keras.utils.set_random_seed(seed)
    mixture = SparseExpertMixture(
        units=args.dim,
        num_experts=args.experts,
        expert_units=args.expert_units,
        expert_density=args.density,
        top_k=args.top_k,
        capacity_factor=capacity_factor,
        seed=seed,
    )
    model = keras.Sequential([keras.Input((args.dim,)), mixture])
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--expert-units", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--capacity-factors", type=float, nargs="+", default=[1.0, 1.25, 2.0])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile-tokens",
        type=int,
        nargs="+",
        help="time the first training step at these token counts (fresh processes)",
    )
    parser.add_argument("--one-compile", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_compile:
        return one_compile(args, args.one_compile)
    if args.compile_tokens:
        return compile_table(args)

    rng = np.random.default_rng(0)
    n = args.tokens * args.steps
    x = rng.standard_normal((n, args.dim)).astype("float32")
    y = rng.standard_normal((n, args.dim)).astype("float32")
    models = {"all experts (dense path)": model_for(args, None)}
    for factor in args.capacity_factors:
        models[f"capacity dispatch, capacity_factor={factor:g}"] = model_for(args, factor)
    times = fit_step_times(models, x, y, args.tokens, args.steps, args.repeats)

    floor = args.top_k / args.experts
    print(
        f"backend={keras.backend.backend()} device={_device()} "
        f"machine={platform.machine()} cpus={os.cpu_count()} "
        f"E={args.experts} top_k={args.top_k} d={args.dim} expert_units={args.expert_units} "
        f"expert_density={args.density} tokens={args.tokens}"
    )
    base = statistics.median(times["all experts (dense path)"])
    print("| path | median step (ms) | ratio to all experts | FLOP floor |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        factor = models[name].layers[0].capacity_factor
        bound = "1" if factor is None else f"{min(1.0, factor * floor):.3f}"
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.3f} | {bound} |")


def one_compile(args, tokens):
    """Prints `first second` step times (s) of a fresh capacity mixture at `tokens`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, args.dim)).astype("float32")
    y = rng.standard_normal((tokens, args.dim)).astype("float32")
    model = model_for(args, args.capacity_factors[0])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    print(*times)


def compile_table(args):
    print(
        f"backend={keras.backend.backend()} device={_device()} cpus={os.cpu_count()} "
        f"E={args.experts} top_k={args.top_k} d={args.dim} expert_units={args.expert_units} "
        f"capacity_factor={args.capacity_factors[0]:g} date={time.strftime('%Y-%m-%d')}"
    )
    print("| tokens | first step (s) | second step (s) |\n|---|---|---|")
    forwarded = [
        f"--experts={args.experts}",
        f"--top-k={args.top_k}",
        f"--dim={args.dim}",
        f"--expert-units={args.expert_units}",
        f"--density={args.density}",
        f"--capacity-factors={args.capacity_factors[0]}",
    ]
    for tokens in args.compile_tokens:
        command = [sys.executable, __file__, *forwarded, f"--one-compile={tokens}"]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        first, second = (float(v) for v in run.stdout.split()[-2:])
        print(f"| {tokens} | {first:.1f} | {second:.3f} |", flush=True)


def _device():
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].platform
    return "cpu"


if __name__ == "__main__":
    main()
