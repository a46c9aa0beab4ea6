"""Each pruning method's masks on tiny hand-made models equal the ones worked out by hand."""

import math

import keras
import numpy as np
import pytest
from keras import layers

from pipeline.config import ConfigError
from pipeline.models import VGGBN, ResNet, SeedCNN
from pipeline.pruning import accounting
from pipeline.pruning.channel import Channel
from pipeline.pruning.filter import Filter
from pipeline.pruning.graph import channel_groups, conv_layers
from pipeline.pruning.hybrid import Hybrid
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.masks import MaskedModel
from pipeline.pruning.random import Random
from pipeline.pruning.slim import Slim

B = np.array  # masks written as 0/1 lists read more easily


def _mask(values, shape):
    return B(values, bool).reshape(shape)


# --- magnitude ----------------------------------------------------------------------------------

CONV = [-0.4, 0.1, 0.2, -0.3]  # conv1 kernel (1, 2, 1, 2), global positions 0..3
FC = [0.1, -0.2, 0.05, 0.6, -0.1, 0.7, 0.2, 0.8]  # fc kernel (8, 1), global positions 4..11


def two_layer_model():
    """conv1 (4 weights) -> flatten -> fc (8 weights), with the values above."""
    inputs = keras.Input((2, 3, 1))
    x = layers.Conv2D(2, (1, 2), name="conv1")(inputs)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(1, name="fc")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("conv1").set_weights([B(CONV, "float32").reshape(1, 2, 1, 2), np.zeros(2, "float32")])
    model.get_layer("fc").set_weights([B(FC, "float32").reshape(8, 1), np.zeros(1, "float32")])
    return model


@pytest.mark.parametrize("target, conv_keep, fc_keep", [
    (0.0, [1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]),
    # the three |0.1| tie: the two earliest positions (conv1[1], fc[0]) go, fc[4] stays
    (0.25, [1, 0, 1, 1], [0, 1, 0, 1, 1, 1, 1, 1]),
    # the three |0.2| tie: conv1[2] and fc[1] go, fc[6] stays
    (0.5, [1, 0, 0, 1], [0, 0, 0, 1, 0, 1, 1, 1]),
    # floor(0.9 * 12) = 10 pruned: only 0.7 and 0.8 remain
    (0.9, [0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 1]),
])
def test_magnitude_global_threshold(target, conv_keep, fc_keep):
    masks = Magnitude().masks(two_layer_model(), target)
    assert set(masks) == {"conv1/kernel", "fc/kernel"}
    np.testing.assert_array_equal(masks["conv1/kernel"], _mask(conv_keep, (1, 2, 1, 2)))
    np.testing.assert_array_equal(masks["fc/kernel"], _mask(fc_keep, (8, 1)))
    assert sum(int((~m).sum()) for m in masks.values()) == math.floor(target * 12)


def test_magnitude_layer_scope():
    masks = Magnitude(scope="layer").masks(two_layer_model(), 0.5)
    np.testing.assert_array_equal(masks["conv1/kernel"], _mask([1, 0, 0, 1], (1, 2, 1, 2)))
    np.testing.assert_array_equal(masks["fc/kernel"], _mask([0, 0, 0, 1, 0, 1, 1, 1], (8, 1)))


def test_magnitude_layer_scope_prunes_each_layer_to_the_target():
    masks = Magnitude(scope="layer").masks(two_layer_model(), 0.75)
    assert int((~masks["conv1/kernel"]).sum()) == 3
    assert int((~masks["fc/kernel"]).sum()) == 6


# --- filter -------------------------------------------------------------------------------------

