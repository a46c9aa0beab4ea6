"""python -m pipeline.verify: a run checked against its own artifacts, and tampered copies caught."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_pipeline

from pipeline import report, tracking
from pipeline.verify import CHECKSUMS_TAG, MASKS, MODEL, SHRUNK, main, verify


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one unstructured run (magnitude, no shrunk model)."""
    path = tmp_path_factory.mktemp("verify")
    run_pipeline(["training=smoke", "sparsity.target=0.5"], path)
    return path


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """A store with one structured run: filter pruning removes one of each conv's 3 filters."""
    path = tmp_path_factory.mktemp("verify_structured")
    run_pipeline(["training=smoke", "method=filter", "sparsity.target=0.5"], path)
    return path


def uri(store):
    return f"sqlite:///{store}/mlflow.db"


def the_run(client):
    exp = client.get_experiment_by_name("pruning").experiment_id
    (run,) = client.search_runs([exp], "tags.config_hash != ''", max_results=1,
                                order_by=["attributes.start_time ASC"])
    return run


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(store, tmp_path, tamper=None, checksums_before_tampering=False):
    """A FINISHED copy of the store's run (tags, metrics, artifacts) in the experiment `copies`, its
    artifacts first handed to tamper({artifact path: local file}). Its tag artifacts.sha256 holds the
    checksums of the files it logs (as if tampered before logging: only the other checks can see it),
    or with checksums_before_tampering those of the run's own files (tampered after logging)."""
    client = tracking.client(uri(store))
    run = the_run(client)
    src = tmp_path / "artifacts"
    client.download_artifacts(run.info.run_id, "", str(src))
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
    recorded = {name: sha256(path) for name, path in files.items()}
    if tamper is not None:
        tamper(files)
    if not checksums_before_tampering:
        recorded = {name: sha256(path) for name, path in files.items()}
    tags = {"config_hash": run.data.tags["config_hash"], "method": run.data.tags["method"],
            CHECKSUMS_TAG: json.dumps(recorded)}
    exp = tracking.experiment_id(client, "copies", uri(store))
    copy = client.create_run(exp, run_name=f"copy of {run.info.run_name}", tags=tags).info.run_id
    for name, path in files.items():
        client.log_artifact(copy, str(path), name.rpartition("/")[0] or None)
    tracking.log_metrics(client, copy, run.data.metrics)
    client.set_terminated(copy, "FINISHED")
    return copy


def rejected(store, run_id) -> list[str]:
    """verify's problems, after checking that main() exits 1 and the run is tagged verified=false."""
    client = tracking.client(uri(store))
    problems = verify(client, run_id)
    assert problems
    assert main([run_id, "--uri", uri(store)]) == 1
    assert client.get_run(run_id).data.tags["verified"] == "false"
    return problems


def edit_model(path, edit):
    """Load a .keras file, let edit(model) change it, save it in place."""
    import keras

    model = keras.saving.load_model(path, compile=False)
    edit(model)
    model.save(path)


def set_first_weight(files, kept: bool, value: float) -> None:
    """In model.keras, set the first pruned (kept=False) or non-zero kept entry of the first masked weight."""
    from pipeline.pruning.masks import load_masks

    masks = load_masks(files[MASKS])
    path = sorted(masks)[0]

    def edit(model):
        var = {v.path: v for v in model.weights}[path]
        w = np.array(var.numpy())
        where = masks[path] & (w != 0) if kept else ~masks[path]
        w[np.unravel_index(np.flatnonzero(where)[0], w.shape)] = value
        var.assign(w)

    edit_model(files[MODEL], edit)


