"""Precise BatchNorm (Wu & Johnson 2021): after a phase's training, each BatchNormalization layer's moving mean
and variance become the average of its per-batch statistics over the first training images.

Keras's moving averages (momentum 0.99; 0.999 in MobileNetV2 and V3) need thousands of steps to forget their
initial values; a small data set gives tens per epoch, so a model can train to high accuracy and still
evaluate at chance. Recomputing the statistics costs one forward pass over a few thousand images.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from pipeline.pruning.graph import all_layers
from pipeline.stages.evaluate import test_metrics

log = logging.getLogger("pipeline")


def recalibrated_layers(model) -> list:
    """The BatchNormalization layers whose statistics training updates (trainable, without renorm, whose
    moving averages are of another kind)."""
    return [layer for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and not layer.renorm]


def recalibrate(model, data, images: int, batch_size: int) -> int:
    """Set every recalibrated layer's moving statistics to the mean of its batch statistics over the first
    `images` training images (in order, not augmented, in batches of `batch_size`), the model running in
    training mode so that each layer sees what it sees in training. Nothing else changes (weights, masks,
    any other layer's state). Returns the number of images used (0: off, or no BatchNorm)."""
    import tensorflow as tf

    norms = recalibrated_layers(model) if images > 0 else []
    if not norms:
        return 0
    stats = [v for layer in norms for v in (layer.moving_mean, layer.moving_variance)]
    state = model.non_trainable_variables  # the statistics and e.g. a dropout's seed: restored, then ours set
    kept, momenta = [v.numpy() for v in state], [layer.momentum for layer in norms]
    batches = data.examples("train").take(images).batch(batch_size)
    # traced with momentum 0: after each batch, a layer's moving statistics are that batch's
    forward = tf.function(lambda x: model(x, training=True), input_signature=[batches.element_spec[0]])
    sums, n, seen = [np.zeros(v.shape, "float64") for v in stats], 0, 0
    try:
        for layer in norms:
            layer.momentum = 0.0
        for x, _ in batches:
            forward(x)
            for total, var in zip(sums, stats):
                total += var.numpy()
            n, seen = n + 1, seen + len(x)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for var, value in zip(state, kept):
            var.assign(value)
    for var, total in zip(stats, sums):
        var.assign((total / n).astype(var.dtype))
    log.debug("BatchNorm statistics of %d layers recomputed on %d training images", len(norms), seen)
    return seen


def after_phase(model, data, history: dict[str, list[float]], images: int, batch_size: int) -> None:
    """recalibrate() at the end of a training phase; where it changed the model, the last epoch's validation
    figures in `history` become the recalibrated model's, so that they describe the model the phase hands on
    (a sweep's objective is the last finetune/val_accuracy)."""
    if not recalibrate(model, data, images, batch_size) or not history.get("val_accuracy"):
        return
    val = test_metrics(model, data, split="val")
    history["val_loss"][-1], history["val_accuracy"][-1] = val["loss"], val["accuracy"]