def conv_bn_model():
    """conv1 (3 filters) -> bn1 -> relu1 -> conv2 (2 filters) -> flatten -> fc, 1x1 kernels on 2x2x2."""
    inputs = keras.Input((2, 2, 2))
    x = layers.Conv2D(3, 1, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(2, 1, name="conv2")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(3, name="fc")(x)
    model = keras.Model(inputs, outputs)
    # conv1 filter L1 norms 3, 1, 2: filter 1 is the smallest
    k1 = B([[1.0, -0.5, 1.0], [-2.0, 0.5, 1.0]], "float32").reshape(1, 1, 2, 3)
    model.get_layer("conv1").set_weights([k1, B([0.1, 0.2, 0.3], "float32")])
    model.get_layer("bn1").set_weights([B([1.0, 2.0, 3.0], "float32"), B([0.5, 0.6, 0.7], "float32"),
                                        B([0.1, 0.1, 0.1], "float32"), B([2.0, 2.0, 2.0], "float32")])
    # conv2 filter L1 norms 3 and 1.5: filter 1 is the smallest
    k2 = B([[1.0, 0.5], [1.0, -0.5], [-1.0, 0.5]], "float32").reshape(1, 1, 3, 2)
    model.get_layer("conv2").set_weights([k2, B([0.3, 0.4], "float32")])
    rng = np.random.default_rng(0)
    model.get_layer("fc").set_weights([rng.normal(size=(8, 3)).astype("float32"), np.zeros(3, "float32")])
    return model


def test_filter_masks_filter_bias_batchnorm_and_consumers():
    masks = Filter().masks(conv_bn_model(), 0.5)  # floor(1.5) = 1 of 3, floor(1) = 1 of 2
    assert set(masks) == {"conv1/kernel", "conv1/bias", "bn1/gamma", "bn1/beta", "conv2/kernel", "conv2/bias",
                          "fc/kernel"}
    expected = np.ones((1, 1, 2, 3), bool)
    expected[..., 1] = False
    np.testing.assert_array_equal(masks["conv1/kernel"], expected)
    for path in ("conv1/bias", "bn1/gamma", "bn1/beta"):
        np.testing.assert_array_equal(masks[path], [True, False, True])
    # conv2: its own filter 1 goes, and its input channel 1 (conv1's filter 1) too
    expected = np.ones((1, 1, 3, 2), bool)
    expected[:, :, 1, :] = False
    expected[..., 1] = False
    np.testing.assert_array_equal(masks["conv2/kernel"], expected)
    np.testing.assert_array_equal(masks["conv2/bias"], [True, False])
    # fc after flatten of (2, 2, 2) channels-last: row r holds channel r % 2
    rows = np.arange(8)
    np.testing.assert_array_equal(masks["fc/kernel"], np.broadcast_to((rows % 2 != 1)[:, None], (8, 3)))


def test_filter_next_conv_input_slice_is_masked_alone():
    masks = Filter(ratios={"conv2": 0.0}).masks(conv_bn_model(), 0.5)
    expected = np.ones((1, 1, 3, 2), bool)
    expected[:, :, 1, :] = False
    np.testing.assert_array_equal(masks["conv2/kernel"], expected)
    assert masks["fc/kernel"].all() and masks["conv2/bias"].all()


def test_filter_keeps_at_least_one_filter_and_checks_ratios():
    masks = Filter().masks(conv_bn_model(), 0.99)
    assert masks["conv1/bias"].sum() == 1 and masks["conv2/bias"].sum() == 1
    with pytest.raises(ValueError, match="conv9"):
        Filter(ratios={"conv9": 0.5}).masks(conv_bn_model(), 0.5)
    with pytest.raises(ConfigError):
        Filter(ratios={"conv1": 1.0})


def test_pruned_filter_outputs_exactly_zero():
    model = conv_bn_model()
    x = np.random.default_rng(1).normal(size=(16, 2, 2, 2)).astype("float32")
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in ("conv1", "bn1", "relu1", "conv2")])
    before = [np.asarray(o) for o in probe.predict(x, verbose=0)]
    assert all(np.abs(o[..., 1]).max() > 0 for o in before)
    MaskedModel(model, Filter().masks(model, 0.5))
    conv1, bn1, relu1, conv2 = [np.asarray(o) for o in probe.predict(x, verbose=0)]
    for out in (conv1, bn1, relu1, conv2):
        assert np.all(out[..., 1] == 0.0)
        assert np.abs(out[..., 0]).max() > 0
    np.testing.assert_allclose(bn1[..., [0, 2]], before[1][..., [0, 2]], rtol=1e-6)


