"""Masks hold inside every training step: a pruned weight is exactly 0.0 after every batch."""

import dataclasses

import keras
import numpy as np
import pytest

from pipeline.config import Phase
from pipeline.models import VGGBN, SeedCNN
from pipeline.pruning.base import keep_largest, keep_largest_graph
from pipeline.pruning.filter import Filter
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.masks import MaskedModel, load_masks, merge, save_masks
from pipeline.pruning.schedule import Gradual, OneShot
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune
from pipeline.stages.train import compile_model


@pytest.fixture(scope="module")
def few(digits):
    """The digits with a small training split: a few steps per epoch."""
    return dataclasses.replace(digits, x_train=digits.x_train[:512], y_train=digits.y_train[:512],
                               x_val=digits.x_val[:64], y_val=digits.y_val[:64])


def masked_values(masked) -> dict[str, np.ndarray]:
    """The current values of every weight its mask prunes."""
    return {p: masked.variables[p].numpy()[~m] for p, m in masked.masks.items()}


def assert_pruned_are_zero(masked, where=""):
    for path, values in masked_values(masked).items():
        assert np.all(values == 0.0), f"{path}: {np.count_nonzero(values)} pruned weights non-zero {where}"


class CheckEveryBatch(keras.callbacks.Callback):
    def __init__(self, masked):
        super().__init__()
        self.masked, self.batches = masked, 0

    def on_train_batch_end(self, batch, logs=None):
        assert_pruned_are_zero(self.masked, f"after batch {self.batches}")
        self.batches += 1


def small_vgg(data):
    keras.utils.set_random_seed(0)
    return VGGBN(widths=[4, 8], pool_after=[1], hidden=16).build(data.input_shape, data.num_classes)


def test_finetune_keeps_pruned_weights_zero(few):
    keras.utils.set_random_seed(0)
    model = SeedCNN().build(few.input_shape, few.num_classes)
    masked = prune(model, Magnitude(), 0.6, seed=0)
    before = {p: v.numpy().copy() for p, v in masked.variables.items()}
    history = finetune(masked, few, Phase(epochs=1, lr=0.01), Magnitude(), OneShot(target=0.6), seed=0, audit=True)
    assert history["pruned_nonzero"] == [0.0]  # counted inside the compiled loop after every step
    assert_pruned_are_zero(masked)
    kept = masked.masks["dense1/kernel"]
    assert not np.array_equal(masked.variables["dense1/kernel"].numpy()[kept], before["dense1/kernel"][kept])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_weights_stay_zero_between_batches(few, optimizer):
    """Momentum and Adam moments would move a pruned weight off zero without the constraint."""
    model = small_vgg(few)
    method = Filter()
    masked = MaskedModel(model, merge(method.masks(model, 0.5), Magnitude().masks(model, 0.5)))
    assert any(p.endswith("gamma") for p in masked.masks)
    phase = Phase(epochs=1, batch_size=128, optimizer=optimizer, lr=0.05, momentum=0.9)
    compile_model(model, phase)
    check = CheckEveryBatch(masked)
    model.fit(few.x_train, few.y_train, batch_size=phase.batch_size, epochs=1, verbose=0, callbacks=[check])
    assert check.batches == int(np.ceil(len(few.x_train) / phase.batch_size))
    gamma = masked.masks["bn1/gamma"]
    assert np.all(masked.variables["bn1/gamma"].numpy()[gamma] != 1.0)  # the kept ones did train


def test_masks_hold_on_a_model_trained_before_pruning(few):
    """model.fit after MaskedModel, without compiling again: the step traced before must not be reused."""
    model = small_vgg(few)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(few.x_train, few.y_train, batch_size=256, epochs=1, verbose=0)
    masked = MaskedModel(model, Magnitude().masks(model, 0.5))
    check = CheckEveryBatch(masked)
    model.fit(few.x_train, few.y_train, batch_size=256, epochs=1, verbose=0, callbacks=[check])
    assert check.batches > 1


