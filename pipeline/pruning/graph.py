"""The dependency graph of a Keras 3 model: which weights exist, and which channels are coupled.

Every tensor's last (channel) axis is described position by position: which *space* each position
belongs to and its index there. A producer (Conv2D, Dense, SeparableConv2D, Conv2DTranspose) creates a
space of its output channels; channel-wise layers pass their input's description on; Concatenate joins
them; Flatten tiles them (Dense rows per channel); element-wise merges, and a weight used by two calls
of one layer, tie spaces together channel by channel (union-find). Each set of tied spaces is a
*group*: removing its channel c removes the matching slice of every weight that touches it. What each
layer kind does is written once, as a rule object in RULES (layer class -> rule), in the manner of
Torch-Pruning's DepGraph. A group that touches anything the rules do not understand (an unknown layer,
a grouped conv, the model's input or output, a layer mixing channels) is left whole, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHANNEL_MIXING = ("softmax", "log_softmax")  # activations across channels: removing one changes the rest


def _activation_name(fn) -> str:
    return getattr(fn, "__name__", "linear") if fn is not None else "linear"


def _functional(op):
    """The functional graph inside a model (a Sequential's built graph), or None for a plain layer."""
    import keras

    if not isinstance(op, keras.Model):
        return None
    graph = getattr(op, "_functional", None) or op
    return graph if hasattr(graph, "_nodes_by_depth") else None


# --- the kernels unstructured methods prune -------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """One kernel of a layer kind: the axes that index its filters (one filter = what makes one output
    channel), whether it is a conv kernel, and whether its MACs count the output's spatial positions
    (or, for a transposed conv, the input's)."""

    attr: str
    filter_axes: tuple[int, ...]
    conv: bool = True
    spatial: str = "output"


def _kernel_table() -> dict:
    from keras import layers

    conv = (Kernel("kernel", (-1,)),)
    depthwise = Kernel("kernel", (-2, -1))
    return {
        layers.Conv1D: conv, layers.Conv2D: conv, layers.Conv3D: conv,
        layers.Dense: (Kernel("kernel", (-1,), conv=False),),
        layers.DepthwiseConv1D: (depthwise,), layers.DepthwiseConv2D: (depthwise,),
        layers.SeparableConv1D: (Kernel("depthwise_kernel", (-2, -1)), Kernel("pointwise_kernel", (-1,))),
        layers.SeparableConv2D: (Kernel("depthwise_kernel", (-2, -1)), Kernel("pointwise_kernel", (-1,))),
        layers.Conv1DTranspose: (Kernel("kernel", (-2,), spatial="input"),),
        layers.Conv2DTranspose: (Kernel("kernel", (-2,), spatial="input"),),
        layers.Conv3DTranspose: (Kernel("kernel", (-2,), spatial="input"),),
    }


_KERNELS: dict | None = None


def kernel_kinds(layer) -> tuple[Kernel, ...]:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernel_table()
    return _KERNELS.get(type(layer), ())


def all_layers(model) -> list:
    """Every layer of the model, those of nested models included (each once, in order)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def prunable_layers(model) -> list:
    """The layers owning kernels unstructured methods prune: conv (every kind), depthwise, separable,
    transposed conv and dense layers, nested models included."""
    return [layer for layer in all_layers(model) if kernel_kinds(layer)]


def kernels(model) -> list[tuple[object, Kernel, object]]:
    """(layer, kernel kind, variable) for every prunable kernel."""
    return [(layer, k, getattr(layer, k.attr)) for layer in prunable_layers(model) for k in kernel_kinds(layer)]


def conv_layers(model) -> list:
    return [layer for layer in prunable_layers(model) if kernel_kinds(layer)[0].conv]


def by_filter(w: np.ndarray, kind: Kernel) -> np.ndarray:
    """The kernel as a 2-D array (weights of one filter, filters)."""
    axes = [a % w.ndim for a in kind.filter_axes]
    moved = np.moveaxis(w, axes, range(w.ndim - len(axes), w.ndim))
    return moved.reshape(-1, int(np.prod([w.shape[a] for a in axes])))


def from_filters(m: np.ndarray, shape: tuple, kind: Kernel) -> np.ndarray:
    """Inverse of by_filter for an array of the kernel's shape."""
    axes = [a % len(shape) for a in kind.filter_axes]
    rest = [a for a in range(len(shape)) if a not in axes]
    moved = m.reshape([shape[a] for a in rest + axes])
    return np.moveaxis(moved, range(len(shape) - len(axes), len(shape)), axes)


# --- slices and groups ----------------------------------------------------------------------------

@dataclass
class Slice:
    """One axis of one weight, position by position in a channel space (index -1: another space).
    `role`: filter (a producer's output kernel), input (a consumer's input kernel), scale (a norm's
    gamma) or other; `masked`: trainable, so the masks zero it (running statistics are only sliced)."""

    layer: object
    var: object
    axis: int
    spaces: np.ndarray
    index: np.ndarray
    role: str = "other"
    masked: bool = True

    @property
    def path(self) -> str:
        return self.var.path

    def rows(self, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(channel index, the weight's values at that position flattened) for this slice's positions."""
        w = np.asarray(self.var.numpy() if values is None else values)
        at = np.flatnonzero(self.index >= 0)
        moved = np.moveaxis(w, self.axis, 0)[at]
        return self.index[at], moved.reshape(len(at), -1)

    def per_channel(self, size: int, reduce, values: np.ndarray | None = None) -> np.ndarray:
        """reduce(values of one position) summed over the positions of each channel."""
        channel, rows = self.rows(values)
        out = np.zeros(size)
        np.add.at(out, channel, reduce(rows))
        return out


@dataclass
class ChannelGroup:
    """Coupled channels: removing channel c removes position(s) c of every slice."""

    name: str
    size: int
    slices: list[Slice] = field(default_factory=list)
    reason: str | None = None  # why it is left whole; None: it can be pruned

    @property
    def producers(self) -> list[Slice]:
        """The output kernels of the group's producers (what importance criteria score)."""
        return [s for s in self.slices if s.role == "filter"]

    @property
    def convolutional(self) -> bool:
        """Does a conv layer (of any kind) produce these channels? (Dense units alone: no.)"""
        return any(k.conv for s in self.producers for k in kernel_kinds(s.layer))

    @property
    def scales(self) -> list[Slice]:
        return [s for s in self.slices if s.role == "scale"]

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.layer.name for s in self.slices))

    def masks(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Masks (True = kept) that remove every channel where keep is False: the producers' filters and
        biases, the norms' gamma and beta, depthwise slices, the consumers' input slices."""
        keep = np.asarray(keep, bool)
        out: dict[str, np.ndarray] = {}
        for s in self.slices:
            if not s.masked:
                continue
            m = np.ones(s.var.shape, bool)
            at = np.flatnonzero(s.index >= 0)
            drop = at[~keep[s.index[at]]]
            where = [slice(None)] * m.ndim
            where[s.axis] = drop
            m[tuple(where)] = False
            out[s.path] = out[s.path] & m if s.path in out else m
        return out

    def alive(self) -> np.ndarray:
        """True where some masked weight of the channel is non-zero (a removed channel has none)."""
        alive = np.zeros(self.size, bool)
        for s in self.slices:
            if s.masked:
                channel, rows = s.rows()
                alive[channel[np.any(rows != 0, axis=1)]] = True
        return alive


# --- the rules: what each layer kind does to channels ---------------------------------------------

class Rule:
    """What one layer kind does to channels: apply(builder, layer, node, inputs) -> outputs, where each
    input/output is a tensor's channel description (spaces, index) or None."""

    def apply(self, b, layer, node, ins):
        raise NotImplementedError


@dataclass(frozen=True)
class Unknown(Rule):
    """Anything not understood: its inputs' groups are left whole, its outputs start new, whole groups."""

    why: str = "not understood"

    def apply(self, b, layer, node, ins):
        reason = f"{type(layer).__name__} {layer.name} {self.why}"
        for x in ins:
            b.refuse(x, reason)
        return [b.source(t, reason) for t in node.output_tensors]


def _layer_problem(layer) -> str | None:
    """Why a layer cannot take part in channel pruning (channels first, grouped conv), or None."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"{layer.name} is channels_first"
    if getattr(layer, "groups", 1) != 1:
        return f"{layer.name} is a grouped conv (groups={layer.groups})"
    return None


@dataclass(frozen=True)
class Producer(Rule):
    """A layer whose output channels are its own (filters/units): its input channels slice `inputs`
    (weight, axis, repeated by this attribute or None), its output channels slice `outputs`."""

    inputs: tuple
    outputs: tuple
    width: str  # the config key of the output width

    def apply(self, b, layer, node, ins):
        x = ins[0]
        problem = _layer_problem(layer)
        if problem:
            b.refuse(x, problem)
        else:
            for attr, axis, repeat in self.inputs:
                b.claim(layer, attr, axis, b.repeat(x, getattr(layer, repeat) if repeat else 1), "input")
        out = b.produce(layer, int(getattr(layer, self.width)))
        mixing = _activation_name(getattr(layer, "activation", None))
        if problem or mixing in CHANNEL_MIXING:
            b.refuse(out, problem or f"{layer.name} applies {mixing} across channels")
        for i, (attr, axis) in enumerate(self.outputs):
            b.claim(layer, attr, axis, out, "filter" if i == 0 else "other")
        b.edit(layer, out, lambda config, n, key=self.width: config.update({key: n}))
        return [out]


@dataclass(frozen=True)
class Channelwise(Rule):
    """Each output channel depends on the same input channel only (norms, activations, pooling, padding,
    dropout, resizing ...). `weights`: (attribute, axis, role, masked) sliced per channel; `check(layer)`
    returns why this layer is not channel-wise after all (or None)."""

    weights: tuple = ()
    check: object = None

    def apply(self, b, layer, node, ins):
        x = ins[0]
        rank = len(node.input_tensors[0].shape)
        problem = (self.check(layer, rank) if self.check else None) or _layer_problem(layer)
        if problem:
            b.refuse(x, problem)
            return [b.source(t, problem) for t in node.output_tensors]
        for attr, axis, role, masked in self.weights:
            b.claim(layer, attr, axis, x, role, masked)
        return [x for _ in node.output_tensors]


@dataclass(frozen=True)
class Depthwise(Rule):
    """A depthwise conv: output channel c * m + j comes from input channel c (m = depth_multiplier), so its
    channels follow its input's group and its kernel and bias are sliced with it."""

    def apply(self, b, layer, node, ins):
        x = ins[0]
        problem = _layer_problem(layer)
        if problem:
            b.refuse(x, problem)
            return [b.source(t, problem) for t in node.output_tensors]
        out = b.repeat(x, layer.depth_multiplier)
        b.claim(layer, "kernel", -2, x, "other")  # (*kernel size, input channels, multiplier)
        b.claim(layer, "bias", 0, out, "other")
        return [out]


@dataclass(frozen=True)
class Merge(Rule):
    """Element-wise merges (Add, Multiply, ...): all inputs and the output share their channels. An input
    of one channel broadcast over many (spatial attention) is left whole; a broadcast Multiply of
    [N, H, W, C] by [N, 1, 1, C] (squeeze-and-excitation) ties the excitation to the main channels."""

    def apply(self, b, layer, node, ins):
        if not _only_tensor_arguments(node):
            return Unknown("has non-tensor operands").apply(b, layer, node, ins)
        width = max(len(x[0]) for x in ins)
        wide = [x for x in ins if len(x[0]) == width]
        for x in ins:
            if len(x[0]) != width:
                b.refuse(x, f"{layer.name} broadcasts {len(x[0])} channel(s) over {width}")
        b.tie(wide, layer.name)
        return [wide[0]]


def _only_tensor_arguments(node) -> bool:
    """An op's operands are tensors or plain numbers (a constant array would need slicing too)."""
    from keras import KerasTensor

    values = list(node.arguments.args) + list(node.arguments.kwargs.values())
    return all(isinstance(v, (KerasTensor, int, float, list, tuple)) and
               (not isinstance(v, (list, tuple)) or all(isinstance(u, KerasTensor) for u in v)) for v in values)


@dataclass(frozen=True)
class Concat(Rule):
    """Concatenation on the channel axis joins the inputs' channel descriptions; on another axis it is an
    element-wise coupling (every input has the same channels)."""

    def apply(self, b, layer, node, ins):
        rank = len(node.output_tensors[0].shape)
        if getattr(layer, "axis", -1) % rank == rank - 1:
            return [(np.concatenate([x[0] for x in ins]), np.concatenate([x[1] for x in ins]))]
        b.tie(ins, layer.name)
        return [ins[0]]


@dataclass(frozen=True)
class Flatten(Rule):
    """Flatten of channels-last [N, ..., C]: position p * C + c holds channel c (Dense rows per channel)."""

    def apply(self, b, layer, node, ins):
        x, shape = ins[0], node.input_tensors[0].shape
        problem = _layer_problem(layer)
        if problem or any(d is None for d in shape[1:]):
            reason = problem or f"{layer.name} flattens a tensor of unknown shape"
            b.refuse(x, reason)
            return [b.source(node.output_tensors[0], reason)]
        reps = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        return [(np.tile(x[0], reps), np.tile(x[1], reps))]


@dataclass(frozen=True)
class Reshape(Rule):
    """A reshape that keeps the channel axis last and whole ([N, C] -> [N, 1, 1, C], [N, H, W, C] ->
    [N, H*W, C]) preserves channels (its target shape's last entry follows the kept count); one to a
    single axis flattens; any other mixes channels."""

    def apply(self, b, layer, node, ins):
        x = ins[0]
        inp, out = node.input_tensors[0].shape, node.output_tensors[0].shape
        if len(out) == 2 and len(inp) > 2:
            return Flatten().apply(b, layer, node, ins)
        if out[-1] == inp[-1] and out[-1] is not None and tuple(layer.target_shape)[-1] == out[-1]:
            b.edit(layer, x, lambda config, n: config.update(
                {"target_shape": (*tuple(config["target_shape"])[:-1], n)}))
            return [x]
        reason = f"{layer.name} reshapes across channels"
        b.refuse(x, reason)
        return [b.source(node.output_tensors[0], reason)]


def _bn_problem(layer, rank) -> str | None:
    return None if layer.axis % rank == rank - 1 else f"{layer.name} normalizes axis {layer.axis}"


def _activation_problem(layer, rank) -> str | None:
    name = _activation_name(getattr(layer, "activation", None))
    return f"{layer.name} applies {name} across channels" if name in CHANNEL_MIXING else None


def _scalar_rescaling(layer, rank) -> str | None:
    scalar = np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0
    return None if scalar else f"{layer.name} rescales per channel (constants in its config)"


def _normalization_problem(layer, rank) -> str | None:
    if layer.input_mean is not None:
        return f"{layer.name} has its mean and variance in its config"
    return None if [a % rank for a in layer.axis] == [rank - 1] else f"{layer.name} normalizes axes {layer.axis}"


def _prelu_problem(layer, rank) -> str | None:
    return None if all(d == 1 for d in layer.alpha.shape[:-1]) else f"{layer.name} has an alpha per position"


def _rule_table() -> dict:
    from keras import layers
    from keras.src.ops import nn as nn_ops
    from keras.src.ops import numpy as np_ops

    conv = Producer(inputs=(("kernel", -2, None),), outputs=(("kernel", -1), ("bias", 0)), width="filters")
    transpose = Producer(inputs=(("kernel", -1, None),), outputs=(("kernel", -2), ("bias", 0)), width="filters")
    separable = Producer(inputs=(("depthwise_kernel", -2, None), ("pointwise_kernel", -2, "depth_multiplier")),
                         outputs=(("pointwise_kernel", -1), ("bias", 0)), width="filters")
    plain = Channelwise()
    norm = Channelwise(weights=(("gamma", 0, "scale", True), ("beta", 0, "other", True),
                                ("moving_mean", 0, "other", False), ("moving_variance", 0, "other", False)),
                       check=_bn_problem)
    table = {
        layers.Conv1D: conv, layers.Conv2D: conv, layers.Conv3D: conv,
        layers.Dense: Producer(inputs=(("kernel", 0, None),), outputs=(("kernel", 1), ("bias", 0)), width="units"),
        layers.SeparableConv1D: separable, layers.SeparableConv2D: separable,
        layers.Conv1DTranspose: transpose, layers.Conv2DTranspose: transpose, layers.Conv3DTranspose: transpose,
        layers.DepthwiseConv1D: Depthwise(), layers.DepthwiseConv2D: Depthwise(),
        layers.BatchNormalization: norm,
        layers.Activation: Channelwise(check=_activation_problem),
        layers.PReLU: Channelwise(weights=(("alpha", -1, "other", True),), check=_prelu_problem),
        layers.Rescaling: Channelwise(check=_scalar_rescaling),
        layers.Normalization: Channelwise(weights=(("mean", -1, "other", False), ("variance", -1, "other", False)),
                                          check=_normalization_problem),
        layers.Softmax: Unknown("mixes channels (softmax)"),
        layers.Lambda: Unknown("is a Lambda: its function is not understood"),
        layers.Add: Merge(), layers.Subtract: Merge(), layers.Multiply: Merge(), layers.Average: Merge(),
        layers.Maximum: Merge(), layers.Minimum: Merge(),
        layers.Concatenate: Concat(),
        layers.Flatten: Flatten(),
        layers.Reshape: Reshape(),
    }
    for name in ("ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                 "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
                 "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
                 "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
                 "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D",
                 "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D",
                 "UpSampling3D", "Resizing"):
        if hasattr(layers, name):
            table[getattr(layers, name)] = plain
    for name in ("Relu", "Relu6", "Sigmoid", "Silu", "Gelu", "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSilu",
                 "Softplus", "Softsign", "Celu"):
        if hasattr(nn_ops, name):
            table[getattr(nn_ops, name)] = plain
    for name in ("Add", "Subtract", "Multiply", "Maximum", "Minimum"):
        table[getattr(np_ops, name)] = Merge()
    table[np_ops.Concatenate] = Concat()
    return table


_RULES: dict | None = None


def rules() -> dict:
    """Layer (or op) class -> Rule: the one place that says what each kind does to channels."""
    global _RULES
    if _RULES is None:
        _RULES = _rule_table()
    return _RULES


# --- the walk -------------------------------------------------------------------------------------

class Builder:
    """Spaces, their union-find, the slices claimed on them, and the config edits surgery applies."""

    def __init__(self):
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.names: list[str | None] = []
        self.reasons: dict[int, list[str]] = {}
        self.slices: list[Slice] = []
        self.claimed: dict[tuple[int, int], Slice] = {}
        self.outputs: dict[int, tuple] = {}  # id(producer layer) -> its output description
        self.edits: list[tuple] = []  # (layer, description of the channels it is sized by, edit fn)

    def _space(self, size: int, name: str | None) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _describe(self, space: int, size: int):
        return np.full(size, space), np.arange(size)

    def source(self, tensor, reason: str):
        """A tensor whose channels cannot be removed (model input, output of something not understood)."""
        width = tensor.shape[-1] if len(tensor.shape) else 1
        x = self._describe(self._space(int(width or 1), None), int(width or 1))
        self.refuse(x, reason)
        return x

    def produce(self, layer, width: int):
        """The output channels of a producer (one space per layer, whichever call)."""
        if id(layer) not in self.outputs:
            self.outputs[id(layer)] = self._describe(self._space(width, layer.name), width)
        return self.outputs[id(layer)]

    @staticmethod
    def repeat(x, times: int):
        return (np.repeat(x[0], times), np.repeat(x[1], times)) if times != 1 else x

    def refuse(self, x, reason: str) -> None:
        if x is None:
            return
        for s in set(x[0].tolist()):
            self.reasons.setdefault(self.find(s), []).append(reason)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            lo, hi = min(a, b), max(a, b)  # the earliest space names the group
            self.parent[hi] = lo
            if hi in self.reasons:
                self.reasons.setdefault(lo, []).extend(self.reasons.pop(hi))

    def tie(self, xs: list, where: str) -> None:
        """Position p of every description is one channel: tie their spaces channel by channel."""
        first = xs[0]
        for x in xs[1:]:
            same = len(x[0]) == len(first[0]) and np.array_equal(x[1], first[1]) and all(
                self.sizes[a] == self.sizes[b] for a, b in zip(x[0], first[0]))
            if not same:
                for y in (first, x):
                    self.refuse(y, f"{where} ties channels in different orders")
                continue
            for a, b in set(zip(first[0].tolist(), x[0].tolist())):
                self.union(a, b)

    def claim(self, layer, attr: str, axis: int, x, role: str, masked: bool = True) -> None:
        var = getattr(layer, attr, None)
        if var is None or x is None:
            return
        axis %= len(var.shape)
        key = (id(var), axis)
        if key in self.claimed:  # a layer called twice: both calls' channels are one
            prev = self.claimed[key]
            self.tie([(prev.spaces, prev.index), x], layer.name)
            return
        if var.shape[axis] != len(x[0]):
            self.refuse(x, f"{layer.name}.{attr} axis {axis} has {var.shape[axis]} entries, not {len(x[0])}")
            return
        self.claimed[key] = s = Slice(layer, var, axis, x[0], x[1], role, masked)
        self.slices.append(s)

    def edit(self, layer, x, fn) -> None:
        self.edits.append((layer, x, fn))

    def walk(self, graph, tensors: dict) -> None:
        table = rules()
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                op = node.operation
                if type(op).__name__ == "InputLayer":
                    continue
                ins = [tensors.get(id(t)) for t in node.input_tensors]
                ins = [x if x is not None else self.source(t, "an unknown tensor")
                       for x, t in zip(ins, node.input_tensors)]
                inner = _functional(op)
                if inner is not None:
                    outs = self.nested(op, inner, ins)
                else:
                    outs = table.get(type(op), Unknown()).apply(self, op, node, ins)
                for t, x in zip(node.output_tensors, outs):
                    tensors[id(t)] = x

    def nested(self, model, inner, ins):
        """A model used as a layer: its inputs are the outer tensors, its outputs flow on."""
        inner_tensors = {}
        for t, x in zip(inner.inputs, ins):
            inner_tensors[id(t)] = x
            layer = t._keras_history[0]
            self.edit(layer, x, lambda config, n: config.update(
                {"batch_shape": (*tuple(config["batch_shape"])[:-1], n)}))
        self.walk(inner, inner_tensors)
        return [inner_tensors[id(t)] for t in inner.outputs]

    def groups(self) -> tuple[list[ChannelGroup], np.ndarray]:
        """Every group (one per set of tied spaces, in order of their first space) and each space's group."""
        root_of = np.array([self.find(s) for s in range(len(self.parent))], dtype=int)
        roots = sorted(set(root_of.tolist()))
        groups = {r: ChannelGroup(self.names[r] or f"space{r}", self.sizes[r],
                                  reason="; ".join(dict.fromkeys(self.reasons[r])) if r in self.reasons else None)
                  for r in roots}
        for s in self.slices:
            owners = root_of[s.spaces]
            for r in set(owners.tolist()):
                index = np.where(owners == r, s.index, -1)
                groups[r].slices.append(Slice(s.layer, s.var, s.axis, s.spaces, index, s.role, s.masked))
        for g in groups.values():
            if g.reason is None and not g.producers:
                g.reason = "no producer"
            if g.reason is None and g.size < 2:
                g.reason = "one channel"
        position = {r: i for i, r in enumerate(roots)}
        return [groups[r] for r in roots], np.array([position[r] for r in root_of], dtype=int)


@dataclass
class Analysis:
    groups: list[ChannelGroup]  # every group, the ones left whole included
    edits: list[tuple]  # (layer, channel description, config edit) for surgery
    root_of: np.ndarray  # space -> group index

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.reason is None]

    def structured(self) -> dict[str, str]:
        """Per layer: the group its output channels are pruned with, or why they are left whole."""
        out = {}
        for outputs_only in (True, False):  # a producer's filters first, then what follows its input (depthwise)
            for g in self.groups:
                for s in g.producers if outputs_only else [s for s in g.slices if s.role != "input"]:
                    out.setdefault(s.layer.name, g.name if g.reason is None else f"whole: {g.reason}")
        return out


def analyze(model) -> Analysis:
    """Walk the model's graph (nested models included) and return every group of coupled channels."""
    graph = _functional(model)
    if graph is None:
        raise ValueError(f"{type(model).__name__} {model.name} is not a functional model (no graph to walk)")
    b = Builder()
    tensors = {id(t): b.source(t, "the model input") for t in graph.inputs}
    b.walk(graph, tensors)
    for t in graph.outputs:
        b.refuse(tensors[id(t)], "reaches the model output")
    groups, root_of = b.groups()
    return Analysis(groups, b.edits, root_of)


def channel_groups(model) -> list[ChannelGroup]:
    """The groups of coupled channels that can be pruned (each with at least one producer)."""
    return analyze(model).prunable