# --- slim ---------------------------------------------------------------------------------------

def two_bn_model(gammas1=(0.1, -0.9, 0.05, 0.5), gammas2=(0.2, 0.01, 0.3)):
    inputs = keras.Input((2, 2, 1))
    x = inputs
    for i, gammas in enumerate((gammas1, gammas2), start=1):
        x = layers.Conv2D(len(gammas), 1, use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(2, name="fc")(x)
    model = keras.Model(inputs, outputs)
    for i, gammas in enumerate((gammas1, gammas2), start=1):
        bn = model.get_layer(f"bn{i}")
        bn.gamma.assign(B(gammas, "float32"))
        bn.beta.assign(np.full(len(gammas), 0.1, "float32"))
    return model


def test_slim_global_threshold_on_gamma():
    masks = Slim().masks(two_bn_model(), 3 / 7)  # 0.01 (bn2), 0.05 and 0.1 (bn1) go
    np.testing.assert_array_equal(masks["bn1/gamma"], [False, True, False, True])
    np.testing.assert_array_equal(masks["bn1/beta"], [False, True, False, True])
    np.testing.assert_array_equal(masks["bn2/gamma"], [True, False, True])
    conv1 = np.broadcast_to([False, True, False, True], (1, 1, 1, 4))
    np.testing.assert_array_equal(masks["conv1/kernel"], conv1)
    conv2 = np.ones((1, 1, 4, 3), bool)
    conv2[:, :, [0, 2], :] = False
    conv2[..., 1] = False
    np.testing.assert_array_equal(masks["conv2/kernel"], conv2)
    # global average pooling -> fc: one row per channel of conv2
    np.testing.assert_array_equal(masks["fc/kernel"], np.broadcast_to([[True], [False], [True]], (3, 2)))


def test_slim_never_empties_a_layer():
    masks = Slim().masks(two_bn_model(), 0.99)
    np.testing.assert_array_equal(masks["bn1/gamma"], [False, True, False, False])
    np.testing.assert_array_equal(masks["bn2/gamma"], [False, False, True])
    model = VGGBN(widths=[4, 6], pool_after=[], hidden=8).build((4, 4, 1), 3)
    for target in (0.99, 0.9):
        masks = Slim().masks(model, target)
        assert all(masks[f"bn{i}/gamma"].sum() >= 1 for i in (1, 2))


def test_slim_without_batchnorm_uses_the_l2_norm():
    """Filter a = [1, 1, 1, 1] (L1 4, L2 2), filter b = [3, 0, 0, 0] (L1 3, L2 3), filter c large."""
    inputs = keras.Input((2, 2, 1))
    x = layers.Conv2D(3, 2, padding="same", name="conv1")(inputs)
    x = layers.Conv2D(2, 1, name="conv2")(x)
    outputs = layers.Dense(2, name="fc")(layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, outputs)
    k = np.zeros((2, 2, 1, 3), "float32")
    k[..., 0] = 1.0
    k[0, 0, 0, 1] = 3.0
    k[..., 2] = 5.0
    model.get_layer("conv1").set_weights([k, np.zeros(3, "float32")])
    model.get_layer("conv2").set_weights([np.full((1, 1, 3, 2), 10.0, "float32"), np.zeros(2, "float32")])
    slim = Slim().masks(model, 0.2)  # floor(0.2 * 5) = 1 channel of 5
    np.testing.assert_array_equal(slim["conv1/bias"], [False, True, True])
    filt = Filter(ratios={"conv2": 0.0}).masks(model, 0.34)  # L1 picks the other filter
    np.testing.assert_array_equal(filt["conv1/bias"], [True, False, True])
    assert Slim().penalty(model) is None


def test_slim_regularize_adds_l1_penalty_to_losses():
    model = two_bn_model()
    assert model.losses == []
    Slim(penalty_l1=0.01).regularize(model)
    losses = [float(v) for v in model.losses]
    assert len(losses) == 2
    assert sorted(losses) == pytest.approx(sorted([0.01 * 1.55, 0.01 * 0.51]))
    assert Slim(penalty_l1=0.01).penalty(model) == {"slim_l1": 0.01}
    model = two_bn_model()
    Slim(penalty_l1=0.0).regularize(model)
    assert model.losses == []
    with pytest.raises(ConfigError):
        Slim(penalty_l1=-1.0)


# --- hybrid, random -----------------------------------------------------------------------------

def test_hybrid_prunes_within_each_filter():
    inputs = keras.Input((3, 3, 2))
    x = layers.Conv2D(2, (1, 2), name="conv1")(inputs)
    outputs = layers.Dense(2, name="fc")(layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, outputs)
    k = np.zeros((1, 2, 2, 2), "float32")
    k[..., 0] = B([[0.4, -0.1], [0.3, 0.2]])  # per-filter order (kw, cin): 0.4, -0.1, 0.3, 0.2
    k[..., 1] = B([[0.1, 0.1], [-5.0, 0.1]])  # ties: the two earliest 0.1 go
    model.get_layer("conv1").set_weights([k, np.zeros(2, "float32")])
    masks = Hybrid().masks(model, 0.5)
    assert set(masks) == {"conv1/kernel"}  # dense layers are not touched
    expected = np.zeros((1, 2, 2, 2), bool)
    expected[..., 0] = [[True, False], [True, False]]
    expected[..., 1] = [[False, False], [True, True]]
    np.testing.assert_array_equal(masks["conv1/kernel"], expected)
    masks = Hybrid().masks(model, 0.8)  # floor(0.8 * 4) = 3 of each filter's 4
    assert (masks["conv1/kernel"].reshape(4, 2).sum(axis=0) == 1).all()


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_random_prunes_exactly_the_target_count_over_the_magnitude_pool(target):
    model = SeedCNN().build((8, 8, 1), 10)
    masks = Random().masks(model, target, seed=3)
    reference = Magnitude().masks(model, target)
    assert set(masks) == set(reference)
    assert all(masks[p].shape == reference[p].shape for p in masks)
    n = sum(m.size for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == math.floor(target * n)


def test_random_depends_on_the_seed():
    model = two_layer_model()
    same = [Random().masks(model, 0.5, seed=s) for s in (1, 1)]
    for p in same[0]:
        np.testing.assert_array_equal(same[0][p], same[1][p])
    patterns = {tuple(np.concatenate([m.ravel() for m in Random().masks(model, 0.5, seed=s).values()]))
                for s in range(6)}
    assert len(patterns) > 1


def test_bad_method_options_raise_config_error():
    with pytest.raises(ConfigError):
        Magnitude(scope="model")


# --- measured sparsity, channel groups ----------------------------------------------------------

METHODS = [Magnitude(), Magnitude(scope="layer"), Filter(), Slim(), Hybrid(), Random()]


@pytest.mark.parametrize("spec", [SeedCNN(), VGGBN(widths=[8, 8, 16], hidden=32)], ids=lambda s: s.name)
def test_measured_sparsity_grows_with_the_target(spec):
    keras.utils.set_random_seed(0)
    model = spec.build((8, 8, 1), 10)
    weights = model.get_weights()
    for method in METHODS:
        measured = []
        for target in (0.2, 0.5, 0.8):
            model.set_weights(weights)
            masked = MaskedModel(model, method.masks(model, target, seed=0))
            measured.append(accounting.summary(model)["sparsity"])
            masked.detach()
        assert measured[0] < measured[1] < measured[2], (method.name, measured)


def test_channel_groups_on_resnet_couple_each_stage_through_its_additions():
    model = ResNet(blocks=2, width=4).build((8, 8, 1), 10)
    groups = {g.name: g for g in channel_groups(model)}
    inner = [f"s{s}b{b}_1_conv" for s in (1, 2, 3) for b in (1, 2)]
    for name in inner:  # a block's first conv: its filters, its BatchNorm, the second conv's input
        assert groups[name].layers == [name, name.replace("_conv", "_bn"), name.replace("_1_", "_2_")]
    stages = [g for g in groups.values() if g.name not in inner]
    assert [sorted(s.layer.name for s in g.producers) for g in stages] == [
        ["s1b1_2_conv", "s1b2_2_conv", "stem_conv"],
        ["s2b1_2_conv", "s2b1_proj", "s2b2_2_conv"],
        ["s3b1_2_conv", "s3b1_proj", "s3b2_2_conv"]]
    assert "classifier" in stages[-1].layers  # rows of the classifier after global pooling
    assert {c.name for c in conv_layers(model)} == {s.layer.name for g in groups.values() for s in g.producers}


# --- channel: importance criteria, scope, round_to ----------------------------------------------

def residual_model():
    """c0 (4 filters) -> bn0 -> add(c0, c1(c0)) -> gap -> fc: c0 and c1 share one group of 4 channels;
    c0's filters have L1 norms 4, 1, 3, 2 and c1's 1, 1, 1, 1 (L2 norms: 2, 1, 1.5, 1 and 0.5 each)."""
    inputs = keras.Input((2, 2, 1))
    x = layers.Conv2D(4, (2, 2), padding="same", use_bias=False, name="c0")(inputs)
    x = layers.BatchNormalization(name="bn0")(x)
    y = layers.Conv2D(4, 1, use_bias=False, name="c1")(x)
    x = layers.Add(name="add")([x, y])
    model = keras.Model(inputs, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D(name="gap")(x)))
    k0 = np.zeros((2, 2, 1, 4), "float32")
    k0[..., 0] = 1.0  # L1 4, L2 2
    k0[0, 0, 0, 1] = 1.0  # L1 1, L2 1
    k0[0, :, 0, 2] = 1.5  # L1 3, L2 2.12
    k0[:, 0, 0, 3] = [1.0, 1.0]  # L1 2, L2 1.41
    model.get_layer("c0").set_weights([k0])
    model.get_layer("c1").set_weights([np.full((1, 1, 4, 4), 0.25, "float32")])
    bn = model.get_layer("bn0")
    bn.gamma.assign(B([0.5, 2.0, 1.0, 0.1], "float32"))
    return model


def channel_keep(masks):
    return masks["c0/kernel"].reshape(-1, 4).all(axis=0)


@pytest.mark.parametrize("importance, pruned", [
    ("l1", [1, 3]),  # c0's L1 / mean 2.5 = 1.6, 0.4, 1.2, 0.8 plus c1's 1, 1, 1, 1
    ("l2", [1, 3]),
    ("bn", [0, 3]),  # |gamma| 0.5, 2, 1, 0.1
    ("fpgm", [1, 3]),  # summed distances to the other filters 4.73, 4.31, 5.03, 4.29
])
def test_channel_importance_on_a_coupled_group(importance, pruned):
    masks = Channel(importance=importance).masks(residual_model(), 0.5)
    keep = np.ones(4, bool)
    keep[pruned] = False
    np.testing.assert_array_equal(channel_keep(masks), keep)
    # every coupled weight follows: c1's filters and input rows, bn0's gamma and beta, fc's rows
    np.testing.assert_array_equal(masks["bn0/gamma"], keep)
    np.testing.assert_array_equal(masks["c1/kernel"][0, 0], np.outer(keep, keep))
    np.testing.assert_array_equal(masks["fc/kernel"].all(axis=1), keep)


def test_fpgm_scores_the_summed_distance_to_the_other_filters():
    from pipeline.pruning.graph import channel_groups as groups
    from pipeline.pruning.importance import FPGM

    model = residual_model()
    g = groups(model)[0]
    scores = FPGM().layer_scores(g)
    filters = model.get_layer("c0").kernel.numpy().reshape(4, 4).T
    expected = [sum(np.linalg.norm(f - h) for h in filters) for f in filters]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
    assert np.allclose(scores[1], 0)  # c1's filters are all alike


def test_channel_taylor_needs_data_and_scores_unused_channels_lowest(digits):
    inputs = keras.Input(digits.input_shape)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="c0")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(digits.num_classes, activation="softmax", name="fc")(x))
    fc = model.get_layer("fc")
    k = fc.kernel.numpy()
    k[[1, 2]] = 0.0  # channels 1 and 2 reach the output through zero weights: no gradient, no importance
    fc.kernel.assign(k)
    method = Channel(importance="taylor")
    with pytest.raises(ValueError, match="taylor needs"):
        method.masks(model, 0.5)
    method.bind(digits)
    np.testing.assert_array_equal(channel_keep_of(method.masks(model, 0.5), "c0/kernel"), [True, False, False, True])


