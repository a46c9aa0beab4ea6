"""One real job end to end (training=smoke) into a temporary sqlite store, read back with MlflowClient."""

import numpy as np
import pytest
from conftest import run_pipeline

DESIGN_METRICS = [
    "baseline/accuracy", "baseline/loss", "pruned/accuracy", "finetune/loss", "finetune/accuracy",
    "finetune/val_accuracy", "eval/accuracy", "eval/loss", "eval/sparsity", "eval/model_sparsity",
    "eval/conv_sparsity", "eval/params_total", "eval/params_nonzero", "eval/compression", "eval/flops_dense",
    "eval/flops_effective", "eval/speedup_theoretical", "eval/size_gzip_bytes", "eval/latency_ms_dense",
    "eval/latency_ms_pruned",
]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_pipeline(["training=smoke", "sparsity.target=0.6", "training.finetune.epochs=2", "eval.latency=always"],
                        tmp)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id])
    return tmp, client, runs, proc


def test_one_job_run_and_one_baseline_run_finished(job):
    _, _, runs, _ = job
    kinds = sorted(r.data.tags.get("kind", "job") for r in runs)
    assert kinds == ["baseline", "job"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_run_has_design_names(job):
    _, client, runs, _ = job
    run = next(r for r in runs if "config_hash" in r.data.tags)
    assert run.info.run_name == "magnitude-0.60"
    assert {"method", "config_hash", "baseline_hash"} <= set(run.data.tags)
    assert run.data.params["method.name"] == "magnitude"
    assert run.data.params["sparsity.target"] == "0.6"
    assert run.data.params["model.name"] == "seed_cnn"
    assert set(DESIGN_METRICS) <= set(run.data.metrics)
    assert any(k.startswith("layer/conv1/") for k in run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "finetune/val_accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"masks.npz", "config.yaml", "layers.csv", "model"} <= artifacts
    assert "model/model.keras" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}


def test_logged_sparsity_matches_model_and_masks(job, tmp_path):
    import keras

    from pipeline.pruning import accounting
    from pipeline.pruning.masks import load_masks

    _, client, runs, _ = job
    run = next(r for r in runs if "config_hash" in r.data.tags)
    m = run.data.metrics
    masks = load_masks(client.download_artifacts(run.info.run_id, "masks.npz", str(tmp_path)))
    model = keras.saving.load_model(client.download_artifacts(run.info.run_id, "model/model.keras",
                                                              str(tmp_path)), safe_mode=True)
    weights = {v.path: v.numpy() for v in model.weights}
    for path, mask in masks.items():
        assert np.all(weights[path][~mask] == 0.0), path
    kernels = [weights[p] for p in masks]
    zeros = sum(int((w == 0).sum()) for w in kernels) / sum(w.size for w in kernels)
    assert m["eval/sparsity"] == pytest.approx(zeros)
    assert m["eval/sparsity"] == pytest.approx(int(0.6 * sum(w.size for w in kernels)) / sum(w.size for w in kernels))
    assert accounting.summary(model)["params_nonzero"] == m["eval/params_nonzero"]
    assert m["eval/compression"] == pytest.approx(m["eval/params_total"] / m["eval/params_nonzero"])
    assert m["eval/speedup_theoretical"] == pytest.approx(m["eval/flops_dense"] / m["eval/flops_effective"])
    from pipeline.data import Digits

    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    data = Digits().load(0)
    _, acc = model.evaluate(data.x_test, data.y_test, verbose=0)
    assert acc == pytest.approx(m["eval/accuracy"], abs=1e-6)


def test_rerun_of_same_config_is_skipped(job):
    tmp, client, runs, _ = job
    proc = run_pipeline(["training=smoke", "sparsity.target=0.6", "training.finetune.epochs=2", "eval.latency=always"],
                        tmp)
    assert "skipped" in proc.stdout + proc.stderr
    exp = client.get_experiment_by_name("pruning")
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