@pytest.mark.parametrize("fixture", ["store", "structured"])
def test_a_fresh_run_verifies(fixture, request, capsys):
    store = request.getfixturevalue(fixture)
    client = tracking.client(uri(store))
    run_id = the_run(client).info.run_id
    names = {f.path for f in client.list_artifacts(run_id, "model")}
    assert (SHRUNK in names) == (fixture == "structured"), names
    assert verify(client, run_id) == []
    assert client.get_run(run_id).data.tags["verified"] == "true"
    assert main([run_id, "--uri", uri(store)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "re-evaluated" in out and "0 differ" in out
    exp = client.get_experiment_by_name("pruning").experiment_id
    report.write(client, None, store / "report", experiment_ids=[exp])
    header = (store / "report" / "results.md").read_text()
    assert "1 of 1 runs verified with `python -m pipeline.verify`" in header


def test_an_untampered_copy_verifies(store, tmp_path):
    assert verify(tracking.client(uri(store)), copy_run(store, tmp_path)) == []


def test_a_non_zero_pruned_weight_is_reported(store, tmp_path):
    copy = copy_run(store, tmp_path, lambda files: set_first_weight(files, kept=False, value=0.5))
    problems = rejected(store, copy)
    assert any(": 1 of " in p and "pruned weights are non-zero" in p for p in problems), problems


def test_a_changed_kept_weight_is_reported(store, tmp_path):
    """Caught by the checksum and, independently, by the recomputed metrics."""
    copy = copy_run(store, tmp_path, lambda files: set_first_weight(files, kept=True, value=0.0),
                    checksums_before_tampering=True)
    problems = rejected(store, copy)
    assert f"artifact {MODEL}: sha256 differs from the one recorded when it was logged" in problems
    assert any(p.startswith("eval/params_nonzero: logged") for p in problems), problems
    assert any(p.startswith("eval/sparsity: logged") for p in problems), problems


def test_a_flipped_mask_entry_is_reported(store, tmp_path):
    def flip(files):
        from pipeline.pruning.masks import load_masks, save_masks

        masks = load_masks(files[MASKS])
        first = sorted(masks)[0]
        masks[first].flat[np.flatnonzero(~masks[first])[0]] = True
        save_masks(masks, files[MASKS])

    problems = rejected(store, copy_run(store, tmp_path, flip))
    assert any(p.startswith("masks.npz prunes ") and "magnitude at sparsity.target=0.5" in p
               for p in problems), problems


def test_an_empty_masks_file_is_reported(store, tmp_path):
    problems = rejected(store, copy_run(store, tmp_path, lambda files: np.savez_compressed(files[MASKS])))
    assert any(p.startswith("masks.npz has no mask for 6 weight(s) that magnitude") for p in problems), problems


def test_a_changed_masked_model_of_a_structured_run_is_reported(structured, tmp_path):
    """model/model.keras is checked too, not only the shrunk model that eval/accuracy was measured on."""
    def negate_classifier(files):
        edit_model(files[MODEL], lambda m: m.layers[-1].kernel.assign(-m.layers[-1].kernel))

    problems = rejected(structured, copy_run(structured, tmp_path, negate_classifier))
    assert any(p.startswith("eval/masked_accuracy: logged") and MODEL in p for p in problems), problems
    assert not any(p.startswith("eval/accuracy") for p in problems), problems


def test_a_forged_metric_is_reported(store, tmp_path):
    copy = copy_run(store, tmp_path)
    tracking.client(uri(store)).log_metric(copy, "eval/sparsity", 0.99)  # now the latest value
    problems = rejected(store, copy)
    assert any(p.startswith("eval/sparsity: logged 0.99, recomputed 0.5") for p in problems), problems


def test_a_changed_accuracy_is_reported(store, tmp_path, capsys):
    client = tracking.client(uri(store))
    copy = copy_run(store, tmp_path)
    logged = client.get_run(copy).data.metrics["eval/accuracy"]
    client.log_metric(copy, "eval/accuracy", logged - 0.05)
    problems = rejected(store, copy)
    assert len(problems) == 1 and problems[0].startswith("eval/accuracy: logged"), problems
    out = capsys.readouterr().out
    assert "NOT verified" in out and f"{logged - 0.05:.6f}" in out and f"{logged:.6f}" in out


def test_missing_checksums_are_reported(store, tmp_path):
    copy = copy_run(store, tmp_path)
    tracking.client(uri(store)).delete_tag(copy, CHECKSUMS_TAG)
    assert rejected(store, copy) == [f"tag {CHECKSUMS_TAG} is missing: the artifacts' checksums were not "
                                     "recorded when they were logged"]


@pytest.mark.parametrize("artifact", [MODEL, MASKS])
def test_a_flipped_bit_is_reported_without_a_traceback(store, tmp_path, capsys, artifact):
    def flip_bit(files):
        data = bytearray(files[artifact].read_bytes())
        data[len(data) // 2] ^= 0x10
        files[artifact].write_bytes(bytes(data))

    client = tracking.client(uri(store))
    copy = copy_run(store, tmp_path, flip_bit, checksums_before_tampering=True)
    client.set_tag(copy, "verified", "true")  # an earlier verdict must not survive
    assert main([copy, "--uri", uri(store)]) == 1
    out, err = capsys.readouterr()
    assert f"  - artifact {artifact}: sha256 differs from the one recorded when it was logged" in out, out
    assert "Traceback" not in out + err, out + err
    assert client.get_run(copy).data.tags["verified"] == "false"


def test_a_read_only_store_warns_and_still_exits_by_the_result(store, tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    class ReadOnly:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def set_tag(self, *args):
            raise MlflowException("attempt to write a readonly database")

    good = copy_run(store, tmp_path / "good")
    forged = copy_run(store, tmp_path / "forged")
    tracking.client(uri(store)).log_metric(forged, "eval/sparsity", 0.99)
    real_client = tracking.client
    monkeypatch.setattr(tracking, "client", lambda u: ReadOnly(real_client(u)))
    assert main([good, "--uri", uri(store)]) == 0
    assert main([forged, "--uri", uri(store)]) == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "readonly database" in warnings[0], warnings


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
