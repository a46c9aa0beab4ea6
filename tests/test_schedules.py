"""Sparsity schedules: initial rate, update steps, the polynomial, and the target reached by the end."""

import dataclasses
import math

import keras
import pytest

from pipeline.config import ConfigError, Phase
from pipeline.models import SeedCNN
from pipeline.pruning import accounting
from pipeline.pruning.magnitude import Magnitude
from pipeline.pruning.schedule import Gradual, Iterative, OneShot
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune


@pytest.fixture(scope="module")
def few(digits):
    """The digits with a small training split: a few steps per epoch."""
    return dataclasses.replace(digits, x_train=digits.x_train[:512], y_train=digits.y_train[:512],
                               x_val=digits.x_val[:64], y_val=digits.y_val[:64])


def updates(schedule, total):
    return {s: r for s in range(total) if (r := schedule.update_at(s, total)) is not None}


def test_one_shot():
    s = OneShot(target=0.7)
    assert s.initial == 0.7
    assert updates(s, 50) == {}


def test_iterative_rounds():
    s = Iterative(target=0.6, rounds=3)
    assert s.initial == pytest.approx(0.2)
    got = updates(s, 30)
    assert list(got) == [10, 20]
    assert got[10] == pytest.approx(0.4) and got[20] == pytest.approx(0.6)
    one = Iterative(target=0.5, rounds=1)
    assert one.initial == 0.5 and updates(one, 9) == {}


def test_gradual_polynomial():
    s = Gradual(target=0.8, initial_sparsity=0.1, begin=0.2, end=0.6, frequency=5)
    assert s.initial == 0.1
    got = updates(s, 100)  # begin at step 20, end at step 60
    assert list(got) == [20, 25, 30, 35, 40, 45, 50, 55, 60]
    for step, rate in got.items():
        assert rate == pytest.approx(0.8 + (0.1 - 0.8) * (1 - (step - 20) / 40) ** 3)
    assert got[20] == pytest.approx(0.1) and got[60] == pytest.approx(0.8)
    assert got[40] == pytest.approx(0.8 - 0.7 / 8)
    assert s.sparsity(0, 100) == pytest.approx(0.1) and s.sparsity(99, 100) == pytest.approx(0.8)
    rates = [s.sparsity(t, 100) for t in range(100)]
    assert all(a <= b for a, b in zip(rates[:-1], rates[1:], strict=True))


@pytest.mark.parametrize("schedule", [
    Iterative(target=0.5, rounds=3), Iterative(target=0.5, rounds=4),
    Gradual(target=0.5), Gradual(target=0.5, end=1.0), Gradual(target=0.5, begin=0.5, end=1.0, frequency=3),
    Gradual(target=0.5, initial_sparsity=0.5, frequency=100),
], ids=["iterative3", "iterative4", "gradual", "gradual_end1", "gradual_late", "gradual_flat"])
@pytest.mark.parametrize("total", [1, 2, 3, 7, 20, 101])
def test_last_update_is_the_target(schedule, total):
    got = updates(schedule, total)
    last = got[max(got)] if got else schedule.initial
    assert last == pytest.approx(schedule.target)


@pytest.mark.parametrize("bad", [
    lambda: OneShot(target=1.0), lambda: OneShot(target=-0.1), lambda: Iterative(rounds=0),
    lambda: Gradual(target=0.3, initial_sparsity=0.5), lambda: Gradual(initial_sparsity=-0.1),
    lambda: Gradual(begin=0.6, end=0.6), lambda: Gradual(begin=-0.1), lambda: Gradual(end=1.5),
    lambda: Gradual(frequency=0),
])
def test_bad_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        bad()


@pytest.mark.parametrize("schedule", [
    OneShot(target=0.7), Iterative(target=0.7, rounds=3),
    Gradual(target=0.7, initial_sparsity=0.1, begin=0.2, end=1.0, frequency=3),
], ids=["one_shot", "iterative", "gradual"])
def test_finetune_reaches_exactly_the_target(few, schedule):
    keras.utils.set_random_seed(0)
    model = SeedCNN().build(few.input_shape, few.num_classes)
    masked = prune(model, Magnitude(), schedule.initial, seed=0)
    n = sum(layer["params"] for layer in accounting.layer_rows(model))
    expected = math.floor(0.7 * n)
    if schedule.name != "one_shot":
        assert accounting.summary(model)["sparsity"] < expected / n
    history = finetune(masked, few, Phase(epochs=1, batch_size=64), Magnitude(), schedule, seed=0, audit=True)
    assert history["pruned_nonzero"] == [0.0]  # no pruned weight non-zero after any step, masks changing or not
    rows = accounting.layer_rows(model)
    assert sum(r["params"] - r["nonzero"] for r in rows) == expected
    assert accounting.summary(model)["sparsity"] == pytest.approx(expected / n, abs=1e-12)
    assert sum(int((~m).sum()) for m in masked.masks.values()) == expected

