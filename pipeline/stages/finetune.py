"""Fine-tune with the masks held inside every training step, following the sparsity schedule."""

from __future__ import annotations

from pipeline.config import Phase
from pipeline.pruning.callback import ScheduleMasks
from pipeline.stages.train import fit, steps_per_epoch


def finetune(masked, data, phase: Phase, method, schedule, seed: int) -> dict[str, list[float]]:
    callbacks = []
    if schedule.changes_masks:  # a per-batch callback costs a host sync each step: only when needed
        total = steps_per_epoch(data, phase) * phase.epochs
        callbacks.append(ScheduleMasks(masked, method, schedule, total, seed))
    history = fit(masked.model, data, phase, "fine-tuning", callbacks=callbacks)
    masked.apply()  # exact zeros even where a float multiply by 1.0 is not the identity
    return history