def channel_keep_of(masks, path):
    m = masks[path]
    return m.reshape(-1, m.shape[-1]).all(axis=0)


def kept_channels(masks) -> dict[str, int]:
    owners = (("conv1", "bn1/gamma"), ("conv2", "bn2/gamma"), ("dense1", "dense1/bias"))
    return {n: int(masks[p].sum()) for n, p in owners}


def test_channel_scope_global_ranks_every_group_together_and_never_empties_one():
    keras.utils.set_random_seed(0)
    model = VGGBN(widths=[4, 8], pool_after=[], hidden=8).build((4, 4, 1), 3)
    masks = Channel(scope="global").masks(model, 0.5)
    assert sum(kept_channels(masks).values()) == 20 - 10
    assert kept_channels(Channel(scope="layer").masks(model, 0.5)) == {"conv1": 2, "conv2": 4, "dense1": 4}
    # scores are normalised per layer: a layer's scale does not decide how much of it goes
    conv1 = model.get_layer("conv1").kernel
    conv1.assign(conv1.numpy() * 100)
    assert kept_channels(Channel(scope="global").masks(model, 0.5)) == kept_channels(masks)
    assert all(k >= 1 for k in kept_channels(Channel(scope="global").masks(model, 0.99)).values())


@pytest.mark.parametrize("size, target, round_to, kept", [
    (32, 0.5, 8, 16), (32, 0.6, 8, 16), (32, 0.7, 8, 16), (32, 0.8, 8, 8), (32, 0.99, 8, 8), (6, 0.5, 8, 6),
    (16, 0.9, 1, 2), (16, 0.99, 1, 1)])
