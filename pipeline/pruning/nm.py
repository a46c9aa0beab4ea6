"""N:M semi-structured sparsity (2:4 by default): in every group of M consecutive weights along a
kernel's reduction axis, keep the N largest |w|. The pattern sparse tensor cores accelerate
(NVIDIA Ampere and later; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks").

Groups run along the axis each output sums over: the input channels of a convolution or a Dense layer
(the transposed convolution's are its kernel's last axis), the spatial positions of a depthwise kernel,
which has no channel reduction. A reduction whose length is not a multiple of M is padded to one: the
last group is short, and keeps min(its length, N) of its weights, so the padded kernel holds the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import ConfigError, require
from pipeline.pruning.base import PruningMethod, n_pruned
from pipeline.pruning.graph import prunable_layers

SPATIAL = "spatial"  # a depthwise kernel (*spatial, channels, multiplier): its positions are the reduction
REDUCTION = {  # layer kind -> {kernel attribute: reduction axis}; any other prunable layer: {"kernel": -2}
    "Conv1DTranspose": {"kernel": -1},
    "Conv2DTranspose": {"kernel": -1},
    "Conv3DTranspose": {"kernel": -1},
    "DepthwiseConv1D": {"kernel": SPATIAL},
    "DepthwiseConv2D": {"kernel": SPATIAL},
    "SeparableConv1D": {"depthwise_kernel": SPATIAL, "pointwise_kernel": -2},
    "SeparableConv2D": {"depthwise_kernel": SPATIAL, "pointwise_kernel": -2},
}


def kernels(model) -> list[tuple[object, int | str]]:
    """(kernel variable, reduction axis) of every prunable layer."""
    out = []
    for layer in prunable_layers(model):
        for attr, axis in REDUCTION.get(type(layer).__name__, {"kernel": -2}).items():
            var = getattr(layer, attr, None)
            if var is not None:
                out.append((var, axis))
    return out


def nm_mask(w: np.ndarray, axis: int | str, keep: int, m: int) -> np.ndarray:
    """True where w is among the `keep` largest |w| of its group of m along `axis` (ties by position)."""
    w = np.abs(np.asarray(w, np.float64))
    if axis == SPATIAL:  # (*spatial, c, k) -> rows (c, k), reduction over the flattened positions
        lead = w.shape[-2:]
        rows = w.reshape(-1, int(np.prod(lead))).T
    else:
        moved = np.moveaxis(w, axis, -1)
        lead = moved.shape[:-1]
        rows = moved.reshape(-1, moved.shape[-1])
    length = rows.shape[1]
    padded = np.pad(rows, ((0, 0), (0, -length % m)), constant_values=-1.0)  # padding loses every tie
    groups = padded.reshape(len(rows), -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    kept = np.zeros(groups.shape, bool)
    np.put_along_axis(kept, order[..., :keep], True, axis=-1)
    kept = kept.reshape(len(rows), -1)[:, :length]
    if axis == SPATIAL:
        return kept.T.reshape(w.shape)
    return np.moveaxis(kept.reshape(*lead, length), -1, axis)


@dataclass
class NM(PruningMethod):
    name: str = "nm"
    n: int = 2
    m: int = 4

    def __post_init__(self):
        require(self.m >= 2, "m", self.m, "an integer >= 2 (the group length)")
        require(0 < self.n < self.m, "n", self.n, f"an integer in [1, {self.m - 1}] (kept per group of m={self.m})")

    @property
    def target(self) -> float:
        return 1 - self.n / self.m

    def check(self, schedule) -> None:
        if not np.isclose(schedule.target, self.target, rtol=0, atol=1e-9):
            raise ConfigError(f"sparsity.target={schedule.target!r} is not allowed with method=nm: an "
                              f"{self.n}:{self.m} pattern prunes 1 - n/m = {self.target:g}; set "
                              f"sparsity.target={self.target:g} (or method.n / method.m)")

    def masks(self, model, target, seed=0):
        # A schedule's intermediate rate t prunes floor(t * m) per group (2:4 passes through 3:4).
        keep = self.m - min(self.m - self.n, n_pruned(target, self.m))
        return {var.path: nm_mask(var.numpy(), axis, keep, self.m) for var, axis in kernels(model)}
