"""Masks: one boolean array per pruned weight (True = kept), keyed by the weight's path.

Masks are enforced inside every compiled training step: each masked variable gets a constraint that
multiplies it by its mask, and Keras optimizers apply constraints right after each update. A pruned
weight therefore never becomes non-zero, not even between two batches.
"""

from __future__ import annotations

import numpy as np

Masks = dict[str, np.ndarray]


def merge(*mask_sets: Masks) -> Masks:
    """Combine mask sets: a weight is kept only if every set keeps it."""
    out: Masks = {}
    for masks in mask_sets:
        for path, m in masks.items():
            out[path] = out[path] & m if path in out else np.asarray(m, bool).copy()
    return out


def variables_by_path(model) -> dict:
    return {v.path: v for v in model.weights}


_assign = _where = None


def assign_all(variables, values) -> None:
    """variables[i] = values[i] (arrays or variables), in one compiled call: an eager assign each costs more
    than a whole copy; traced once per list of shapes, whatever the variables."""
    global _assign
    if _assign is None:
        import tensorflow as tf

        _assign = tf.function(lambda dst, src: [d.assign(s) for d, s in zip(dst, src)])
    _assign([v.value for v in variables], [getattr(x, "value", x) for x in values])


def zero_pruned(variables, masks) -> None:
    """Set to exactly 0 each element of variables[i] that the mask variable masks[i] prunes (is 0 in)."""
    global _where
    if _where is None:
        import tensorflow as tf

        _where = tf.function(lambda ws, ms: [w.assign(tf.where(m != 0, w, tf.zeros_like(w))) for w, m in zip(ws, ms)])
    _where([v.value for v in variables], [m.value for m in masks])


class MaskConstraint:
    """Multiplies a variable by its mask; the mask is a variable, so masks can change between steps."""

    def __init__(self, mask_variable):
        self.mask = mask_variable

    def __call__(self, w):
        return w * self.mask  # the mask variable has the weight's dtype: one multiply, no cast


class MaskedModel:
    """Attaches masks to a model's variables as constraints and keeps them in step."""

    def __init__(self, model, masks: Masks):
        import keras

        self.model = model
        self.variables = variables_by_path(model)
        unknown = sorted(set(masks) - set(self.variables))
        if unknown:
            raise KeyError(f"masks name weights the model lacks: {unknown}")
        self.mask_vars = {}
        for path, m in masks.items():
            var = self.variables[path]
            self.mask_vars[path] = keras.Variable(np.asarray(m, var.dtype), trainable=False,
                                                  name=path.replace("/", "_") + "_mask")
            var.constraint = MaskConstraint(self.mask_vars[path])
        model.train_function = None  # a step traced before the constraints existed would ignore them
        self.masks = {p: np.asarray(m, bool).copy() for p, m in masks.items()}
        self.apply()

    def update(self, masks: Masks) -> None:
        """Replace the masks (pruned weights stay pruned) and zero what they prune now."""
        self.masks = merge(self.masks, masks)
        assign_all([self.mask_vars[p] for p in self.masks],
                   [m.astype(self.mask_vars[p].dtype) for p, m in self.masks.items()])
        self.apply()

    def apply(self) -> None:
        zero_pruned([self.variables[p] for p in self.masks], [self.mask_vars[p] for p in self.masks])

    def detach(self) -> None:
        for path in self.masks:
            self.variables[path].constraint = None
        self.model.train_function = None


def save_masks(masks: Masks, path) -> None:
    np.savez_compressed(path, **{k: np.asarray(v, bool) for k, v in masks.items()})


def load_masks(path) -> Masks:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k].astype(bool) for k in f.files}
