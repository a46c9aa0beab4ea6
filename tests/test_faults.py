"""Faults as they happen: a job killed hard, a corrupted baseline cache, a diverging loss, two sweeps
racing on one fresh store, and the same input giving the same result. Real processes, real stores."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_pipeline

from pipeline import report, tracking

SMOKE = ["training=smoke"]


def uri_of(store):
    return f"sqlite:///{store}/mlflow.db"


def start_pipeline(args, store):
    """python -m pipeline.run as a background process, as conftest.run_pipeline builds it."""
    cmd = [sys.executable, "-m", "pipeline.run", *args, f"tracking.uri={uri_of(store)}"]
    if not any(a.startswith("hydra.sweep.dir=") for a in args):
        cmd += [f"hydra.run.dir={store}/outputs", f"hydra.sweep.dir={store}/multirun"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    store.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def job_runs(client, status=None):
    exp = client.get_experiment_by_name("pruning")
    if exp is None:  # the store is there, its experiment not yet
        return []
    runs = client.search_runs([exp.experiment_id], "tags.config_hash != ''", max_results=1000)
    return [r for r in runs if status is None or r.info.status == status]


def store_client(store):
    return tracking.client(uri_of(store))  # takes the same creation lock as the pipeline


# --- the same input gives the same result (also the stores the corrupted-baseline test starts from) ---

@pytest.fixture(scope="module")
def twin_stores(tmp_path_factory):
    """Two identical single runs (same config, same seed) into two fresh stores, run side by side."""
    stores = [tmp_path_factory.mktemp("twin_a"), tmp_path_factory.mktemp("twin_b")]
    procs = [start_pipeline([*SMOKE, "sparsity.target=0.5"], s) for s in stores]
    for proc in procs:
        rc, out = finish(proc)
        assert rc == 0, out[-4000:]
    return stores


def test_same_input_same_result(twin_stores):
    runs = []
    for store in twin_stores:
        finished = job_runs(store_client(store), "FINISHED")
        assert len(finished) >= 1
        runs.append(min(finished, key=lambda r: r.info.start_time))  # the fixture's run
    a, b = runs
    assert a.data.tags["config_hash"] == b.data.tags["config_hash"]
    measured = lambda m: {k: v for k, v in m.items()  # noqa: E731  timings differ, results must not
                          if not any(t in k for t in ("latency", "speedup_measured", "seconds"))}
    ma, mb = measured(a.data.metrics), measured(b.data.metrics)
    assert "eval/accuracy" in ma and set(ma) == set(mb)
    assert {k: v for k, v in ma.items() if v != mb[k]} == {}
    masks = []
    for store, run in zip(twin_stores, runs, strict=True):
        path = store_client(store).download_artifacts(run.info.run_id, "masks.npz", str(store))
        with np.load(path, allow_pickle=False) as f:
            masks.append({k: f[k] for k in f.files})
    assert masks[0].keys() == masks[1].keys() and masks[0]
    for key in masks[0]:
        np.testing.assert_array_equal(masks[0][key], masks[1][key], err_msg=key)


def test_corrupted_baseline_is_trained_again(twin_stores):
    store = twin_stores[0]
    cached = list((store / "baselines").glob("*/model.keras"))
    assert len(cached) == 1
    good = cached[0].read_bytes()
    cached[0].write_bytes(good[: len(good) // 2])  # a truncated write, e.g. a full disk
    proc = run_pipeline([*SMOKE, "sparsity.target=0.3"], store)
    out = proc.stdout + proc.stderr
    assert "checksum mismatch" in out  # refused before loading, by its checksum
    client = store_client(store)
    run = [r for r in job_runs(client, "FINISHED") if r.data.params["sparsity.target"] == "0.3"]
    assert len(run) == 1
    assert run[0].data.tags["baseline_trained_here"] == "true"
    assert run[0].data.tags["baseline_hash"] == cached[0].parent.name
    assert len(cached[0].read_bytes()) > len(good) // 2  # replaced by a whole, verifiable file


# --- a job killed hard (SIGKILL) and resumed by rerunning the same command ---

def test_sigkill_then_rerun_completes_and_marks_the_killed_run(tmp_path):
    args = [*SMOKE, "training.finetune.epochs=30", "sparsity.target=0.4"]
    proc = start_pipeline(args, tmp_path)
    db = tmp_path / "mlflow.db"
    deadline, running = time.time() + 180, []
    try:
        while time.time() < deadline and not running:
            assert proc.poll() is None, f"the job ended before it was killed:\n{proc.stdout.read()[-3000:]}"
            if db.exists():
                running = [r for r in job_runs(store_client(tmp_path)) if r.info.status == "RUNNING"]
            time.sleep(0.3)
        assert running, "the job's run never appeared as RUNNING"
        time.sleep(1.0)  # let it get somewhere into training
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped, as a shell would: its pid is gone
    killed = running[0].info.run_id
    client = store_client(tmp_path)
    assert client.get_run(killed).info.status != "FINISHED"
    assert running[0].data.tags["pid"] == str(proc.pid)

    run_pipeline(args, tmp_path)  # the same command again
    runs = job_runs(client)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["config_hash"] == running[0].data.tags["config_hash"]
    after = client.get_run(killed)
    assert after.info.status == "KILLED"
    assert "process ended" in after.data.tags["error"]
    exp = client.get_experiment_by_name("pruning").experiment_id
    report.write(client, None, tmp_path / "report", experiment_ids=[exp])
    assert len(report.runs_frame(client, experiment_ids=[exp])) == 1
    assert (tmp_path / "report" / "results.md").read_text().count("1 finished runs") == 1


# --- a diverging loss ---

def test_nan_loss_fails_the_run_with_the_error(tmp_path):
    proc = run_pipeline([*SMOKE, "training.baseline.optimizer=sgd", "training.baseline.lr=1e30"], tmp_path,
                        check=False)
    assert proc.returncode != 0
    assert "TrainingDiverged" in proc.stderr
    client = store_client(tmp_path)
    (run,) = job_runs(client)
    assert run.info.status == "FAILED"
    assert re.search(r"nan|inf", run.data.tags["error"], re.I), run.data.tags["error"]
    assert not list((tmp_path / "baselines").glob("*/model.keras"))  # a diverged baseline is never cached


def test_nan_in_one_job_of_a_sweep(tmp_path):
    proc = run_pipeline(["-m", *SMOKE, "sparsity.target=0.5", "training.finetune.optimizer=sgd",
                         "training.finetune.lr=0.001,1e30"], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "1 finished, 0 skipped (already finished), 1 failed" in out
    failed = r"failed: job 2 magnitude-0\.50: TrainingDiverged: [a-z-]+ loss became (nan|inf)"
    assert re.search(failed, out), out[-3000:]
    client = store_client(tmp_path)
    by_lr = {float(r.data.params["training.finetune.lr"]): r for r in job_runs(client)}
    assert by_lr[0.001].info.status == "FINISHED"
    assert by_lr[1e30].info.status == "FAILED"
    assert re.search(r"nan|inf", by_lr[1e30].data.tags["error"], re.I)
    exp = client.get_experiment_by_name("pruning").experiment_id
    (parent,) = client.search_runs([exp], "tags.kind = 'sweep'")
    assert parent.info.status == "FAILED"


# --- two sweeps racing on one fresh store ---

def test_two_parallel_sweeps_on_one_fresh_store(tmp_path):
    store = tmp_path / "store"
    procs = [start_pipeline(["-m", *SMOKE, f"method={method}", "sparsity.target=0.3,0.5",
                             "hydra/launcher=workers", "hydra.launcher.n_jobs=2",
                             f"hydra.sweep.dir={tmp_path}/multirun-{method}",
                             f"hydra.run.dir={tmp_path}/outputs-{method}"], store)
             for method in ("magnitude", "random")]
    results = [finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-5000:]
        assert "database is locked" not in out
        assert "sweep done: 2 finished, 0 skipped (already finished), 0 failed" in out
    client = store_client(store)
    runs = job_runs(client)
    assert sorted((r.data.params["method.name"], r.data.params["sparsity.target"]) for r in runs) == [
        ("magnitude", "0.3"), ("magnitude", "0.5"), ("random", "0.3"), ("random", "0.5")]
    assert {r.info.status for r in runs} == {"FINISHED"}
    exp = client.get_experiment_by_name("pruning").experiment_id
    every = client.search_runs([exp], max_results=1000)
    assert {r.info.status for r in every} == {"FINISHED"}  # the sweeps' parents and the baseline too
    assert sum(r.data.tags.get("kind") == "sweep" for r in every) == 2
    assert sum(r.data.tags.get("kind") == "baseline" for r in every) == 1  # one shared baseline
    with sqlite3.connect(store / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
