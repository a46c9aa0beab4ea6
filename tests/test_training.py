"""Training on real data: the tf.data pipeline, lr schedules, normalisation and augmentation."""

import dataclasses

import keras
import numpy as np
import pytest
from conftest import compose_config

from pipeline.baseline import seed_everything
from pipeline.config import ConfigError, Phase, validate
from pipeline.data import Digits, Npz
from pipeline.stages import train


@pytest.fixture
def rgb(tmp_path):
    """An Npz source of 60 + 20 random 6x6 RGB uint8 images in 3 classes, with per-channel offsets."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 120, (80, 6, 6, 3)) + np.array([0, 60, 120])
    y = np.arange(80) % 3
    np.savez(tmp_path / "rgb.npz", x_train=x[:60].astype(np.uint8), y_train=y[:60],
             x_test=x[60:].astype(np.uint8), y_test=y[60:])
    return lambda **options: Npz(path=str(tmp_path / "rgb.npz"), **options)


def tiny_model(data):
    return keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(data.num_classes, activation="softmax")])


class LearningRates(keras.callbacks.Callback):
    """The optimizer's learning rate at the start of every training step."""

    def on_train_begin(self, logs=None):
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def rates(data, schedule, epochs=2, batch_size=32):
    seed_everything(0, True)
    record = LearningRates()
    train.fit(tiny_model(data), data, Phase(epochs=epochs, batch_size=batch_size, lr=0.01, schedule=schedule),
              "t", callbacks=[record], fast=False)  # per-step callbacks: the fast path calls them once per call
    assert len(record.seen) == train.steps_per_epoch(data, Phase(batch_size=batch_size)) * epochs
    return record.seen


@pytest.fixture(scope="module")
def few():
    return Digits(limit=256).load(0)  # 218 training examples: 7 steps of 32 per epoch


def test_cosine_schedule_decays_over_the_phase(few):
    seen = rates(few, "cosine", epochs=2)  # 14 steps
    assert seen[0] == pytest.approx(0.01)
    assert seen[7] == pytest.approx(0.005, rel=1e-4)  # half way: cos(pi / 2)
    assert seen[-1] == pytest.approx(0.01 * (1 + np.cos(np.pi * 13 / 14)) / 2, rel=1e-4)
    assert all(a > b for a, b in zip(seen, seen[1:]))


def test_step_schedule_divides_by_ten_at_half_and_three_quarters(few):
    seen = rates(few, "step", epochs=4)  # 28 steps
    assert seen == pytest.approx([0.01] * 14 + [0.001] * 7 + [0.0001] * 7)


def test_constant_schedule_is_the_default(few):
    assert Phase().schedule == "constant"
    assert rates(few, "constant", epochs=1) == pytest.approx([0.01] * 7)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_the_fast_path_follows_the_same_schedule(few, schedule):
    phase = Phase(epochs=4, batch_size=32, lr=0.01, schedule=schedule)
    weights = []
    for fast in (True, False):
        seed_everything(0, True)
        model = tiny_model(few)
        train.fit(model, few, phase, "t", fast=fast)
        weights.append(model.get_weights())
    for fast, plain in zip(*weights):
        np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-7)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"finetune\.schedule='linear'.*constant, cosine, step"):
        validate(compose_config(["training.finetune.schedule=linear"]))


