"""L1-norm filter pruning (Li et al. 2017): in each group of coupled conv channels (a conv layer's, or a
whole residual stage's), drop the filters of smallest L1 norm (summed over the group's coupled
producers), with what they feed forward (bias, BatchNorm, depthwise slices, the consumers' input
channels). As in the paper, conv filters only: hidden dense units are the `channel` method's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import require
from pipeline.pruning.base import PruningMethod, keep_largest, n_pruned
from pipeline.pruning.graph import channel_groups
from pipeline.pruning.masks import merge


def l1(group) -> np.ndarray:
    """The L1 norm of each channel's filters, over every producer of the group."""
    return sum(s.per_channel(group.size, lambda rows: np.abs(rows).sum(axis=1)) for s in group.producers)


def filter_groups(model) -> list:
    """The groups this method prunes: those a conv layer produces (sensitivity scans them too)."""
    return [g for g in channel_groups(model) if g.convolutional]


@dataclass
class Filter(PruningMethod):
    name: str = "filter"
    ratios: dict[str, float] | None = None  # per-group prune rates (by group name) overriding the target

    def __post_init__(self):
        self.ratios = dict(self.ratios or {})
        for layer, ratio in self.ratios.items():
            require(0 <= ratio < 1, f"ratios.{layer}", ratio, "a number in [0, 1)")

    def masks(self, model, target, seed=0):
        groups = filter_groups(model)
        unknown = set(self.ratios) - {g.name for g in groups}
        if unknown:
            raise ValueError(f"method.ratios names layers without prunable filters: {sorted(unknown)}; "
                             f"allowed: {[g.name for g in groups]}")
        sets = []
        for g in groups:
            n = min(n_pruned(self.ratios.get(g.name, target), g.size), g.size - 1)
            sets.append(g.masks(keep_largest(l1(g), n)))
        return merge(*sets)
