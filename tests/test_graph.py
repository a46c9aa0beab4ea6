"""The dependency graph on small hand-built functional models: every layer kind, which channels it
couples, what it leaves whole and why, and that surgery's smaller model computes what the masked one does."""

import keras
import numpy as np
import pytest
from keras import layers

from pipeline.pruning import accounting
from pipeline.pruning.graph import analyze, channel_groups
from pipeline.pruning.masks import merge, variables_by_path
from pipeline.pruning.surgery import shrink

X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")


def randomize(model, seed=0):
    """Non-trivial BatchNorm statistics and biases, so a wrongly dropped channel shows in the outputs."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path.rsplit("/", 1)[-1]
        values = {"gamma": lambda n: rng.uniform(0.5, 1.5, n), "beta": lambda n: rng.normal(0, 0.2, n),
                  "moving_mean": lambda n: rng.normal(0, 0.2, n), "moving_variance": lambda n: rng.uniform(0.5, 2, n),
                  "bias": lambda n: rng.normal(0, 0.2, n)}.get(name)
        if values is not None:
            var.assign(values(var.shape).astype("float32"))
    return model


def prune_half(model, seed=0):
    """Remove a random half of every prunable group's channels (as the masks of a structured method)."""
    rng = np.random.default_rng(seed)
    masks = []
    for g in channel_groups(model):
        keep = np.ones(g.size, bool)
        keep[rng.permutation(g.size)[: g.size // 2]] = False
        masks.append(g.masks(keep))
    variables = variables_by_path(model)
    for path, m in merge(*masks).items():
        variables[path].assign(variables[path].numpy() * m)


def check_surgery(model, tmp_path, x=X):
    """Masked outputs == shrunk outputs (atol 1e-5), before and after a .keras round trip."""
    randomize(model)
    prune_half(model)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.abs(expected).max() > 1e-2  # outputs large enough for the comparison to mean something
    small, kept = shrink(model)
    assert kept and small.count_params() < model.count_params()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(small(x, training=False)), expected, atol=1e-5)
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras", safe_mode=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), expected, atol=1e-5)
    assert accounting.flops(small)[0] < accounting.flops(model)[0]
    return small, kept


def group_of(model, layer_name):
    """The group holding a producer layer's output channels."""
    return next(g for g in analyze(model).groups if layer_name in {s.layer.name for s in g.producers})


def head(x, classes=3):
    return layers.Dense(classes, name="head")(layers.GlobalAveragePooling2D(name="gap")(x))


def test_residual_addition_couples_every_producer_of_the_stage(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = layers.ReLU()(layers.BatchNormalization(name="bn0")(layers.Conv2D(6, 3, padding="same", name="c0")(inputs)))
    y = layers.Conv2D(4, 3, padding="same", name="c1")(x)
    y = layers.BatchNormalization(name="bn1")(y)
    y = layers.Conv2D(6, 3, padding="same", name="c2")(layers.ReLU()(y))
    x = layers.ReLU()(layers.Add(name="add")([x, layers.BatchNormalization(name="bn2")(y)]))
    model = keras.Model(inputs, head(x))
    stage = group_of(model, "c0")
    assert stage.reason is None and {s.layer.name for s in stage.producers} == {"c0", "c2"}
    assert {s.layer.name for s in stage.scales} == {"bn0", "bn2"}
    # consumers of the stage's channels: c1 (input axis) and the head's rows
    assert {(s.layer.name, s.role) for s in stage.slices if s.role == "input"} == {("c1", "input"), ("head", "input")}
    assert group_of(model, "c1").layers == ["c1", "bn1", "c2"]
    check_surgery(model, tmp_path)


def test_every_elementwise_merge_ties_its_inputs(tmp_path):
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(6, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(6, 1, name="b")(inputs)
    m = layers.Subtract()([a, b])
    m = layers.Multiply()([m, b])
    m = layers.Average()([m, a])
    m = layers.Maximum()([m, b])
    m = layers.Minimum()([m, a])
    m = m + layers.Conv2D(6, 1, name="c")(inputs)  # a keras op (ops.numpy.Add) merges too
    model = keras.Model(inputs, head(layers.Conv2D(5, 1, name="d")(m)))
    g = group_of(model, "a")
    assert g.reason is None and {s.layer.name for s in g.producers} == {"a", "b", "c"}
    check_surgery(model, tmp_path)


def test_concatenate_maps_each_input_to_its_slice(tmp_path):
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(6, 3, padding="same", name="b")(inputs)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, head(layers.Conv2D(5, 1, name="d")(x)))
    for name, at in (("a", range(0, 4)), ("b", range(4, 10))):
        g = group_of(model, name)
        consumer = next(s for s in g.slices if s.layer.name == "d")
        np.testing.assert_array_equal(np.flatnonzero(consumer.index >= 0), list(at))
        np.testing.assert_array_equal(consumer.index[list(at)], np.arange(len(at)))
        assert {s.layer.name for s in g.scales} == {"bn"}
    small, _ = check_surgery(model, tmp_path)
    assert small.get_layer("d").kernel.shape[2] == 2 + 3


def test_channelwise_layers_depthwise_separable_and_transposed(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c0")(inputs)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.DepthwiseConv2D(3, name="dw")(x)  # 10x10 -> 8x8, channels follow c0
    x = layers.Activation("swish")(layers.BatchNormalization(name="bn_dw")(x))
    x = layers.Dropout(0.5)(layers.LeakyReLU()(x))
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x)  # 12 channels, 2 per c0's
    x = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = layers.Cropping2D(1)(layers.MaxPooling2D(2)(x))  # 8 -> 4 -> 2
    x = layers.UpSampling2D(2)(x)
    x = layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="tr")(x)  # 4 -> 8
    x = layers.Resizing(6, 6)(layers.AveragePooling2D(1)(x))
    x = layers.PReLU(shared_axes=[1, 2], name="prelu")(x)
    outputs = layers.Dense(3, name="head")(layers.GlobalMaxPooling2D()(x))
    model = keras.Model(inputs, outputs)
    c0, sep, tr = (group_of(model, n) for n in ("c0", "sep", "tr"))
    assert all(g.reason is None for g in (c0, sep, tr))
    assert {"dw", "bn_dw", "dw2", "sep"} <= set(c0.layers)
    dw2_bias = next(s for s in c0.slices if s.layer.name == "dw2" and s.axis == 0)
    np.testing.assert_array_equal(dw2_bias.index, np.repeat(np.arange(6), 2))  # output c*2+j follows input c
    pointwise_in = next(s for s in c0.slices if s.path.endswith("pointwise_kernel"))
    np.testing.assert_array_equal(pointwise_in.index, np.repeat(np.repeat(np.arange(6), 2), 2))
    assert [s.axis for s in tr.producers] == [2] and "prelu" in tr.layers
    small, kept = check_surgery(model, tmp_path)
    assert kept == {"c0": 3, "sep": 4, "tr": 3}
    assert small.get_layer("dw2").get_weights()[0].shape == (3, 3, 3, 2)


def test_squeeze_excitation_ties_the_excitation_to_the_main_channels(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = layers.Activation("swish")(layers.Conv2D(8, 3, padding="same", name="main")(inputs))
    s = layers.GlobalAveragePooling2D()(x)
    s = layers.Reshape((1, 1, 8), name="reshape")(s)
    s = layers.Conv2D(4, 1, activation="relu", name="reduce")(s)
    s = layers.Conv2D(8, 1, activation="sigmoid", name="expand")(s)
    x = layers.Multiply(name="excite")([x, s])  # [N, 8, 8, 8] * [N, 1, 1, 8]
    model = keras.Model(inputs, head(layers.Conv2D(5, 1, name="out")(x)))
    g = group_of(model, "main")
    assert g.reason is None and {s.layer.name for s in g.producers} == {"main", "expand"}
    assert "reduce" in g.layers  # its input channels
    assert group_of(model, "reduce").reason is None
    small, _ = check_surgery(model, tmp_path)
    assert small.get_layer("reshape").target_shape == (1, 1, 4)


def test_flatten_into_dense_takes_rows_per_channel(tmp_path):
    inputs = keras.Input((4, 4, 3))
    x = layers.MaxPooling2D(2)(layers.Conv2D(4, 3, padding="same", name="c")(inputs))
    x = layers.Dense(5, name="fc")(layers.Flatten()(x))  # rows: position * 4 + channel
    model = keras.Model(inputs, layers.Dense(3, name="out")(x))
    rows = next(s for s in group_of(model, "c").slices if s.layer.name == "fc")
    np.testing.assert_array_equal(rows.index, np.tile(np.arange(4), 4))
    check_surgery(model, tmp_path, x=X[:, :4, :4])


def test_nested_functional_model(tmp_path):
    inner_in = keras.Input((8, 8, 6))
    y = layers.Conv2D(5, 3, padding="same", name="inner_conv")(inner_in)
    y = layers.ReLU()(layers.BatchNormalization(name="inner_bn")(y))
    inner = keras.Model(inner_in, y, name="block")
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="outer_conv")(inputs)
    model = keras.Model(inputs, head(inner(x)))
    assert "inner_conv" in group_of(model, "outer_conv").layers  # its input slice
    assert set(group_of(model, "inner_conv").layers) >= {"inner_conv", "inner_bn", "head"}
    small, kept = check_surgery(model, tmp_path)
    assert kept == {"outer_conv": 3, "inner_conv": 3}
    assert small.get_layer("block").get_layer("inner_conv").kernel.shape == (3, 3, 3, 3)


def test_a_layer_called_twice_ties_both_calls(tmp_path):
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 1, name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", name="b")(inputs)
    shared = layers.Conv2D(5, 1, name="shared")
    x = layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model(inputs, head(x))
    assert group_of(model, "a") is not None and "b" in {s.layer.name for s in group_of(model, "a").producers}
    check_surgery(model, tmp_path)


@pytest.mark.parametrize("build, layer, reason", [
    (lambda x: layers.Conv2D(4, 1, groups=2, name="grouped")(layers.Conv2D(4, 1, name="p")(x)), "p", "grouped conv"),
    (lambda x: layers.Lambda(lambda t: t * 2.0, name="lam")(layers.Conv2D(4, 1, name="p")(x)), "p", "Lambda"),
    (lambda x: layers.Activation("softmax")(layers.Conv2D(4, 1, name="p")(x)), "p", "softmax"),
    (lambda x: layers.LayerNormalization(name="ln")(layers.Conv2D(4, 1, name="p")(x)), "p", "LayerNormalization"),
    (lambda x: layers.Reshape((32, 8), name="rs")(layers.Conv2D(4, 1, name="p")(x)), "p", "reshapes across"),
    (lambda x: layers.Multiply()([layers.Conv2D(4, 1, name="p")(x), layers.Conv2D(1, 1, name="q")(x)]), "q",
     "broadcasts 1 channel"),
], ids=["grouped", "lambda", "softmax", "layernorm", "reshape", "broadcast"])
def test_groups_touching_what_is_not_understood_are_left_whole(build, layer, reason):
    inputs = keras.Input((8, 8, 3))
    y = build(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="head")(layers.Flatten()(y)))
    g = group_of(model, layer)
    assert g.reason is not None and reason in g.reason
    assert g not in channel_groups(model)
    rows = {r["layer"]: r["structured"] for r in accounting.layer_rows(model)}
    assert rows[layer].startswith("whole: ") and reason in rows[layer]
    assert "model output" in rows["head"]


def test_model_input_and_output_are_never_pruned():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 1, name="c")(inputs)
    model = keras.Model(inputs, x)
    assert channel_groups(model) == []
    assert "model output" in group_of(model, "c").reason
    assert any("model input" in (g.reason or "") for g in analyze(model).groups)


def test_layer_rows_say_which_group_each_layer_is_pruned_with():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 1, name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(a)
    model = keras.Model(inputs, head(layers.Add()([a, b])))
    rows = {r["layer"]: r["structured"] for r in accounting.layer_rows(model)}
    assert rows == {"a": "a", "b": "a", "head": "whole: reaches the model output"}


def test_sequential_model(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(6, 3, name="c1"), layers.BatchNormalization(),
                              layers.ReLU(), layers.Conv2D(4, 3, name="c2"), layers.Flatten(),
                              layers.Dense(5, name="fc"), layers.Dense(3, name="out")])
    assert {g.name for g in channel_groups(model)} == {"c1", "c2", "fc"}
    small, kept = check_surgery(model, tmp_path)
    assert type(small) is keras.Sequential and kept == {"c1": 3, "c2": 2, "fc": 3}
