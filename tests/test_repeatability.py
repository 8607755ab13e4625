"""One global seed makes runs repeatable: `keras.utils.set_random_seed` and nothing else.

Five models built with no seed of their own (a SparseDense MLP with SET, the
same with sparse storage, a SparseConv2D CNN with RigL, a routed mixture with
SET, a PTSNE-gated mixture) and a ParametricTSNE map, trained in fresh
processes (`tests/repeatable_run.py`; TensorFlow with op determinism): two
runs under the same seed end with bit-identical weights, a run under another
seed does not.
"""

import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(seed):
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "PYTHONPATH": ROOT}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.repeatable_run", str(seed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _digests(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if ": " in line]
    return dict(line.split(": ", 1) for line in lines)


def test_same_global_seed_same_weights_other_seed_other_weights():
    first, again, other = (_digests(p) for p in [_run(1), _run(1), _run(2)])
    assert len(first) == 6, first
    assert first == again
    differing = [name for name in first if first[name] != other[name]]
    assert differing == list(first), (
        f"same weights under another seed: {set(first) - set(differing)}"
    )
