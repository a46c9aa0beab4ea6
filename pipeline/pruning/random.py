"""Random pruning: the same count over the same pool as global magnitude, chosen at random.
The baseline any pruning criterion has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.pruning.base import PruningMethod, n_pruned
from pipeline.pruning.graph import kernels


@dataclass
class Random(PruningMethod):
    name: str = "random"

    def masks(self, model, target, seed=0):
        variables = [var for _, _, var in kernels(model)]
        sizes = [int(np.prod(k.shape)) for k in variables]
        keep = np.ones(sum(sizes), bool)
        keep[np.random.default_rng(seed).permutation(keep.size)[: n_pruned(target, keep.size)]] = False
        bounds = np.cumsum([0] + sizes)
        return {k.path: keep[a:b].reshape(k.shape) for k, a, b in zip(variables, bounds, bounds[1:])}
