"""Progress lines of long training: one per epoch through the `pipeline` logger, none for short phases."""

import logging
import re

import keras
import numpy as np
import pytest

from pipeline.config import Phase
from pipeline.data import ArrayDataset
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
    data = ArrayDataset(y[:32], y[32:], y[32:], 3, x_train=x[:32], x_val=x[32:], x_test=x[32:])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])

    def run():
        train.fit(model, data, Phase(epochs=3, batch_size=16), "tiny")
        return lines(caplog)
    return run


def test_every_epoch_after_the_first_is_logged_when_the_phase_is_long(tiny_fit, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_AFTER_S", 0.0)
    logged = tiny_fit()
    assert [LINE.fullmatch(line).group(1) for line in logged] == ["2", "3"], logged


def test_a_short_phase_is_quiet(tiny_fit):
    assert tiny_fit() == []


@pytest.mark.parametrize("epochs, seconds, logged", [(5, [30, 3, 3, 3, 3], [2, 3, 4, 5]),
                                                     (5, [30, 1, 1, 1, 1], []),
                                                     (5, [1, 1, 1, 1, 9], [5]),
                                                     (1, [30], [])])
def test_the_phase_is_judged_by_its_epochs_after_the_first(monkeypatch, caplog, epochs, seconds, logged):
    """Against 10 s: four more epochs of 3 s are expected to take 12 s once the second one ends; of 1 s,
    4 s, however long the first epoch (tracing) took; a slow last epoch makes the phase long at its end;
    a single epoch is never judged."""
    caplog.set_level(logging.INFO, logger="pipeline")
    clock = iter(np.cumsum([0, *seconds]))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    progress = train.Progress("tiny", after_s=10.0)
    progress.set_params({"epochs": epochs})
    progress.on_train_begin()
    for epoch in range(epochs):
        progress.on_epoch_end(epoch, {"loss": 1.0, "accuracy": 0.5, "val_accuracy": 0.5})
    assert [int(line.split()[2].split("/")[0]) for line in lines(caplog)] == logged
