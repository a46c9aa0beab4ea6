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


_assign = _hold = None


def assign_all(variables, values) -> None:
    """variables[i] = values[i] (arrays or variables), in one compiled call: an eager assign each costs more
    than a whole copy; traced once per list of shapes, whatever the variables."""
    global _assign
    if _assign is None:
        import tensorflow as tf

        _assign = tf.function(lambda dst, src: [d.assign(s) for d, s in zip(dst, src)])
    _assign([v.value for v in variables], [getattr(x, "value", x) for x in values])


def hold(variables: dict, masks: Masks) -> None:
    """For each path of `masks`: set the mask of variables[path] (its MaskConstraint's variable) to it and
    zero what it prunes, in one compiled call."""
    import tensorflow as tf

    global _hold
    if _hold is None:

        def hold_all(weights, mask_vars, values):
            for w, m, value in zip(weights, mask_vars, values):
                m.assign(value)
                w.assign(tf.where(value != 0, w, tf.zeros_like(w)))

        _hold = tf.function(hold_all)
    weights = [variables[p] for p in masks]
    _hold([w.value for w in weights], [w.constraint.mask.value for w in weights],
          [tf.constant(m, w.dtype) for w, m in zip(weights, masks.values())])  # tensors: cheaper to pass


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
        for path, m in masks.items():
            var = self.variables[path]
            var.constraint = MaskConstraint(keras.Variable(np.asarray(m, var.dtype), trainable=False,
                                                           name=path.replace("/", "_") + "_mask"))
        model.train_function = None  # a step traced before the constraints existed would ignore them
        self.masks = {p: np.asarray(m, bool).copy() for p, m in masks.items()}
        self.apply()

    def merge(self, masks: Masks) -> Masks:
        """The masks with `masks` merged in (pruned weights stay pruned), without touching the model."""
        self.masks = merge(self.masks, masks)
        return self.masks

    def sync(self) -> None:
        """Merge in what the mask variables hold: a compiled loop may have grown them itself."""
        self.merge({p: self.variables[p].constraint.mask.numpy() != 0 for p in self.masks})

    def update(self, masks: Masks) -> None:
        """Merge `masks` in and zero what the masks prune now."""
        hold(self.variables, self.merge(masks))

    def apply(self) -> None:
        hold(self.variables, self.masks)

    def detach(self) -> None:
        for path in self.masks:
            self.variables[path].constraint = None
        self.model.train_function = None


def save_masks(masks: Masks, path) -> None:
    np.savez_compressed(path, **{k: np.asarray(v, bool) for k, v in masks.items()})


def load_masks(path) -> Masks:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k].astype(bool) for k in f.files}
