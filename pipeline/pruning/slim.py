"""Network slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales during baseline training,
then one global threshold on |gamma| removes the target fraction of channels. Models without
BatchNorm score each conv output channel by the L2 norm of its kernel, as the study did."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import require
from pipeline.pruning.base import PruningMethod, n_pruned
from pipeline.pruning.graph import channel_groups
from pipeline.pruning.masks import merge


def _batchnorms(model) -> list:
    return [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization" and layer.scale]


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
        if group.norms:
            return np.abs(group.norms[0].gamma.numpy())
        return np.sqrt((group.conv.kernel.numpy() ** 2).sum(axis=(0, 1, 2)))

    def masks(self, model, target, seed=0):
        groups = channel_groups(model)
        scores = [self.scores(g) for g in groups]
        order = sorted((s, gi, c) for gi, sc in enumerate(scores) for c, s in enumerate(sc))
        keep = [np.ones(g.size, bool) for g in groups]
        todo = n_pruned(target, len(order))
        for _, gi, c in order:
            if todo == 0:
                break
            if keep[gi].sum() > 1:  # never remove every channel of a layer
                keep[gi][c] = False
                todo -= 1
        return merge(*(g.masks(k) for g, k in zip(groups, keep)))
