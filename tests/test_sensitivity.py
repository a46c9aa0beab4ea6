"""The sensitivity scan of filter pruning: real per-layer measurements on the validation split (the test
split never decides), the suggested rates, the override it prints, and one end-to-end run tracked in
MLflow."""

import dataclasses
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import compose_config

from pipeline.config import validate
from pipeline.sensitivity import override, ratios_yaml, scan, suggest, val_accuracy

TINY = ["model=vgg_bn", "model.widths=[8,8]", "training=smoke"]


@pytest.fixture(scope="module")
def trained(digits):
    import keras

    from pipeline.stages.train import train_baseline

    parts = validate(compose_config(TINY))
    keras.utils.set_random_seed(0)
    model = parts["model"].build(digits.input_shape, digits.num_classes)
    train_baseline(model, digits, parts["training"].baseline, parts["method"])
    return model


@pytest.fixture(scope="module")
def table(trained, digits):
    before = [w.copy() for w in trained.get_weights()]
    baseline = val_accuracy(trained, digits)
    df = scan(trained, digits, [0.5, 0.25])
    for w, b in zip(trained.get_weights(), before, strict=True):  # weights restored after every trial
        np.testing.assert_array_equal(w, b)
    return df, baseline


def accuracy_without_filters(model, data, layer: str, n: int) -> float:
    """Independently: zero the n filters of smallest L1 norm of one conv (and its BatchNorm), then score
    on the validation split."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    conv, bn = clone.get_layer(layer), clone.get_layer(layer.replace("conv", "bn"))
    kernel = conv.kernel.numpy()
    drop = np.argsort(np.abs(kernel).sum(axis=(0, 1, 2)), kind="stable")[:n]
    kernel[..., drop] = 0
    conv.kernel.assign(kernel)
    for var in (bn.gamma, bn.beta):
        v = var.numpy()
        v[drop] = 0
        var.assign(v)
    clone.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return float(clone.evaluate(data.x_val, data.y_val, batch_size=256, verbose=0)[1])


def test_scan_measures_each_layer_at_each_rate(table, trained, digits):
    df, baseline = table
    assert list(df.columns) == ["layer", "ratio", "val_accuracy", "drop"]
    assert list(dict.fromkeys(df["layer"])) == ["conv1", "conv2"]
    for _, rows in df.groupby("layer"):
        assert list(rows["ratio"]) == [0.0, 0.25, 0.5]
    assert baseline > 0.3  # a trained model, far above chance (0.1)
    at_zero = df[df["ratio"] == 0.0]["val_accuracy"]
    np.testing.assert_allclose(at_zero, baseline, atol=1e-7)
    np.testing.assert_allclose(df["drop"], baseline - df["val_accuracy"], atol=1e-7)
    # real measurements: fractions of the validation set, matching an independent computation
    n_val = len(digits.y_val)
    np.testing.assert_allclose(df["val_accuracy"] * n_val, np.round(df["val_accuracy"] * n_val), atol=1e-3)
    for layer, ratio, n in [("conv1", 0.25, 2), ("conv2", 0.5, 4)]:
        got = df[(df["layer"] == layer) & (df["ratio"] == ratio)]["val_accuracy"].item()
        assert got == pytest.approx(accuracy_without_filters(trained, digits, layer, n), abs=1.5 / n_val)
    assert (df[df["ratio"] == 0.5]["drop"] > 0).any()  # pruning half a layer's 8 filters costs accuracy


def test_rates_are_chosen_on_the_validation_split(table, trained, digits):
    """A test split of noise and wrong labels changes nothing: the scan never looks at it."""
    rng = np.random.default_rng(0)
    garbage = dataclasses.replace(digits, x_test=rng.random(digits.x_test.shape, dtype=np.float32),
                                  y_test=rng.integers(0, digits.num_classes, len(digits.y_test)))
    df, _ = table
    pd.testing.assert_frame_equal(scan(trained, garbage, [0.5, 0.25]), df)
    # while other validation labels change the measurements
    flipped = dataclasses.replace(digits, y_val=(digits.y_val + 1) % digits.num_classes)
    assert (scan(trained, flipped, [0.5, 0.25])["val_accuracy"] != df["val_accuracy"]).any()


def test_suggest_picks_the_largest_rate_within_max_drop(table):
    df = pd.DataFrame({
        "layer": ["a"] * 4 + ["b"] * 4 + ["c"] * 2,
        "ratio": [0.0, 0.25, 0.5, 0.75] * 2 + [0.0, 0.5],
        "drop": [0.0, 0.01, 0.03, 0.05, 0.0, 0.0, 0.02, 0.1, 0.0, 0.5],
    })
    assert suggest(df, 0.02) == {"a": 0.25, "b": 0.5, "c": 0.0}
    assert suggest(df, 1.0) == {"a": 0.75, "b": 0.75, "c": 0.5}
    real, _ = table
    for max_drop in (0.0, 0.05, 0.2, 1.0):
        got = suggest(real, max_drop)
        assert list(got) == ["conv1", "conv2"]
        for layer, rate in got.items():
            rows = real[real["layer"] == layer]
            assert rows[rows["ratio"] == rate]["drop"].item() <= max_drop + 1e-9
            assert (rows[rows["ratio"] > rate]["drop"] > max_drop).all()


def test_suggestion_is_a_working_override_and_method_ratios():
    ratios = {"conv1": 0.3, "conv2": 0.0, "conv3": 0.55}
    line = override(ratios)
    assert line.startswith("method=filter ")
    method = validate(compose_config(["model=vgg_bn", *shlex.split(line)]))["method"]
    assert method.name == "filter" and method.ratios == ratios
    assert yaml.safe_load(ratios_yaml(ratios)) == ratios


def run_sensitivity(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "pipeline.sensitivity", *args,
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/o"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_end_to_end_run_is_tracked(tmp_path, digits):
    from mlflow.tracking import MlflowClient

    proc = run_sensitivity([*TINY, "sensitivity.ratios=[0.5]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    prefix = "python -m pipeline.run method=filter"
    printed = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert len(printed) == 1, proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'sensitivity'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "sensitivity-vgg_bn"
    assert "config_hash" not in run.data.tags  # not a job run: the report and verify leave it out
    assert run.data.tags["data_digest"] == digits.digest and "data_warnings" not in run.data.tags
    for layer in ("conv1", "conv2"):
        history = client.get_metric_history(run.info.run_id, f"sensitivity/{layer}/val_accuracy")
        assert sorted(m.step for m in history) == [0, 50]
        assert {m.step: m.value for m in history}[0] == pytest.approx(run.data.metrics["baseline/val_accuracy"])
        assert f"sensitivity/{layer}/accuracy" not in run.data.metrics
    assert "baseline/accuracy" in run.data.metrics  # the test accuracy: reported, never used to decide
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "sensitivity.csv", "sensitivity.png", "filter_ratios.yaml", "config.yaml"}

    folder = tmp_path / "artifacts-back"
    folder.mkdir()
    csv = pd.read_csv(client.download_artifacts(run.info.run_id, "sensitivity.csv", str(folder)))
    assert list(csv.columns) == ["layer", "ratio", "val_accuracy", "drop"] and len(csv) == 4
    ratios_file = client.download_artifacts(run.info.run_id, "filter_ratios.yaml", str(folder))
    ratios = yaml.safe_load(open(ratios_file))
    assert set(ratios) == {"conv1", "conv2"} and set(ratios.values()) <= {0.0, 0.5}
    assert ratios == suggest(csv, 0.02)
    png = client.download_artifacts(run.info.run_id, "sensitivity.png", str(folder))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    line = printed[0].removeprefix("python -m pipeline.run ")
    assert run.data.tags["suggested_override"] == line
    assert validate(compose_config(shlex.split(line)))["method"].ratios == ratios
    # the baseline it trained is the shared one, logged as pipeline.run logs it
    assert client.search_runs([exp.experiment_id], f"tags.baseline_hash = '{run.data.tags['baseline_hash']}' "
                              "and tags.kind = 'baseline'")


def test_bad_sensitivity_setting_exits_2_with_one_line(tmp_path):
    proc = run_sensitivity(["sensitivity.ratios=[0.5,1.5]"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sensitivity.ratios"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.db").exists()
