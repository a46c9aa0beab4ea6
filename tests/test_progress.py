"""Progress lines of long training: one per epoch through the `pipeline` logger, none for short phases."""

import logging
import re
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from pipeline.config import Phase
from pipeline.stages import train

LINE = re.compile(r"tiny epoch (\d)/3: loss \d+\.\d{4}, accuracy [01]\.\d{4}, val_accuracy [01]\.\d{4}, \d+\.\ds")


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline"]


@pytest.fixture
def tiny_fit(caplog):
    """A real Keras fit of 3 epochs through train.fit; returns the progress lines it logged."""
    caplog.set_level(logging.INFO, logger="pipeline")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 4)).astype("float32"), rng.integers(0, 3, 48)
    data = SimpleNamespace(x_train=x[:32], y_train=y[:32], x_val=x[32:], y_val=y[32:])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])

    def run():
        train.fit(model, data, Phase(epochs=3, batch_size=16), "tiny")
        return lines(caplog)
    return run


def test_every_epoch_is_logged_when_the_phase_is_long(tiny_fit, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_AFTER_S", 0.0)
    logged = tiny_fit()
    assert [LINE.fullmatch(line).group(1) for line in logged] == ["1", "2", "3"], logged


def test_a_short_phase_is_quiet(tiny_fit):
    assert tiny_fit() == []


@pytest.mark.parametrize("epoch_seconds, first_logged", [(3.0, 2), (1.0, None), (12.0, 1)])
def test_the_phase_is_judged_by_its_expected_time(monkeypatch, caplog, epoch_seconds, first_logged):
    """5 epochs against 10 s: 3 s each is expected to take 15 s once the second epoch ends; 1 s each never
    comes near; a first epoch of 12 s is long by itself."""
    caplog.set_level(logging.INFO, logger="pipeline")
    clock = iter(np.arange(0, 100, epoch_seconds))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    progress = train.Progress("tiny", after_s=10.0)
    progress.set_params({"epochs": 5})
    progress.on_train_begin()
    for epoch in range(5):
        progress.on_epoch_end(epoch, {"loss": 1.0, "accuracy": 0.5, "val_accuracy": 0.5})
    logged = [int(line.split()[2].split("/")[0]) for line in lines(caplog)]
    assert logged == ([] if first_logged is None else list(range(first_logged, 6)))
