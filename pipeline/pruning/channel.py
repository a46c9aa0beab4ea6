"""Channel pruning on every group of coupled channels, with a swappable importance criterion (l1, l2, bn,
taylor, fpgm, random; pipeline.pruning.importance), per group (`scope: layer`) or one ranking over all
groups (`scope: global`), kept counts rounded up to a multiple of `round_to` (8 suits hardware)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import require
from pipeline.pruning.base import PruningMethod, keep_largest, n_pruned
from pipeline.pruning.graph import channel_groups
from pipeline.pruning.importance import AGGREGATES, IMPORTANCES
from pipeline.pruning.masks import merge


def kept_count(size: int, n_prune: int, round_to: int = 1) -> int:
    """Channels a group keeps: at least one, rounded up to a multiple of round_to (at most all)."""
    kept = max(1, size - n_prune)
    return min(size, -(-kept // round_to) * round_to)


def global_counts(scores: list[np.ndarray], target: float) -> list[int]:
    """How many channels each group loses when the target fraction of all channels goes, lowest score
    first (ties by group, then position), never a group's last channel."""
    order = sorted((s, gi, c) for gi, sc in enumerate(scores) for c, s in enumerate(sc))
    counts, todo = [0] * len(scores), n_pruned(target, len(order))
    for _, gi, _ in order:
        if todo == 0:
            break
        if counts[gi] < len(scores[gi]) - 1:
            counts[gi] += 1
            todo -= 1
    return counts


@dataclass
class Channel(PruningMethod):
    name: str = "channel"
    importance: str = "l1"  # l1 | l2 | bn | taylor | fpgm | random
    scope: str = "layer"  # layer: the target in each group; global: one ranking over every group
    round_to: int = 1  # kept channel counts are multiples of this (or the whole group)
    aggregate: str = "mean"  # how a group's per-layer scores combine: mean | sum | max

    def __post_init__(self):
        require(self.importance in IMPORTANCES, "importance", self.importance, f"one of {', '.join(IMPORTANCES)}")
        require(self.scope in ("layer", "global"), "scope", self.scope, "layer or global")
        require(isinstance(self.round_to, int) and self.round_to >= 1, "round_to", self.round_to, "an integer >= 1")
        require(self.aggregate in AGGREGATES, "aggregate", self.aggregate, f"one of {', '.join(AGGREGATES)}")

    def scores(self, model, groups, seed: int) -> list[np.ndarray]:
        """Each group's channel importance; a channel already removed (all its weights zero) scores lowest."""
        criterion = IMPORTANCES[self.importance](aggregate=self.aggregate)
        criterion.prepare(model, getattr(self, "data", None), seed)
        out = []
        for g in groups:
            s = np.asarray(criterion(g), float).copy()
            s[~g.alive()] = -np.inf
            out.append(s)
        return out

    def masks(self, model, target, seed=0):
        groups = channel_groups(model)
        scores = self.scores(model, groups, seed)
        counts = (global_counts(scores, target) if self.scope == "global"
                  else [n_pruned(target, g.size) for g in groups])
        return merge(*(g.masks(keep_largest(s, g.size - kept_count(g.size, n, self.round_to)))
                       for g, s, n in zip(groups, scores, counts)))
