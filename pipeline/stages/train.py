"""Training: the dense baseline, and the shared fit used by fine-tuning."""

from __future__ import annotations

import logging
import math
import time
import zlib

import keras
import numpy as np

from pipeline.config import Phase
from pipeline.stages import optimizers
from pipeline.stages.recalibrate import after_phase

log = logging.getLogger("pipeline")
PROGRESS_AFTER_S = 10.0  # log each epoch of a phase expected to take longer than this (seconds)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopOnNonFinite(keras.callbacks.Callback):
    """Checks the loss once per epoch: a NaN or infinity persists in the epoch's mean, and an
    epoch-level check costs no per-batch host sync."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f"{self.stage} loss became {float(loss)} in epoch {epoch + 1}")


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to its logs, so histories (and MLflow) carry `seconds` per epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = time.perf_counter() - self.start


class Progress(keras.callbacks.Callback):
    """One log line per epoch (stage, epoch i/N, loss, accuracy, val_accuracy, seconds) in a phase whose
    epochs after the first (which traces the graph, slow on a busy machine) are expected to take more than
    `after_s` seconds: judged at the end of each epoch from the second on, as their time so far plus this
    epoch's time for each epoch left. Once loud, every epoch is logged, the last one included; short
    phases (tests, tiny sweeps) and single-epoch phases stay quiet."""

    def __init__(self, stage: str, after_s: float):
        super().__init__()
        self.stage, self.after_s, self.loud = stage, after_s, False

    def on_train_begin(self, logs=None):
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now, done, total = time.perf_counter(), epoch + 1, self.params["epochs"]
        seconds, self.last = now - self.last, now
        if done == 1:
            self.first_end = now
            return
        self.loud = self.loud or now - self.first_end + (total - done) * seconds > self.after_s
        if self.loud:
            values = [(logs or {}).get(k, math.nan) for k in ("loss", "accuracy", "val_accuracy")]
            log.info("%s epoch %d/%d: loss %.4f, accuracy %.4f, val_accuracy %.4f, %.1fs", self.stage, done, total,
                     *values, seconds)


def learning_rate(phase: Phase, total_steps: int):
    """phase.lr as phase.schedule shapes it over the phase's total_steps (optimizer steps)."""
    if phase.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(phase.lr, decay_steps=max(1, total_steps))
    if phase.schedule == "step":  # steps 0..b0 at values[0], b0+1..b1 at values[1], then values[2]
        first = max(1, total_steps // 2) - 1
        boundaries = [first, max(first + 1, total_steps * 3 // 4 - 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [phase.lr, phase.lr / 10, phase.lr / 100])
    return phase.lr


JIT_COMPILE: bool | str = "auto"  # training.jit_compile of the running job (configure)


def configure(training) -> None:
    """The job's numerics, process-wide (a worker runs jobs one after another): Keras's dtype policy
    (float32, or mixed_float16/mixed_bfloat16: float32 variables, so masks and pruned zeros stay exact;
    compile adds loss scaling for float16), set before any model is built, and XLA for compile_model."""
    global JIT_COMPILE
    keras.mixed_precision.set_global_policy(training.mixed_precision or "float32")
    JIT_COMPILE = "auto" if training.jit_compile is None else training.jit_compile


def compile_model(model, phase: Phase, total_steps: int = 0) -> None:
    """Compile for the phase; a schedule other than constant needs the phase's total_steps."""
    lr = learning_rate(phase, total_steps)
    if phase.optimizer == "sgd":
        opt = optimizers.SGD(lr, momentum=phase.momentum, weight_decay=phase.weight_decay or None)
    else:
        opt = optimizers.Adam(lr, weight_decay=phase.weight_decay or None)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=JIT_COMPILE)


def _augmented(x, noise, crop: int, flip: bool):
    """One training image, randomly cropped from its copy zero-padded by `crop` pixels and flipped left-right
    when `flip`; stateless ops seeded by the example's `noise`, so a fixed seed gives the same batches."""
    import tensorflow as tf

    if crop:
        padded = tf.pad(x, [[crop, crop], [crop, crop], [0, 0]])
        x = tf.image.stateless_random_crop(padded, tf.shape(x), seed=tf.stack([noise, 0]))
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seed=tf.stack([noise, 1]))
    return x


def training_batches(data, batch_size: int, seed: int):
    """The training split as a tf.data pipeline: shuffled anew each epoch (seeded), augmented as the data says
    (its crop and flip), batched and prefetched; images stream from data.examples (arrays or files)."""
    import tensorflow as tf

    ds = data.examples("train", shuffle_seed=seed)
    if data.crop or data.flip:
        crop, flip = data.crop, data.flip
        noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, noise).map(lambda xy, r: (_augmented(xy[0], r, crop, flip), xy[1]),
                                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def validation_batches(data, batch_size: int):
    return data.batches("val", batch_size)


def loop_feeds(data, batch_size: int, seed: int):
    """The fast loop's training and validation feeds: gathered in the compiled loop from arrays held in memory
    (loop.Held), or the tf.data pipelines above where images stream from files or are augmented (loop.Stream)."""
    from pipeline.stages import loop

    held = data.held("train")
    train = (loop.Stream(training_batches(data, batch_size, seed)) if held is None or data.crop or data.flip
             else loop.Held(*held, batch_size, seed))
    return train, loop.in_order(data, "val", batch_size)


def fit(model, data, phase: Phase, stage: str, callbacks=(), updates=None, fast: bool = True,
        audit: bool = False) -> dict[str, list[float]]:
    """Fit for phase.epochs on the training split (a seeded tf.data pipeline: the same data.seed, the same
    batches), validating on the validation split. `updates` (finetune.MaskUpdates) changes the masks before
    each of its steps. Fast: pipeline.stages.loop (one compiled call per epoch, compiled once per process and
    structure, on loop_feeds); otherwise Keras's model.fit, one call per batch (the updates from a callback)."""
    seed = (getattr(data, "seed", 0) + zlib.crc32(stage.encode())) % 2**31  # each stage its own order
    steps = steps_per_epoch(data, phase)
    callbacks = [StopOnNonFinite(stage), EpochSeconds(), Progress(stage, PROGRESS_AFTER_S), *callbacks]
    if fast:
        from pipeline.stages import loop

        return loop.run(model, *loop_feeds(data, phase.batch_size, seed), phase, steps, callbacks, updates, audit)
    compile_model(model, phase, steps * phase.epochs)
    history = model.fit(training_batches(data, phase.batch_size, seed), epochs=phase.epochs, shuffle=False,
                        validation_data=validation_batches(data, phase.batch_size), verbose=0,
                        callbacks=[*callbacks, *([UpdateMasks(updates)] if updates else [])])
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


class UpdateMasks(keras.callbacks.Callback):
    """Sets the masks to updates.at(s, model) before each of the updates' steps s of a model.fit."""

    def __init__(self, updates):
        super().__init__()
        self.updates, self.step = updates, 0

    def on_train_batch_begin(self, batch, logs=None):
        from pipeline.pruning.masks import hold, variables_by_path

        if self.step in self.updates.rates:
            hold(variables_by_path(self.model), self.updates.at(self.step, self.model))
        self.step += 1


def steps_per_epoch(data, phase: Phase) -> int:
    return int(np.ceil(data.sizes["train"] / phase.batch_size))


def train_baseline(model, data, phase: Phase, method, fast: bool = True,
                   bn_recalibration: int = 0) -> dict[str, list[float]]:
    """Train the dense model, with the method's training-time regularizer if it has one; then recompute its
    BatchNorm statistics on `bn_recalibration` training images (pipeline.stages.recalibrate)."""
    method.regularize(model)
    history = fit(model, data, phase, "baseline", fast=fast)
    after_phase(model, data, history, bn_recalibration, phase.batch_size)
    return history
