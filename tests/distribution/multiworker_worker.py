"""One worker of the MultiWorkerMirroredStrategy test (run by test_multiworker.py).

Usage: python -m tests.distribution.multiworker_worker WEIGHTS_IN RESULT_OUT, with
TF_CONFIG naming this worker. Trains `common.mlp` with SET from the given
weights (`common.custom_loop_fit`: Keras 3's `fit` does not run under this
strategy) and writes its final weights and history.
"""

import json
import sys

import tensorflow as tf

# The strategy must exist before TF starts any op.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import numpy as np  # noqa: E402

from keras_sparse_moe.callbacks import SETEvolution  # noqa: E402
from tests.distribution import common  # noqa: E402


def main(weights_in, result_out):
    with np.load(weights_in) as data:
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
    with strategy.scope():
        model = common.compile_model(common.mlp())
        model.set_weights(weights)
    # No seed: each worker draws its own, and the callback must agree on one.
    callback = SETEvolution(update_every=3, zeta=0.2)
    history = common.custom_loop_fit(model, callback, strategy)
    np.savez(result_out, *model.get_weights())
    with open(result_out + ".json", "w") as f:
        json.dump(
            {"history": history, "replicas": strategy.num_replicas_in_sync, "seed": callback._seed},
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
