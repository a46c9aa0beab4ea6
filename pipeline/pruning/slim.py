"""Network slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales during baseline training,
then one global threshold on |gamma| removes the target fraction of channels, over every group of
coupled conv channels (a group with several BatchNorms, e.g. a residual stage: their mean |gamma|).
Groups without BatchNorm score each channel by the L2 norm of its filters, as the study did."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import require
from pipeline.pruning.base import PruningMethod, keep_largest
from pipeline.pruning.channel import global_counts
from pipeline.pruning.graph import all_layers, channel_groups
from pipeline.pruning.masks import merge


def _batchnorms(model) -> list:
    return [layer for layer in all_layers(model) if type(layer).__name__ == "BatchNormalization" and layer.scale]


@dataclass
class Slim(PruningMethod):
    name: str = "slim"
    penalty_l1: float = 1e-4  # lambda of the L1 penalty on BatchNorm scales

    def __post_init__(self):
        require(self.penalty_l1 >= 0, "penalty_l1", self.penalty_l1, "a number >= 0")

    def penalty(self, model):
        return {"slim_l1": self.penalty_l1} if _batchnorms(model) and self.penalty_l1 > 0 else None

    def regularize(self, model):
        import keras

        if self.penalty(model):
            for bn in _batchnorms(model):
                bn.gamma.regularizer = keras.regularizers.L1(self.penalty_l1)

    @staticmethod
    def scores(group) -> np.ndarray:
        if group.scales:
            return np.mean([s.per_channel(group.size, lambda r: np.abs(r).sum(axis=1)) for s in group.scales], axis=0)
        return np.sqrt(sum(s.per_channel(group.size, lambda r: (r ** 2).sum(axis=1)) for s in group.producers))

    def masks(self, model, target, seed=0):
        groups = [g for g in channel_groups(model) if g.convolutional]
        scores = [self.scores(g) for g in groups]
        counts = global_counts(scores, target)  # never every channel of a group
        return merge(*(g.masks(keep_largest(s, n)) for g, s, n in zip(groups, scores, counts)))
