"""Sparsity schedules (the `sparsity` config group): the prune rate over fine-tuning.

`initial` is what the prune stage prunes to; `update_at(step, total)` says when fine-tuning must
recompute the masks and at which rate (None: keep the masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import require


@dataclass
class Schedule:
    name: str = "one_shot"
    target: float = 0.5
    changes_masks: ClassVar[bool] = False  # does fine-tuning need to follow update_at?

    def __post_init__(self):
        require(0 <= self.target < 1, "target", self.target, "a number in [0, 1)")

    @property
    def initial(self) -> float:
        return self.target

    def update_at(self, step: int, total: int) -> float | None:
        return None


@dataclass
class OneShot(Schedule):
    """Prune once to the target, then fine-tune."""

    name: str = "one_shot"


@dataclass
class Iterative(Schedule):
    """Reach the target in `rounds` prune -> fine-tune rounds of equal length (Han et al. 2015)."""

    name: str = "iterative"
    changes_masks: ClassVar[bool] = True
    rounds: int = 3

    def __post_init__(self):
        super().__post_init__()
        require(self.rounds > 0, "rounds", self.rounds, "an integer > 0")

    @property
    def initial(self):
        return self.target / self.rounds

    def update_at(self, step, total):
        for k in range(self.rounds - 1, 0, -1):  # the latest round wins when rounds share a step
            if step == k * total // self.rounds:
                return self.target * (k + 1) / self.rounds
        return None


@dataclass
class Gradual(Schedule):
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f)(1 - t/T)^3 between fractions `begin` and `end` of
    fine-tuning, masks recomputed every `frequency` steps; the rest fine-tunes at the target."""

    name: str = "gradual"
    changes_masks: ClassVar[bool] = True
    initial_sparsity: float = 0.0
    begin: float = 0.0
    end: float = 0.6
    frequency: int = 10

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.initial_sparsity <= self.target, "initial_sparsity", self.initial_sparsity,
                "a number in [0, target]")
        require(0 <= self.begin < self.end <= 1, "begin/end", (self.begin, self.end), "0 <= begin < end <= 1")
        require(self.frequency > 0, "frequency", self.frequency, "an integer > 0")

    @property
    def initial(self):
        return self.initial_sparsity

    def window(self, total: int) -> tuple[int, int]:
        """First and last step of the ramp; the last is never past the final step of fine-tuning."""
        last = max(total - 1, 0)
        begin = min(int(self.begin * total), last)
        return begin, min(max(begin + 1, int(self.end * total)), last)

    def sparsity(self, step: int, total: int) -> float:
        begin, end = self.window(total)
        t = min(max((step - begin) / (end - begin), 0.0), 1.0) if end > begin else float(step >= end)
        return self.target + (self.initial_sparsity - self.target) * (1 - t) ** 3

    def update_at(self, step, total):
        begin, end = self.window(total)
        if step == end or (begin <= step < end and (step - begin) % self.frequency == 0):
            return self.sparsity(step, total)
        return None
