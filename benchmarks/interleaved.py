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