def test_normalize_standardises_every_split_with_the_training_statistics(rgb):
    raw, norm = rgb().load(0), rgb(normalize=True).load(0)
    assert raw.normalization == {}
    np.testing.assert_allclose(norm.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(norm.x_train.std(axis=(0, 1, 2)), 1, atol=1e-5)
    mean, std = (np.float32(norm.normalization[k]) for k in ("mean", "std"))
    np.testing.assert_allclose(mean, raw.x_train.mean(axis=(0, 1, 2)), rtol=1e-5)
    for split in ("x_val", "x_test"):
        np.testing.assert_allclose(getattr(norm, split), (getattr(raw, split) - mean) / std, atol=1e-5)
    assert norm.digest == raw.digest  # the content; normalize is part of the config
    assert rgb(normalize=True).load(0).normalization == norm.normalization  # verify sees the same inputs


def images(data, seed=7, epochs=1):
    """The training images of each epoch, through one pipeline (the last epoch's, or a list of all)."""
    batches = train.training_batches(data, 16, seed)
    seen = [np.concatenate([x.numpy() for x, _ in batches]) for _ in range(epochs)]
    return seen[0] if epochs == 1 else seen


def test_augmentation_is_off_by_default(rgb):
    data = rgb().load(0)
    assert (data.crop, data.flip) == (0, False)
    np.testing.assert_array_equal(np.sort(images(data).reshape(-1)), np.sort(data.x_train.reshape(-1)))


def test_augment_changes_training_batches_only(rgb):
    plain, augmented = rgb().load(0), rgb(augment=True).load(0)
    assert (augmented.crop, augmented.flip) == (4, True)
    for split in ("x_val", "x_test", "x_train"):  # the arrays are the data as loaded
        np.testing.assert_array_equal(getattr(augmented, split), getattr(plain, split))
    once, again = images(augmented, epochs=2)
    assert once.shape == plain.x_train.shape and not np.array_equal(once, images(plain))
    assert not np.array_equal(np.sort(once, axis=0), np.sort(again, axis=0))  # new crops each epoch
    np.testing.assert_array_equal(once, images(augmented))  # a new pipeline, the same seed: the same batches
    val = np.concatenate([x.numpy() for x, _ in train.validation_batches(augmented, 16)])
    np.testing.assert_array_equal(val, plain.x_val)


def test_flip_mirrors_some_images_and_leaves_the_rest(rgb):
    data = dataclasses.replace(rgb().load(0), crop=0, flip=True)
    plain = images(dataclasses.replace(data, flip=False))
    flipped = images(data)
    same = [np.array_equal(a, b) for a, b in zip(flipped, plain)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < len(plain)


def test_digit_data_sets_are_never_flipped():
    data = Digits(augment=True, limit=64).load(0)
    assert (data.crop, data.flip) == (4, False)


def test_the_same_seed_gives_the_same_history(rgb):
    data = rgb(augment=True, normalize=True).load(3)

    def history():
        seed_everything(3, True)
        out = train.fit(tiny_model(data), data, Phase(epochs=3, batch_size=8, schedule="cosine"), "t")
        return {k: v for k, v in out.items() if k != "seconds"}
    assert history() == history()


@pytest.mark.parametrize("make", [
    lambda lib: lib.Adam(0.01),
    lambda lib: lib.Adam(0.01, weight_decay=0.1),
    lambda lib: lib.SGD(0.05, momentum=0.9),
    lambda lib: lib.Adam(keras.optimizers.schedules.CosineDecay(0.01, 20)),
])
def test_fused_optimizers_make_kerass_updates(make):
    """Fed the same gradients, the fused updates (one op per variable, the step's scalars shared by all)
    move weights and slots as Keras's."""
    import tensorflow as tf

    from pipeline.stages import optimizers

    rng = np.random.default_rng(0)
    shapes = [(5, 4), (3,)]
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    gradients = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(20)]

    def train(opt):
        ws = [keras.Variable(s) for s in start]
        opt.build(ws)
        apply = tf.function(lambda gs: opt.apply(gs, ws))
        for gs in gradients:
            apply([tf.constant(g) for g in gs])
        return [*(w.numpy() for w in ws), *(v.numpy() for v in opt.variables)]

    results = [train(make(lib)) for lib in (keras.optimizers, optimizers)]
    assert type(make(optimizers)).update_step is not type(make(keras.optimizers)).update_step
    for ours, theirs in zip(*results, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # float32 rounding, 20 steps
