"""Training: the dense baseline, and the shared fit used by fine-tuning."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from pipeline.config import Phase


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


def compile_model(model, phase: Phase) -> None:
    if phase.optimizer == "sgd":
        opt = keras.optimizers.SGD(phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay or None)
    else:
        opt = keras.optimizers.Adam(phase.lr, weight_decay=phase.weight_decay or None)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def fit(model, data, phase: Phase, stage: str, callbacks=()) -> dict[str, list[float]]:
    """Compile and fit for phase.epochs on the training split, validating on the validation split."""
    compile_model(model, phase)
    history = model.fit(data.x_train, data.y_train, batch_size=phase.batch_size, epochs=phase.epochs,
                        validation_data=(data.x_val, data.y_val), shuffle=True, verbose=0,
                        callbacks=[StopOnNonFinite(stage), EpochSeconds(), *callbacks])
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def steps_per_epoch(data, phase: Phase) -> int:
    return int(np.ceil(len(data.x_train) / phase.batch_size))


def train_baseline(model, data, phase: Phase, method) -> dict[str, list[float]]:
    """Train the dense model, with the method's training-time regularizer if it has one."""
    method.regularize(model)
    return fit(model, data, phase, "baseline")
