"""Which weights a method may prune, and which channels are tied together across layers.

A channel group is a Conv2D whose output channels reach only channel-wise layers (BatchNorm, ReLU,
pooling, dropout) before their consumers: another Conv2D, or Dense after Flatten or global pooling.
Removing channel c then means: the conv's kernel[..., c] and bias[c], each BatchNorm's parameters
at c, and the consumers' input slices for c. A conv whose output reaches an addition (a residual
connection) or anything else is not a group: its channels are tied to others and are left whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAFE_ACTIVATIONS = ("relu", "linear")


def _kind(layer) -> str:
    return type(layer).__name__


def prunable_layers(model) -> list:
    """Conv2D and Dense layers: the owners of the kernels unstructured methods prune."""
    return [layer for layer in model.layers if _kind(layer) in ("Conv2D", "Dense")]


def conv_layers(model) -> list:
    return [layer for layer in model.layers if _kind(layer) == "Conv2D"]


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "linear") if act is not None else "linear"


def consumers(layer, model) -> list:
    ops = set(id(op) for op in model.layers)
    return [node.operation for node in layer._outbound_nodes if id(node.operation) in ops]


@dataclass
class ChannelGroup:
    conv: object
    norms: list = field(default_factory=list)
    convs_in: list = field(default_factory=list)  # consumer Conv2D layers (input channel axis 2)
    dense_in: list = field(default_factory=list)  # (Dense, channels-last flatten?) consumers

    @property
    def name(self) -> str:
        return self.conv.name

    @property
    def size(self) -> int:
        return int(self.conv.filters)

    def masks(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Masks (True = kept) that remove every channel where keep is False."""
        keep = np.asarray(keep, bool)
        out = {self.conv.kernel.path: np.broadcast_to(keep, self.conv.kernel.shape).copy()}
        if self.conv.use_bias:
            out[self.conv.bias.path] = keep.copy()
        for bn in self.norms:
            for var in (bn.gamma, bn.beta):
                if var is not None:
                    out[var.path] = keep.copy()
        for conv in self.convs_in:
            m = np.ones(conv.kernel.shape, bool)
            m[:, :, ~keep, :] = False
            out[conv.kernel.path] = m
        for dense in self.dense_in:
            rows = dense.kernel.shape[0]
            m = np.ones(dense.kernel.shape, bool)
            m[~keep[np.arange(rows) % self.size], :] = False  # channels-last: row = position * C + c
            out[dense.kernel.path] = m
        return out


CHANNELWISE = ("BatchNormalization", "ReLU", "MaxPooling2D", "AveragePooling2D", "Dropout", "Activation")


def channel_groups(model) -> list[ChannelGroup]:
    """Every Conv2D whose output channels can be removed on their own."""
    groups = []
    for conv in conv_layers(model):
        if conv.groups != 1 or _activation_name(conv) not in SAFE_ACTIVATIONS:
            continue
        group, ok, frontier = ChannelGroup(conv), True, consumers(conv, model)
        if not frontier:
            continue
        while frontier and ok:
            layer = frontier.pop()
            kind = _kind(layer)
            if kind == "Conv2D" and layer.groups == 1:
                group.convs_in.append(layer)
            elif kind in CHANNELWISE:
                if kind == "Activation" and _activation_name(layer) not in SAFE_ACTIVATIONS:
                    ok = False
                if kind == "BatchNormalization":
                    group.norms.append(layer)
                nxt = consumers(layer, model)
                ok = ok and bool(nxt)
                frontier += nxt
            elif kind in ("Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D"):
                nxt = consumers(layer, model)
                ok = ok and bool(nxt) and all(_kind(d) == "Dense" for d in nxt)
                group.dense_in += nxt
            else:
                ok = False
        if ok:
            groups.append(group)
    return groups