def test_round_to_keeps_multiples_and_never_zero(size, target, round_to, kept):
    from pipeline.pruning.channel import kept_count

    # floor(0.6 * 32) = 19 pruned -> 13 kept -> rounded up to 16; never more pruned than the target says
    assert kept_count(size, math.floor(target * size + 1e-9), round_to) == kept


def test_channel_round_to_on_a_model():
    model = VGGBN(widths=[16, 24], pool_after=[], hidden=8).build((4, 4, 1), 3)
    assert kept_channels(Channel(round_to=8).masks(model, 0.6)) == {"conv1": 8, "conv2": 16, "dense1": 8}


def test_channel_random_is_seeded_and_removed_channels_go_first():
    model = residual_model()
    a, b = (channel_keep(Channel(importance="random").masks(model, 0.5, seed=s)) for s in (1, 1))
    np.testing.assert_array_equal(a, b)
    assert len({tuple(channel_keep(Channel(importance="random").masks(model, 0.5, seed=s))) for s in range(8)}) > 1
    # after pruning, the same masks come out again, whatever the criterion (pipeline.verify relies on it)
    for importance in ("l1", "l2", "bn", "fpgm", "random"):
        model = residual_model()
        method = Channel(importance=importance)
        masks = method.masks(model, 0.5, seed=3)
        MaskedModel(model, masks).detach()
        again = method.masks(model, 0.5, seed=3)
        assert all(np.array_equal(again[p], masks[p]) for p in masks), importance


