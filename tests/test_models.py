"""Your own model (model=file) and keras.applications (model=application): loading, fitting to the data,
identity by content, the pretrained baseline, safe loading, and one job each end to end."""

import shutil

import numpy as np
import pytest
from conftest import compose_config, run_in_process, run_pipeline

from pipeline import tracking
from pipeline.config import ConfigError, config_hash, identity, validate
from pipeline.models import APPLICATIONS, Application, FileModel, check_fits

SMOKE = ["training=smoke"]


def save(model, path):
    model.save(path)
    return str(path)


def small_cnn(classes=10, shape=(8, 8, 1), lam=False):
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    inputs = keras.Input(shape, name="pixels")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    if lam:
        x = layers.Lambda(lambda t: t * 0.5, name="halve")(x)
    x = layers.Flatten(name="flat")(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax", name="out")(x))


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory, digits):
    """A small CNN trained for one epoch on digits, saved: a researcher's own model."""
    model = small_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits.x_train, digits.y_train, epochs=1, verbose=0)
    return save(model, tmp_path_factory.mktemp("own") / "model.keras")


def job_runs(store):
    client = tracking.client(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("pruning").experiment_id
    return client, client.search_runs([exp])


def test_a_trained_file_is_the_baseline_evaluated_not_retrained(tmp_path, trained_file, digits):
    import keras

    from pipeline.stages.evaluate import test_metrics

    result = run_in_process(tmp_path, ["model=file", f"model.path={trained_file}", *SMOKE])
    client, runs = job_runs(tmp_path)
    job = client.get_run(result["run_id"])
    (base,) = [r for r in runs if r.data.tags.get("kind") == "baseline"]
    as_saved = keras.saving.load_model(trained_file, compile=False)
    assert job.data.metrics["baseline/accuracy"] == pytest.approx(test_metrics(as_saved, digits)["accuracy"], abs=1e-9)
    assert base.data.metrics["baseline/accuracy"] == job.data.metrics["baseline/accuracy"]
    assert not [k for k in base.data.metrics if k.startswith("train/")]  # no training history: not trained
    assert job.data.tags["baseline_hash"] == base.data.tags["baseline_hash"]
    assert job.info.status == "FINISHED" and "eval/accuracy" in job.data.metrics


def job_hash(overrides):
    cfg = compose_config(overrides)
    return config_hash(identity(cfg.seed, validate(cfg), "digest"))


def test_identity_is_the_files_content_not_its_path(tmp_path, trained_file):
    moved = shutil.copy(trained_file, tmp_path / "elsewhere.keras")
    assert job_hash(["model=file", f"model.path={trained_file}"]) == job_hash(["model=file", f"model.path={moved}"])
    same = job_hash(["model=file", f"model.path={moved}"])
    save(small_cnn(classes=10), moved)  # other weights at the same path
    assert job_hash(["model=file", f"model.path={moved}"]) != same
    assert job_hash(["model=file", f"model.path={moved}", "model.trained=false"]) != job_hash(
        ["model=file", f"model.path={moved}"])


def test_a_sequential_file_becomes_the_same_functional_model(tmp_path, digits):
    import keras
    from keras import layers

    seq = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(3, 3, name="c"), layers.Flatten(name="f"),
                            layers.Dense(10, activation="softmax", name="d")])
    model = FileModel(path=save(seq, tmp_path / "seq.keras")).build(digits.input_shape, 10)
    assert not isinstance(model, keras.Sequential)
    assert [layer.name for layer in model.layers] == ["image", "c", "f", "d"]
    np.testing.assert_allclose(model(digits.x_test[:5]), seq(digits.x_test[:5]), atol=1e-6)


def test_input_size_resizes_and_triples_the_channels_inside_the_model(tmp_path, digits):
    """An RGB model of 16x16 logits on 8x8 grey digits: Resizing, a Concatenate of three copies, a Softmax."""
    import keras
    from keras import layers

    rgb = small_cnn(shape=(16, 16, 3))
    x = layers.BatchNormalization(name="bn")(rgb.get_layer("flat").output)  # stays in inference mode
    rgb = keras.Model(rgb.input, layers.Dense(10, name="logits")(x))
    path = save(rgb, tmp_path / "rgb.keras")
    with pytest.raises(ConfigError, match=r"takes inputs of shape \(16, 16, 3\).*model.input_size=16"):
        FileModel(path=path).build(digits.input_shape, 10)
    model = FileModel(path=path, input_size=16).build(digits.input_shape, 10)
    assert [layer.name for layer in model.layers] == ["pixels", "input_resize", "input_rgb", "conv", "flat", "bn",
                                                      "logits", "probabilities"]
    x = digits.x_test[:4]
    grey = keras.layers.Resizing(16, 16)(x)
    expected = keras.ops.softmax(rgb(keras.ops.concatenate([grey] * 3, axis=-1)))
    np.testing.assert_allclose(model(x), expected, atol=1e-5)


