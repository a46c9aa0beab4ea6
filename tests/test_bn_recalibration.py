"""Precise BatchNorm: statistics recomputed after a phase (pipeline.stages.recalibrate), and ResNet's input_size."""

import keras
import numpy as np
import pytest
from conftest import compose_config
from keras import layers

from pipeline.baseline import baseline_spec, seed_everything
from pipeline.config import ConfigError, Phase, identity, validate
from pipeline.models import RESIZE, VGGBN, ResNet
from pipeline.pruning.filter import Filter
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.schedule import OneShot
from pipeline.pruning.surgery import shrink
from pipeline.stages import evaluate
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune
from pipeline.stages.recalibrate import after_phase, recalibrate, recalibrated_layers
from pipeline.stages.train import train_baseline


def conv_bn_model(digits, blocks: int, momentum: float = 0.99, dropout: float = 0.0):
    """`blocks` x (conv 8 filters, BatchNorm, ReLU), global average pooling, a softmax classifier."""
    inputs = keras.Input(digits.input_shape)
    x = inputs
    for i in range(1, blocks + 1):
        x = layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.Dropout(dropout, seed=1, name="drop")(x) if dropout else x
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, layers.Dense(digits.num_classes, activation="softmax", name="classifier")(x))


def accuracy(model, data) -> float:
    return evaluate.test_metrics(model, data)["accuracy"]


def weights_except_statistics(model) -> list[np.ndarray]:
    stats = {id(v) for layer in recalibrated_layers(model) for v in (layer.moving_mean, layer.moving_variance)}
    return [v.numpy().copy() for v in model.variables if id(v) not in stats]


