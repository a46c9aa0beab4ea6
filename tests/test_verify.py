"""python -m pipeline.verify: a run checked against its own artifacts."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_pipeline

from pipeline import report, tracking
from pipeline.verify import main, verify


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify")
    run_pipeline(["training=smoke", "sparsity.target=0.5"], path)
    return path


def uri(store):
    return f"sqlite:///{store}/mlflow.db"


def the_run(client):
    exp = client.get_experiment_by_name("pruning").experiment_id
    (run,) = client.search_runs([exp], "tags.config_hash != ''", max_results=1,
                                order_by=["attributes.start_time ASC"])
    return run


def test_a_fresh_run_verifies(store, capsys):
    client = tracking.client(uri(store))
    run_id = the_run(client).info.run_id
    assert verify(client, run_id) == []
    assert client.get_run(run_id).data.tags["verified"] == "true"
    assert main([run_id, "--uri", uri(store)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "re-evaluated" in out
    exp = client.get_experiment_by_name("pruning").experiment_id
    report.write(client, None, store / "report", experiment_ids=[exp])
    header = (store / "report" / "results.md").read_text()
    assert "1 of 1 runs verified with `python -m pipeline.verify`" in header


def test_a_non_zero_pruned_weight_is_reported(store, tmp_path):
    """A copy of the run whose model has one pruned weight set back to a non-zero value."""
    import keras

    from pipeline.pruning.masks import load_masks

    client = tracking.client(uri(store))
    run = the_run(client)
    src = tmp_path / "src"
    src.mkdir()
    got = {name: client.download_artifacts(run.info.run_id, name, str(src))
           for name in ("config.yaml", "masks.npz", "model/model.keras")}
    masks = load_masks(got["masks.npz"])
    model = keras.saving.load_model(got["model/model.keras"], compile=False)
    path = sorted(masks)[0]
    var = {v.path: v for v in model.weights}[path]
    w = np.array(var.numpy())
    w[np.unravel_index(np.flatnonzero(~masks[path])[0], w.shape)] = 0.5
    var.assign(w)
    model.save(tmp_path / "model.keras")

    tags = {"config_hash": run.data.tags["config_hash"], "method": "magnitude"}
    copy = client.create_run(run.info.experiment_id, run_name="tampered", tags=tags).info.run_id
    client.log_artifact(copy, got["config.yaml"])
    client.log_artifact(copy, got["masks.npz"])
    client.log_artifact(copy, str(tmp_path / "model.keras"), "model")
    client.log_metric(copy, "eval/accuracy", run.data.metrics["eval/accuracy"])
    client.set_terminated(copy, "FINISHED")

    problems = verify(client, copy)
    assert any(p.startswith(f"{path}: 1 of ") and "non-zero" in p for p in problems), problems
    assert client.get_run(copy).data.tags["verified"] == "false"
    assert main([copy, "--uri", uri(store)]) == 1


def test_a_changed_accuracy_is_reported(store, capsys):
    client = tracking.client(uri(store))
    run = the_run(client)
    logged = run.data.metrics["eval/accuracy"]
    client.log_metric(run.info.run_id, "eval/accuracy", logged - 0.05)  # now the latest value
    problems = verify(client, run.info.run_id)
    assert len(problems) == 1 and problems[0].startswith("eval/accuracy: logged"), problems
    assert client.get_run(run.info.run_id).data.tags["verified"] == "false"
    assert main([run.info.run_id, "--uri", uri(store)]) == 1
    out = capsys.readouterr().out
    assert "NOT verified" in out and f"{logged - 0.05:.6f}" in out and f"{logged:.6f}" in out


def test_a_bad_run_id_or_store_exits_2(store, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "pipeline.verify", "0123456789abcdef", "--uri", uri(store)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no run '0123456789abcdef'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert main(["0123456789abcdef", "--uri", uri(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no tracking store at") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none").exists()  # nothing created for a wrong URI
