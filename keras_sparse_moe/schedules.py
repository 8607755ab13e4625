"""Pruning schedules: step -> (prune now?, target density), serializable.

The two classes mirror `tensorflow_model_optimization`'s schedules of the same
names and arguments (which speak of *sparsity* = 1 - density), so code written
for tfmot ports unchanged; `MagnitudePruning` also accepts tfmot's own objects.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sparse_moe import validation

__all__ = ["ConstantSparsity", "PolynomialDecay", "PruningSchedule"]


def _check_sparsity(value, name, owner, allow_zero=True):
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    expected = f"a float in {interval} (the fraction of weights removed; density = 1 - {name})"
    low = 0.0 if allow_zero else np.nextafter(0.0, 1.0)
    return validation.check_float(name, value, owner, expected, lambda v: low <= v < 1)


def _check_step(value, name, owner, allow_negative=False):
    if allow_negative and validation.is_int(value) and value == -1:
        return -1
    return validation.check_int(name, value, owner, minimum=0)


class PruningSchedule:
    """Base class: `schedule(step)` returns `(should_prune, density)`."""

    def __init__(self, begin_step, end_step, frequency):
        owner = type(self).__name__
        self.begin_step = _check_step(begin_step, "begin_step", owner)
        self.end_step = _check_step(end_step, "end_step", owner, allow_negative=True)
        self.frequency = _check_step(frequency, "frequency", owner)
        if self.frequency < 1:
            raise ValueError(
                f"`{owner}` got an invalid `frequency`. Expected a positive int. "
                f"Received: frequency={frequency}"
            )
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ValueError(
                f"`{owner}` needs end_step >= begin_step (or -1 for no end). "
                f"Received: begin_step={begin_step}, end_step={end_step}"
            )

    def should_prune(self, step: int) -> bool:
        in_range = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        return bool(in_range and (step - self.begin_step) % self.frequency == 0)

    def density(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int):
        return self.should_prune(int(step)), self.density(int(step))

    def get_config(self):
        return {
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class ConstantSparsity(PruningSchedule):
    """Prunes to a fixed `target_sparsity` every `frequency` steps in range.

    Examples:
        >>> s = ConstantSparsity(0.9, begin_step=0, frequency=10)
        >>> [(update, round(density, 6)) for update, density in (s(20), s(25))]
        [(True, 0.1), (False, 0.1)]
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        super().__init__(begin_step, end_step, frequency)
        self.target_sparsity = _check_sparsity(
            target_sparsity, "target_sparsity", "ConstantSparsity", allow_zero=False
        )

    def density(self, step):
        return 1.0 - self.target_sparsity

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, **super().get_config()}


@keras.saving.register_keras_serializable(package="keras_sparse_moe")
class PolynomialDecay(PruningSchedule):
    """Gradual magnitude pruning schedule of Zhu & Gupta (2017).

    Sparsity grows from `initial_sparsity` at `begin_step` to `final_sparsity`
    at `end_step` as `s_t = s_f + (s_i - s_f) * (1 - p)^power`, where
    `p = (t - begin_step) / (end_step - begin_step)`; pruning happens every
    `frequency` steps in that range.

    Examples:
        >>> s = PolynomialDecay(0.0, 0.9, begin_step=0, end_step=100, frequency=50)
        >>> [(p, round(d, 4)) for p, d in (s(0), s(50), s(100))]
        [(True, 1.0), (True, 0.2125), (True, 0.1)]
    """

    def __init__(
        self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100
    ):
        super().__init__(begin_step, end_step, frequency)
        owner = "PolynomialDecay"
        if self.end_step == -1 or self.end_step == self.begin_step:
            raise ValueError(
                f"`{owner}` needs end_step > begin_step. "
                f"Received: begin_step={begin_step}, end_step={end_step}"
            )
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity", owner)
        self.final_sparsity = _check_sparsity(
            final_sparsity, "final_sparsity", owner, allow_zero=False
        )
        self.power = validation.check_float(
            "power", power, owner, "a positive number", lambda p: p > 0
        )

    def density(self, step):
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        progress = min(1.0, max(0.0, progress))
        sparsity = (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power
        )
        return 1.0 - sparsity

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "power": self.power,
            **super().get_config(),
        }