@pytest.mark.parametrize("options", [{"importance": "l3"}, {"scope": "model"}, {"round_to": 0},
                                     {"aggregate": "median"}])
def test_bad_channel_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        Channel(**options)


def test_channel_config_composes_and_builds():
    from conftest import compose_config

    from pipeline.config import build

    cfg = compose_config(["method=channel", "method.importance=fpgm", "method.scope=global", "method.round_to=8"])
    method = build("method", cfg.method)
    assert (method.name, method.importance, method.scope, method.round_to) == ("channel", "fpgm", "global", 8)


# --- unstructured methods on every kernel kind --------------------------------------------------

def every_kernel_model():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)  # 8 channels
    x = layers.SeparableConv2D(5, 3, padding="same", name="sep")(x)
    x = layers.Conv2DTranspose(3, 3, strides=2, padding="same", name="tr")(x)  # 12x12
    outputs = layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


KERNELS = {"conv/kernel": (3, 3, 2, 4), "dw/kernel": (3, 3, 4, 2), "sep/depthwise_kernel": (3, 3, 8, 1),
           "sep/pointwise_kernel": (1, 1, 8, 5), "tr/kernel": (3, 3, 3, 5), "fc/kernel": (3, 2)}


@pytest.mark.parametrize("method, per_kernel", [(Magnitude(), False), (Magnitude(scope="layer"), True),
                                                (Random(), False)], ids=["global", "layer", "random"])
