"""Magnitude pruning (Han et al. 2015): drop the smallest |w| of all kernels: conv (every kind:
depthwise, separable, transposed) and dense, nested models included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import require
from pipeline.pruning.base import InGraph, PruningMethod, keep_largest, keep_largest_graph, n_pruned
from pipeline.pruning.graph import kernels


@dataclass
class Magnitude(PruningMethod):
    name: str = "magnitude"
    scope: str = "global"  # one threshold over all kernels, or "layer": one per kernel

    def __post_init__(self):
        require(self.scope in ("global", "layer"), "scope", self.scope, "global or layer")

    def in_graph(self, model):
        variables = [var for _, _, var in kernels(model)]
        sizes = [int(np.prod(v.shape)) for v in variables]
        pools = sizes if self.scope == "layer" else [sum(sizes)]

        def keep(weights, counts):
            import tensorflow as tf

            scores = [tf.reshape(tf.abs(w), [-1]) for w in weights]
            if self.scope == "layer":
                kept = [keep_largest_graph(s, counts[i]) for i, s in enumerate(scores)]
            else:
                kept = tf.split(keep_largest_graph(tf.concat(scores, 0), counts[0]), sizes)
            return [tf.reshape(k, tf.shape(w)) for k, w in zip(kept, weights)]

        return InGraph(tuple(v.path for v in variables), f"magnitude/{self.scope}",
                       lambda target: [n_pruned(target, n) for n in pools], keep)

    def masks(self, model, target, seed=0):
        variables = [var for _, _, var in kernels(model)]
        weights = [np.abs(k.numpy()) for k in variables]
        if self.scope == "layer":
            return {k.path: keep_largest(w, n_pruned(target, w.size)) for k, w in zip(variables, weights)}
        flat = np.concatenate([w.reshape(-1) for w in weights])
        keep = keep_largest(flat, n_pruned(target, flat.size))
        bounds = np.cumsum([0] + [w.size for w in weights])
        return {k.path: keep[a:b].reshape(w.shape) for k, w, a, b in zip(variables, weights, bounds, bounds[1:])}
