"""The Keras callback that follows a sparsity schedule during fine-tuning."""

from __future__ import annotations

import keras

from pipeline.pruning.masks import MaskedModel


class ScheduleMasks(keras.callbacks.Callback):
    """Recomputes masks at the schedule's steps; between two updates the constraints hold them."""

    def __init__(self, masked: MaskedModel, method, schedule, total_steps: int, seed: int):
        super().__init__()
        self.masked, self.method, self.schedule = masked, method, schedule
        self.total, self.seed, self.step = total_steps, seed, 0
        self.targets: list[tuple[int, float]] = []

    def on_train_batch_begin(self, batch, logs=None):
        target = self.schedule.update_at(self.step, self.total)
        if target is not None:
            self.masked.update(self.method.masks(self.masked.model, target, self.seed))
            self.targets.append((self.step, target))
        self.step += 1