def reference_statistics(model, x: np.ndarray, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BatchNorm layer: the mean over batches of its batch mean and (biased) variance, in numpy, each batch
    normalised by its own statistics as in training; the convs and the ReLU applied by their layers."""
    per_layer = {}
    for start in range(0, len(x), batch_size):
        h = x[start:start + batch_size]
        for i in (1, 2):
            h = keras.ops.convert_to_numpy(model.get_layer(f"conv{i}")(h))
            mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
            bn = model.get_layer(f"bn{i}")
            h = np.maximum(bn.gamma.numpy() * (h - mean) / np.sqrt(var + bn.epsilon) + bn.beta.numpy(), 0)
            per_layer.setdefault(f"bn{i}", []).append((mean, var))
    return {name: tuple(np.mean(s, axis=0) for s in zip(*stats)) for name, stats in per_layer.items()}


def test_statistics_equal_an_independent_reference(digits):
    keras.utils.set_random_seed(0)
    model = conv_bn_model(digits, 2, dropout=0.5)  # dropout after the BatchNorms: its seed state is restored
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):  # gamma and beta away from 1 and 0, stale statistics
        n = model.get_layer(name).gamma.shape[0]
        model.get_layer(name).set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), np.full(n, 5.0),
                                           np.full(n, 9.0)])
    before = weights_except_statistics(model)
    used = recalibrate(model, digits, 200, 50)
    assert used == 200
    expected = reference_statistics(model, digits.x_train[:200], 50)
    for name, (mean, var) in expected.items():
        bn = model.get_layer(name)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.99
    for old, new in zip(before, weights_except_statistics(model)):  # kernels, gamma/beta, dropout's seed
        np.testing.assert_array_equal(old, new)
    # more images than the split has: all of it, the last batch smaller
    assert recalibrate(model, digits, 10**6, 500) == digits.sizes["train"]


def test_stale_statistics_of_a_slow_momentum_are_repaired(digits):
    """Momentum 0.999 over about 40 steps an epoch: the moving statistics are still the initial ones, so
    the model evaluates at chance while it trains well; recalibrated, it evaluates as it trains."""
    seed_everything(0, True)
    model = conv_bn_model(digits, 3, momentum=0.999)
    history = train_baseline(model, digits, Phase(epochs=4, batch_size=32, lr=0.01), Magnitude())
    trained = history["accuracy"][-1]
    assert trained > 0.85
    assert accuracy(model, digits) < trained - 0.4
    stale_val = history["val_accuracy"][-1]
    after_phase(model, digits, history, 4096, 32)
    assert accuracy(model, digits) > trained - 0.05
    # the phase's last validation figures are the recalibrated model's
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    assert history["val_accuracy"][-1] == pytest.approx(model.evaluate(digits.batches("val", 256), verbose=0)[1])
    assert history["val_accuracy"][-1] > stale_val + 0.4


def test_a_model_without_batchnorm_is_untouched(digits):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(digits.input_shape), layers.Conv2D(4, 3), layers.Flatten(),
                              layers.Dense(digits.num_classes, activation="softmax")])
    before = [w.copy() for w in model.get_weights()]
    history = {"val_accuracy": [0.5], "val_loss": [1.0]}
    after_phase(model, digits, history, 4096, 32)
    assert history == {"val_accuracy": [0.5], "val_loss": [1.0]} and not model.compiled
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # off: a model with BatchNorm keeps its statistics
    model = conv_bn_model(digits, 1)
    before = [w.copy() for w in model.get_weights()]
    assert recalibrate(model, digits, 0, 32) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_masked_zeros_and_surgery_hold_after_recalibration(digits):
    seed_everything(0, True)
    model = VGGBN(widths=[8, 16], pool_after=[1], hidden=16).build(digits.input_shape, digits.num_classes)
    train_baseline(model, digits, Phase(epochs=1, batch_size=64, lr=0.01), Filter(), bn_recalibration=512)
    masked = prune(model, Filter(), 0.5, seed=0)
    phase = Phase(epochs=1, batch_size=64)
    finetune(masked, digits, phase, Filter(), OneShot(target=0.5), seed=0, bn_recalibration=512)
    # the statistics are those of the fine-tuned, masked model: recomputing them changes nothing
    stats = [v.numpy().copy() for n in ("bn1", "bn2") for v in model.get_layer(n).non_trainable_variables]
    recalibrate(model, digits, 512, phase.batch_size)
    again = [v.numpy() for n in ("bn1", "bn2") for v in model.get_layer(n).non_trainable_variables]
    for old, new in zip(stats, again):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-7)
    weights = {v.path: v.numpy() for v in model.variables}
    for path, mask in masked.masks.items():
        assert np.all(weights[path][~mask] == 0), path
    masked.detach()
    small, kept = shrink(model)
    assert kept
    x = digits.x_test[:64]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(small(x, training=False)),
                               keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)


def test_the_option_is_validated_and_part_of_the_baseline_identity():
    cfg = compose_config(["training.bn_recalibration=-1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith("training.bn_recalibration=-1 is not allowed") and "\n" not in str(e.value)
    specs = []
    for images in (4096, 0):
        cfg = compose_config(["model=vgg_bn", f"training.bn_recalibration={images}"])
        parts = validate(cfg)
        ident = identity(cfg.seed, parts, "digest")
        specs.append(baseline_spec(ident, None))
        assert "bn_recalibration" not in baseline_spec(ident, None, pretrained=True)  # a trained file: as it is
    assert specs[0]["bn_recalibration"] == 4096 and specs[1]["bn_recalibration"] == 0


def test_resnet_input_size(digits):
    model = ResNet(blocks=1, width=4, input_size=16).build(digits.input_shape, digits.num_classes)
    assert tuple(model.input_shape[1:]) == digits.input_shape
    assert tuple(model.get_layer(RESIZE).output.shape[1:3]) == (16, 16)
    assert tuple(model.get_layer("stem_conv").output.shape[1:]) == (16, 16, 4)
    plain = ResNet(blocks=1, width=4).build(digits.input_shape, digits.num_classes)
    assert RESIZE not in [layer.name for layer in plain.layers]  # null: the data's size, no layer added
    assert validate(compose_config(["model=resnet", "model.input_size=32"]))["model"].input_size == 32
    with pytest.raises(ConfigError, match=r"model\.input_size=0 is not allowed"):
        validate(compose_config(["model=resnet", "model.input_size=0"]))
