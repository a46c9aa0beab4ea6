"""Fine-tune with the masks held inside every training step, following the sparsity schedule."""

from __future__ import annotations

from pipeline.config import Phase
from pipeline.stages.recalibrate import after_phase
from pipeline.stages.train import fit, steps_per_epoch


def mask_updates(masked, method, schedule, total: int, seed: int) -> dict:
    """{step: masks_at} for each step at which the schedule recomputes the masks (before that step), as
    train.fit takes them: masks_at(view) merges the method's masks of the weights `view` holds into the
    model's and returns them."""
    if not schedule.changes_masks:
        return {}

    def masks_at(rate):
        def at(view):
            path = dict(zip((v.path for v in view.variables), (v.path for v in masked.model.variables)))
            return masked.merge({path[p]: m for p, m in method.masks(view, rate, seed).items()})

        return at

    return {step: masks_at(rate) for step in range(total) if (rate := schedule.update_at(step, total)) is not None}


def finetune(masked, data, phase: Phase, method, schedule, seed: int, fast: bool = True,
             audit: bool = False, callbacks=(), bn_recalibration: int = 0) -> dict[str, list[float]]:
    """`fast`: several steps per compiled call (pipeline.stages.loop); else Keras's model.fit. Same results.
    Then the masked model's BatchNorm statistics, on `bn_recalibration` training images (after_phase)."""
    updates = mask_updates(masked, method, schedule, steps_per_epoch(data, phase) * phase.epochs, seed)
    history = fit(masked.model, data, phase, "fine-tuning", callbacks, updates, fast, audit)
    masked.apply()  # exact zeros even where a float multiply by 1.0 is not the identity
    after_phase(masked.model, data, history, bn_recalibration, phase.batch_size)
    return history
