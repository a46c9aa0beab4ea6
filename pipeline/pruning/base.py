"""The interface every pruning method implements (one subclass per module, picked by `_target_`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.pruning.masks import Masks


def n_pruned(target: float, pool: int) -> int:
    """How many of `pool` units a prune rate removes (never more than the rate says)."""
    return min(pool, math.floor(target * pool + 1e-9))


def keep_largest(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Boolean mask (same shape as scores) that drops the n_prune smallest; ties go by position."""
    flat = np.asarray(scores).reshape(-1)
    keep = np.ones(flat.size, bool)
    if n_prune > 0:  # a stable argsort's first n_prune, found in linear time (masks are recomputed mid-training)
        cut = np.partition(flat, n_prune - 1)[n_prune - 1]
        nan = flat != flat  # NaN sorts last, as in argsort
        below, tied = (~nan, nan) if cut != cut else (flat < cut, flat == cut)
        keep[below] = False
        keep[np.flatnonzero(tied)[:n_prune - np.count_nonzero(below)]] = False
    return keep.reshape(np.shape(scores))


def keep_largest_graph(scores, n_prune):
    """keep_largest in TensorFlow, for a compiled loop: the same mask. The n_prune largest of -scores, where
    top_k takes the lower index of equal values first, as keep_largest's stable order does (and NaN, there
    last, is kept as the largest), in about half the time of a stable argsort. Scores that are never negative
    (magnitudes) put their zeros first: a schedule's weights pruned so far are those, so the top_k runs over
    the others only, for the few more each step prunes (about half the time again)."""
    import tensorflow as tf

    scores = tf.where(tf.math.is_nan(scores), tf.constant(float("inf"), scores.dtype), scores)
    zero = tf.equal(scores, 0)
    n_zero = tf.reduce_sum(tf.cast(zero, tf.int32))

    def smallest(among, n):  # the mask without the n lowest (score, index) of the indices `among`
        pruned = tf.gather(among, tf.math.top_k(-tf.gather(scores, among), n, sorted=False).indices)
        return pruned[:, None]

    def anywhere():
        pruned = smallest(tf.range(tf.size(scores)), n_prune)
        return tf.tensor_scatter_nd_update(tf.ones_like(zero), pruned, tf.zeros_like(pruned[:, 0], tf.bool))

    def after_zeros():
        pruned = smallest(tf.cast(tf.where(~zero)[:, 0], tf.int32), n_prune - n_zero)
        return tf.tensor_scatter_nd_update(~zero, pruned, tf.zeros_like(pruned[:, 0], tf.bool))

    return tf.cond((tf.reduce_min(scores) >= 0) & (n_zero <= n_prune), after_zeros, anywhere)


@dataclass(frozen=True)
class InGraph:
    """A method's masks() as TensorFlow ops, run inside the compiled training loop at each of a schedule's steps.

    `keep(weights, counts)`: from the current values of the weights named by `paths` (in that order), the
    masks (bool, one per weight) that drop counts[i] weights of the method's pool i; `counts(target)`: how
    many each pool loses at a target rate, on the host, exactly as masks() counts; `key`: what the ops
    depend on besides the model (compiled loops are cached by it)."""

    paths: tuple[str, ...]
    key: str
    counts: Callable[[float], list[int]]
    keep: Callable


@dataclass
class PruningMethod:
    """Turns a trained model and a target prune rate into masks (True = kept)."""

    name: str = "method"

    def masks(self, model, target: float, seed: int = 0) -> Masks:
        raise NotImplementedError

    def in_graph(self, model) -> InGraph | None:
        """masks() as TensorFlow ops (see InGraph), where the method has them: then a schedule's updates run
        inside the compiled loop; otherwise the loop stops at each update for masks()."""
        return None

    def check(self, schedule) -> None:
        """Raise a ConfigError if this method cannot prune to the schedule's target (checked at start-up)."""

    def bind(self, data) -> None:
        """Hand the method the job's data before masks(): criteria such as taylor score on a training batch."""
        self.data = data

    def penalty(self, model) -> dict | None:
        """The training-time regularizer this method adds to the baseline, if any (part of its identity)."""
        return None

    def regularize(self, model) -> None:
        """Add the training-time regularizer to the model's variables (before baseline training)."""
