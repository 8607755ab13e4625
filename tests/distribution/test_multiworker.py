"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train with SET and end with
the same connections and weights as each other and as one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_sparse_moe.callbacks import SETEvolution
from tests.distribution import common

tf = pytest.importorskip("tensorflow")

pytestmark = [pytest.mark.tensorflow_only, pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds for both workers, start to finish


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_two_workers_rewire_identically_and_match_one_device(tmp_path):
    reference = common.compile_model(common.mlp())
    weights_in = tmp_path / "initial.npz"
    np.savez(weights_in, *reference.get_weights())

    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    processes = []
    try:
        for index in range(2):
            config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.distribution.multiworker_worker",
                        str(weights_in),
                        str(tmp_path / f"worker{index}.npz"),
                    ],
                    cwd=ROOT,
                    env={**env, "TF_CONFIG": json.dumps(config)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    finally:
        for p in processes:  # a worker left waiting for its peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for index, (p, output) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"worker {index} failed:\n{output[-3000:]}"

    results = []
    for index in range(2):
        path = tmp_path / f"worker{index}.npz"
        with np.load(path) as data:
            weights = [data[f"arr_{i}"] for i in range(len(data.files))]
        results.append((weights, json.loads(Path(f"{path}.json").read_text())))
    assert [r[1]["replicas"] for r in results] == [2, 2]
    # The workers hold the same bits: every rewiring decided the same on both.
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    # The workers drew their own seeds (seed=None) and agreed on one.
    seeds = [r[1]["seed"] for r in results]
    assert seeds[0] == seeds[1]
    history = results[0][1]["history"]
    callback = SETEvolution(update_every=3, zeta=0.2, seed=seeds[0])
    single = common.custom_loop_fit(reference, callback, tf.distribute.get_strategy())
    assert sum(history["set/rewired"]) > 0 and history["set/rewired"] == single["set/rewired"]
    # And they follow one device over the same global batches.
    model = common.mlp()
    model.set_weights(results[0][0])
    common.assert_same_training(model, reference)
