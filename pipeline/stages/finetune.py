"""Fine-tune with the masks held inside every training step, following the sparsity schedule."""

from __future__ import annotations

from pipeline.config import Phase
from pipeline.pruning.masks import Masks
from pipeline.stages.recalibrate import after_phase
from pipeline.stages.train import fit, steps_per_epoch


class MaskUpdates:
    """When fine-tuning recomputes the masks, and to what: before each step of `rates` (step: rate), the
    method's masks at that rate merged into the model's (pruned weights stay pruned). Inside the compiled
    loop where the method has them as TensorFlow ops (`graph`), else from `at` at a stop before the step."""

    def __init__(self, masked, method, rates: dict[int, float], seed: int):
        self.masked, self.method, self.rates, self.seed = masked, method, rates, seed
        graph = method.in_graph(masked.model)
        self.graph = graph if graph and set(graph.paths) <= set(masked.masks) else None

    def at(self, step: int, view) -> Masks:
        """The model's masks (keyed by its paths) from `step` on, computed from the weights `view` holds: the
        model, or the compiled loop's twin of it (the same variables, in the same order)."""
        path = dict(zip((v.path for v in view.variables), (v.path for v in self.masked.model.variables)))
        found = self.method.masks(view, self.rates[step], self.seed)
        return self.masked.merge({path[p]: m for p, m in found.items()})


def mask_updates(masked, method, schedule, total: int, seed: int) -> MaskUpdates | None:
    """The schedule's mask updates over `total` steps (None: it keeps the masks)."""
    rates = {step: rate for step in range(total) if (rate := schedule.update_at(step, total)) is not None}
    return MaskUpdates(masked, method, rates, seed) if schedule.changes_masks and rates else None


def finetune(masked, data, phase: Phase, method, schedule, seed: int, fast: bool = True,
             audit: bool = False, callbacks=(), bn_recalibration: int = 0) -> dict[str, list[float]]:
    """`fast`: several steps per compiled call (pipeline.stages.loop); else Keras's model.fit. Same results.
    Then the masked model's BatchNorm statistics, on `bn_recalibration` training images (after_phase)."""
    updates = mask_updates(masked, method, schedule, steps_per_epoch(data, phase) * phase.epochs, seed)
    history = fit(masked.model, data, phase, "fine-tuning", callbacks, updates, fast, audit)
    masked.sync()  # the masks as the training left them (a compiled loop may have grown them)
    masked.apply()  # exact zeros even where a float multiply by 1.0 is not the identity
    after_phase(masked.model, data, history, bn_recalibration, phase.batch_size)
    return history
