"""The study's hybrid: within each conv filter, drop the target fraction of its smallest |w|.
A filter is what makes one output channel (graph.Kernel.filter_axes): a conv's kernel[..., o], a
depthwise kernel's [:, :, c, j], a transposed conv's kernel[:, :, o, :], a separable conv's two kernels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.pruning.base import PruningMethod, keep_largest, n_pruned
from pipeline.pruning.graph import by_filter, from_filters, kernels


@dataclass
class Hybrid(PruningMethod):
    name: str = "hybrid"

    def masks(self, model, target, seed=0):
        out = {}
        for _, kind, var in kernels(model):
            if not kind.conv:
                continue
            per_filter = by_filter(np.abs(var.numpy()), kind)  # (weights of one filter, filters)
            k = n_pruned(target, per_filter.shape[0])
            keep = np.stack([keep_largest(per_filter[:, f], k) for f in range(per_filter.shape[1])], axis=-1)
            out[var.path] = from_filters(keep, tuple(var.shape), kind)
        return out
