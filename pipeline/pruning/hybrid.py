"""The study's hybrid: within each conv filter, drop the target fraction of its smallest |w|."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.pruning.base import PruningMethod, keep_largest, n_pruned
from pipeline.pruning.graph import conv_layers


@dataclass
class Hybrid(PruningMethod):
    name: str = "hybrid"

    def masks(self, model, target, seed=0):
        out = {}
        for layer in conv_layers(model):
            w = np.abs(layer.kernel.numpy())
            per_filter = w.reshape(-1, w.shape[-1])  # (kh * kw * cin, filters)
            k = n_pruned(target, per_filter.shape[0])
            keep = np.stack([keep_largest(per_filter[:, f], k) for f in range(w.shape[-1])], axis=-1)
            out[layer.kernel.path] = keep.reshape(w.shape)
        return out
