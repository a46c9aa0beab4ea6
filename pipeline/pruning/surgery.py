"""Surgery: build the physically smaller model that a structured pruning result implies.

A channel is removed where its output is identically zero: every BatchNorm on its path has gamma and
beta zero, or (without BatchNorm) its kernel slice and bias are zero. The new model is the old
config with fewer filters; every weight is copied with the removed output and input channels dropped.
"""

from __future__ import annotations

import numpy as np

from pipeline.pruning.graph import channel_groups


def removable_channels(group) -> np.ndarray:
    """True where the group's channel outputs exactly zero for every input."""
    if group.norms:
        dead = np.ones(group.size, bool)
        for bn in group.norms:
            for var in (bn.gamma, bn.beta):
                if var is not None:
                    dead &= var.numpy() == 0
        return dead
    dead = ~np.any(group.conv.kernel.numpy() != 0, axis=(0, 1, 2))
    if group.conv.use_bias:
        dead &= group.conv.bias.numpy() == 0
    return dead


def _with_filters(config: dict, filters: dict[str, int]) -> dict:
    """The model config with new filter counts; layers rebuild from their new inputs."""
    for layer in config["layers"]:
        layer.pop("build_config", None)
        if layer["config"]["name"] in filters:
            layer["config"]["filters"] = filters[layer["config"]["name"]]
    return config


def shrink(model):
    """Return (smaller model, {conv name: channels kept}); the model itself if nothing can go."""
    import keras

    keep_out, keep_in, keep_rows = {}, {}, {}
    for group in channel_groups(model):
        keep = ~removable_channels(group)
        if keep.all() or not keep.any():
            continue
        idx = np.flatnonzero(keep)
        keep_out[group.conv.name] = idx
        for bn in group.norms:
            keep_out[bn.name] = idx
        for conv in group.convs_in:
            keep_in[conv.name] = idx
        for dense in group.dense_in:
            rows = np.arange(dense.kernel.shape[0])
            keep_rows[dense.name] = rows[keep[rows % group.size]]
    if not keep_out:
        return model, {}
    config = _with_filters(model.get_config(), {n: len(i) for n, i in keep_out.items()
                                                  if type(model.get_layer(n)).__name__ == "Conv2D"})
    small = keras.Model.from_config(config)
    for layer in model.layers:
        weights = [w.numpy() for w in layer.weights]
        if not weights:
            continue
        name, kind = layer.name, type(layer).__name__
        if kind == "Conv2D":
            if name in keep_in:
                weights[0] = weights[0][:, :, keep_in[name], :]
            if name in keep_out:
                weights = [weights[0][..., keep_out[name]]] + [b[keep_out[name]] for b in weights[1:]]
        elif kind == "BatchNormalization" and name in keep_out:
            weights = [w[keep_out[name]] for w in weights]
        elif kind == "Dense" and name in keep_rows:
            weights[0] = weights[0][keep_rows[name]]
        small.get_layer(name).set_weights(weights)
    return small, {n: len(i) for n, i in keep_out.items()}

