"""Channel importance criteria: small, swappable scorers of a group's channels (as in Torch-Pruning).

Each criterion scores the channels once per coupled layer (`layer_scores`), every layer's scores are
normalised by their mean (so layers of different widths and scales weigh alike), and the group's
importance is their aggregate (mean by default). Higher = more important = kept.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.data import first_batch

AGGREGATES = {"mean": np.mean, "sum": np.sum, "max": np.max}


@dataclass
class Importance:
    aggregate: str = "mean"

    def prepare(self, model, data, seed: int) -> None:
        """Compute what scoring needs from the model and data (once per masks() call)."""

    def layer_scores(self, group) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(self, group) -> np.ndarray:
        scores = [np.asarray(s, float) for s in self.layer_scores(group)]
        normalised = [s / s.mean() if s.mean() > 0 else s for s in scores]
        return AGGREGATES[self.aggregate](np.stack(normalised), axis=0)


def _norms(group, p: int) -> list[np.ndarray]:
    """The p-norm of each producer's filters, per channel."""
    power = [s.per_channel(group.size, lambda rows: (np.abs(rows) ** p).sum(axis=1)) for s in group.producers]
    return [x ** (1 / p) for x in power]


class L1(Importance):
    """The L1 norm of each coupled producer's filter (Li et al. 2017)."""

    def layer_scores(self, group):
        return _norms(group, 1)


class L2(Importance):
    def layer_scores(self, group):
        return _norms(group, 2)


class BN(Importance):
    """|gamma| of each BatchNorm on the group (Liu et al. 2017); a group without one: the L2 norm."""

    def layer_scores(self, group):
        scales = [s.per_channel(group.size, lambda rows: np.abs(rows).sum(axis=1)) for s in group.scales]
        return scales or _norms(group, 2)


class Taylor(Importance):
    """|w * dL/dw| summed over each producer's filter (Molchanov et al. 2019), on a batch of the training
    data: the first `batch` examples of the training split, so the same data gives the same scores."""

    batch: int = 64

    def prepare(self, model, data, seed):
        import keras
        import tensorflow as tf

        if data is None:
            raise ValueError("importance=taylor needs the job's training data: call method.bind(data) first")
        x, y = first_batch(data.examples("train"), self.batch)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
        variables = model.trainable_variables
        self.products = {v.path: (v.numpy() * g.numpy()) if g is not None else np.zeros(v.shape)
                         for v, g in zip(variables, tape.gradient(loss, variables))}

    def layer_scores(self, group):
        return [s.per_channel(group.size, lambda rows: np.abs(rows).sum(axis=1), self.products[s.path])
                for s in group.producers]


class FPGM(Importance):
    """Distance of each filter to the others (He et al. 2019): filters near the geometric median are the
    most replaceable, so the smallest summed distance goes first."""

    def layer_scores(self, group):
        out = []
        for s in group.producers:
            channel, rows = s.rows()
            filters = np.zeros((group.size, rows.shape[1]))
            filters[channel] = rows
            sq = (filters ** 2).sum(axis=1)
            dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * filters @ filters.T, 0)
            out.append(np.sqrt(dist2).sum(axis=1))
        return out


class Random(Importance):
    """Uniform random scores, seeded by the job's seed and the group's name."""

    def prepare(self, model, data, seed):
        self.seed = seed

    def layer_scores(self, group):
        return [np.random.default_rng([self.seed, zlib.crc32(group.name.encode())]).random(group.size)]


IMPORTANCES = {"l1": L1, "l2": L2, "bn": BN, "taylor": Taylor, "fpgm": FPGM, "random": Random}