def test_unstructured_methods_cover_every_kernel(method, per_kernel):
    masks = method.masks(every_kernel_model(), 0.5)
    assert {p: m.shape for p, m in masks.items()} == KERNELS
    sizes = [int(np.prod(s)) for s in KERNELS.values()]
    expected = sum(n // 2 for n in sizes) if per_kernel else sum(sizes) // 2
    assert sum(int((~m).sum()) for m in masks.values()) == expected


def test_hybrid_prunes_within_each_filter_of_every_conv_kind():
    model = every_kernel_model()
    masks = Hybrid().masks(model, 0.5)
    assert set(masks) == set(KERNELS) - {"fc/kernel"}
    # a filter = the weights making one output channel
    per_filter = {"conv/kernel": masks["conv/kernel"].reshape(-1, 4),  # 3*3*2 = 18 weights, 9 pruned
                  "dw/kernel": masks["dw/kernel"].reshape(9, 8),  # one 3x3 per (input channel, multiplier)
                  "sep/depthwise_kernel": masks["sep/depthwise_kernel"].reshape(9, 8),
                  "sep/pointwise_kernel": masks["sep/pointwise_kernel"].reshape(8, 5),
                  "tr/kernel": np.moveaxis(masks["tr/kernel"], 2, -1).reshape(-1, 3)}  # output axis 2
    for path, m in per_filter.items():
        assert (m.sum(axis=0) == m.shape[0] - m.shape[0] // 2).all(), path


def test_accounting_counts_macs_of_every_kernel_kind():
    rows = {r["layer"]: r for r in accounting.layer_rows(every_kernel_model())}
    assert rows["conv"]["macs_dense"] == 3 * 3 * 2 * 4 * 36
    assert rows["dw"]["macs_dense"] == 3 * 3 * 4 * 2 * 36
    assert rows["sep"]["macs_dense"] == (3 * 3 * 8 + 8 * 5) * 36
    assert rows["sep"]["shape"] == "3x3x8x1+1x1x8x5"
    assert rows["tr"]["macs_dense"] == 3 * 3 * 5 * 3 * 36  # each input position scatters the whole kernel
    assert rows["fc"]["macs_dense"] == 3 * 2
    assert [r["conv"] for r in rows.values()] == [True, True, True, True, False]