def test_a_missing_file_or_a_lambda_layer_is_one_line(tmp_path, digits):
    def error(spec, *needles):
        with pytest.raises(ConfigError) as e:
            check_fits(spec, digits.input_shape, digits.num_classes)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)

    error(FileModel(), "model.path")
    error(FileModel(path=str(tmp_path / "none.keras")), "none.keras", "no such file")
    lam = save(small_cnn(lam=True), tmp_path / "lambda.keras")
    error(FileModel(path=lam), "halve", "model.safe_mode=false")
    (tmp_path / "junk.keras").write_text("not a model")
    error(FileModel(path=str(tmp_path / "junk.keras")), "junk.keras", "cannot be loaded")


@pytest.fixture
def restore_safe_mode():
    """model.safe_mode=false opens the process to Lambda code: closed again after the test."""
    from keras.src.backend.common import global_state

    saved = global_state.get_global_attribute("safe_mode_saving")
    yield
    global_state.set_global_attribute("safe_mode_saving", saved)


def test_safe_mode_false_loads_a_lambda_file_trains_it_tags_the_run_and_verifies(tmp_path, restore_safe_mode):
    from pipeline.verify import verify

    lam = save(small_cnn(lam=True), tmp_path / "lambda.keras")
    result = run_in_process(tmp_path, ["model=file", f"model.path={lam}", "model.safe_mode=false",
                                       "model.trained=false", *SMOKE])
    client, runs = job_runs(tmp_path)
    job = client.get_run(result["run_id"])
    (base,) = [r for r in runs if r.data.tags.get("kind") == "baseline"]
    assert job.data.tags["model.safe_mode"] == "false" and job.info.status == "FINISHED"
    assert [k for k in base.data.metrics if k.startswith("train/")]  # trained=false: trained from its weights
    assert verify(client, job.info.run_id, report=lambda line: None) == []


def test_a_class_count_that_does_not_fit_exits_2_before_anything_is_written(tmp_path):
    path = save(small_cnn(classes=3), tmp_path / "three.keras")
    proc = run_pipeline(["model=file", f"model.path={path}", *SMOKE], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "outputs 3 classes" in line and "10" in line, line
    assert not (tmp_path / "mlflow.db").exists()


def test_the_application_list_is_keras_and_a_wrong_name_lists_it():
    import keras

    assert set(APPLICATIONS) == {n for n in dir(keras.applications) if n[0].isupper()}
    with pytest.raises(ConfigError, match="model.arch='ResNet49'.*MobileNetV2.*ResNet50"):
        validate(compose_config(["model=application", "model.arch=ResNet49"]))
    with pytest.raises(ConfigError, match="model.alpha"):
        validate(compose_config(["model=application", "model.arch=ResNet50", "model.alpha=0.5"]))


def test_mobilenetv2_on_digits_at_32_runs_a_magnitude_job_end_to_end(tmp_path, digits):
    spec = Application(arch="MobileNetV2", alpha=0.35, input_size=32)
    models = [spec.build(digits.input_shape, 10) for _ in range(2)]
    assert [v.path for v in models[0].weights] == [v.path for v in models[1].weights]  # weights are keyed by path
    x = digits.x_test[:4]  # the Resizing layer leaves the BatchNorm layers after it in inference mode
    np.testing.assert_allclose(models[0](x), models[0](x, training=False), atol=1e-6)
    result = run_in_process(tmp_path, ["model=application", "model.arch=MobileNetV2", "model.alpha=0.35",
                                       "model.input_size=32", "method=magnitude", *SMOKE,
                                       "training.baseline.epochs=1", "data.limit=256"])  # the graph's tracing dominates
    client, _ = job_runs(tmp_path)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/sparsity"] == pytest.approx(0.5, abs=0.01)
    assert run.data.params["model.arch"] == "MobileNetV2"
