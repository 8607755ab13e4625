"""Fit-step timing of several models in turns, so machine noise hits them alike."""

from __future__ import annotations

import time


def fit_step_times(models, x, y, batch_size, steps, repeats):
    """`{name: [seconds per step, one per round]}` after one warm-up (compiling) epoch each.

    Every round fits each model for one epoch of `steps` steps, in turn.
    """
    times = {name: [] for name in models}
    for model in models.values():
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def epochs_in_turns(runs, x, y, batch_size, epochs, after_epoch=None):
    """Trains `runs` (`{name: (model, callbacks)}`) one epoch each, in turns, for
    `epochs` epochs; returns `{name: [seconds per epoch]}`.

    Each epoch is one `fit(initial_epoch=e, epochs=e + 1)`, so callbacks must know
    the whole run's length by other means (see `bench_sparse_training.Timed`).
    `after_epoch(epoch)` runs after every round.
    """
    times = {name: [] for name in runs}
    for epoch in range(epochs):
        for name, (model, callbacks) in runs.items():
            start = time.perf_counter()
            model.fit(
                x,
                y,
                batch_size=batch_size,
                initial_epoch=epoch,
                epochs=epoch + 1,
                verbose=0,
                callbacks=callbacks,
            )
            times[name].append(time.perf_counter() - start)
        if after_epoch is not None:
            after_epoch(epoch)
    return times
