"""Prune: the method turns the trained model into masks, which are attached and applied."""

from __future__ import annotations

from pipeline.pruning.masks import MaskedModel


def prune(model, method, target: float, seed: int) -> MaskedModel:
    return MaskedModel(model, method.masks(model, target, seed))
