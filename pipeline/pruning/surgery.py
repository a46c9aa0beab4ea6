"""Surgery: build the physically smaller model that a structured pruning result implies.

A channel of a prunable group (pipeline.pruning.graph) is removed where every masked weight of it is
exactly zero: the producers' filters and biases, the norms' gamma and beta, depthwise slices and the
consumers' input slices. Its consumers read it through zero weights only, so removing it leaves every
output as it was. The new model is the old config with the producers' widths (and reshape targets,
nested models' input shapes) edited; every weight is copied with the removed positions dropped on
every axis the graph ties to a group (running statistics included).
"""

from __future__ import annotations

import numpy as np

from pipeline.pruning.graph import _functional, analyze, kernel_kinds


def _edit_config(graph, config: dict, edits: dict) -> None:
    """Apply the config edits (layer id -> [fn(config)]) to this model's config and its nested models'."""
    layers = {op.name: op for op in graph.operations}
    for entry in config["layers"]:
        entry.pop("build_config", None)
        layer = layers.get(entry["config"]["name"])
        if layer is None:
            continue
        for fn in edits.get(id(layer), ()):
            fn(entry["config"])
        inner = _functional(layer)
        if inner is not None:
            _edit_config(inner, entry["config"], edits)


def _copy_weights(old_graph, new_graph, kept_positions: dict) -> None:
    new_layers = {op.name: op for op in new_graph.operations}
    for old in old_graph.operations:
        new = new_layers[old.name]
        inner = _functional(old)
        if inner is not None:
            _copy_weights(inner, _functional(new), kept_positions)
            continue
        if not getattr(old, "weights", None):  # ops (x + y) and weightless layers
            continue
        weights = []
        for var in old.weights:
            w = np.asarray(var.numpy())
            for axis, keep in kept_positions.get(id(var), {}).items():
                w = np.compress(keep, w, axis=axis)
            weights.append(w)
        new.set_weights(weights)


def shrink(model):
    """Return (smaller model, {producer layer: channels kept}); the model itself if nothing can go."""
    analysis = analyze(model)
    keep = {}
    for g in analysis.prunable:
        alive = g.alive()
        if not alive.all() and alive.any():  # never a group down to zero channels
            keep[id(g)] = alive
    if not keep:
        return model, {}
    kept_positions: dict[int, dict[int, np.ndarray]] = {}
    for g in analysis.prunable:
        if id(g) in keep:
            for s in g.slices:
                at = np.flatnonzero(s.index >= 0)
                axis_keep = kept_positions.setdefault(id(s.var), {}).setdefault(
                    s.axis, np.ones(s.var.shape[s.axis], bool))
                axis_keep[at] = keep[id(g)][s.index[at]]

    def count(x) -> int:
        groups = [analysis.groups[i] for i in analysis.root_of[x[0]]]
        return sum(bool(keep[id(g)][c]) if id(g) in keep else True for g, c in zip(groups, x[1]))

    edits, kept = {}, {}
    for layer, x, fn in analysis.edits:
        n = count(x)
        if n != len(x[0]):
            edits.setdefault(id(layer), []).append(lambda config, fn=fn, n=n: fn(config, n))
            if kernel_kinds(layer):
                kept[layer.name] = n
    config = model.get_config()
    _edit_config(_functional(model), config, edits)
    small = type(model).from_config(config)
    _copy_weights(_functional(model), _functional(small), kept_positions)
    return small, kept