@pytest.mark.parametrize("fast", [False, True])
def test_masks_changed_mid_training_hold_from_the_next_batch(few, fast):
    """A schedule that grows the masks during fit: every step sees each new mask (the plain path is checked
    after every batch, the compiled loop by its audit after every step), and the masks reach the target."""
    keras.utils.set_random_seed(0)
    model = SeedCNN().build(few.input_shape, few.num_classes)
    schedule = Gradual(target=0.8, initial_sparsity=0.2, begin=0.0, end=0.5, frequency=2)
    masked = prune(model, Magnitude(), schedule.initial, seed=0)
    phase = Phase(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9)
    if fast:
        assert finetune(masked, few, phase, Magnitude(), schedule, seed=0, audit=True)["pruned_nonzero"] == [0]
    else:
        check = CheckEveryBatch(masked)
        finetune(masked, few, phase, Magnitude(), schedule, seed=0, fast=False, callbacks=[check])
        assert check.batches == len(few.x_train) // phase.batch_size
    kept = sum(m.sum() for m in masked.masks.values()) / sum(m.size for m in masked.masks.values())
    assert kept == pytest.approx(0.2, abs=1e-3)
    assert_pruned_are_zero(masked)


def test_keep_largest_drops_what_a_stable_sort_puts_first():
    """Ties go by position, NaN sorts last, -0.0 equals 0.0: the linear-time selection is the stable sort's."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        x = rng.integers(-3, 4, 40).astype(float) if trial % 2 else rng.normal(size=40)
        x[rng.integers(0, 40, trial % 4)] = np.nan
        x[rng.integers(0, 40, trial % 3)] = -0.0
        for n in range(41):
            expected = np.ones(40, bool)
            expected[np.argsort(x, kind="stable")[:n]] = False
            np.testing.assert_array_equal(keep_largest(x, n), expected, err_msg=f"{x} {n}")


def test_keep_largest_in_the_graph_is_keep_largest():
    """The compiled loop's selection (gradual magnitude's masks): the same masks on |w| with ties, zeros (the
    weights pruned so far), -0.0, NaN, and on scores of either sign."""
    import tensorflow as tf

    select = tf.function(keep_largest_graph)
    rng = np.random.default_rng(0)
    for trial in range(150):
        x = (rng.integers(0, 4, 40) if trial % 2 else np.abs(rng.normal(size=40))).astype(np.float32)
        if trial % 5 == 0:
            x = x - 1.5
        x[rng.integers(0, 40, trial % 3)] = -0.0
        x[rng.integers(0, 40, trial % 4 // 2)] = np.nan
        for n in range(41):
            np.testing.assert_array_equal(select(tf.constant(x), tf.constant(n)).numpy(), keep_largest(x, n),
                                          err_msg=f"{x} {n}")


def test_constraints_are_removed_on_detach():
    model = SeedCNN().build((8, 8, 1), 10)
    masked = MaskedModel(model, Magnitude().masks(model, 0.5))
    assert model.get_layer("conv1").kernel.constraint is not None
    masked.detach()
    assert all(v.constraint is None for v in model.weights)


def test_unknown_mask_paths_are_rejected():
    model = SeedCNN().build((8, 8, 1), 10)
    with pytest.raises(KeyError, match="nope/kernel"):
        MaskedModel(model, {"nope/kernel": np.ones(3, bool)})


def test_update_never_revives_a_pruned_weight():
    model = SeedCNN().build((8, 8, 1), 10)
    masked = MaskedModel(model, Magnitude().masks(model, 0.5))
    old = {p: m.copy() for p, m in masked.masks.items()}
    masked.update({p: np.ones_like(m) for p, m in old.items()})
    for p, m in old.items():
        np.testing.assert_array_equal(masked.masks[p], m)
    assert_pruned_are_zero(masked)


def test_masks_save_and_load_round_trip(tmp_path):
    model = VGGBN(widths=[4, 8], pool_after=[1], hidden=16).build((8, 8, 1), 10)
    masks = Filter().masks(model, 0.5)
    path = tmp_path / "masks.npz"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    assert {"conv1/kernel", "bn1/gamma", "bn1/beta", "conv2/kernel", "dense1/kernel"} <= set(loaded)
    for key, mask in masks.items():
        assert loaded[key].dtype == bool
        np.testing.assert_array_equal(loaded[key], mask)
    MaskedModel(model, loaded)  # the loaded keys still name the model's weights
