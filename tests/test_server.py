"""Nothing shared but the tracking server: a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts
proxied from a temp root), jobs in processes of their own, in folders of their own, that never see the
server's files. One baseline per hash, trained by one worker; artifacts through the proxy; a server that
dies mid-sweep; credentials that never land anywhere."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import pytest
from conftest import REPO
from test_failures import NO_RETRIES, free_port, start_server, stop

from pipeline import tracking
from pipeline.baseline import RunStore
from pipeline.config import stable_hash

PY = sys.executable
SMOKE = ["training=smoke", "training.baseline.epochs=1", "training.finetune.epochs=1"]
SECRET = {"MLFLOW_TRACKING_USERNAME": "user-4f1c9a", "MLFLOW_TRACKING_PASSWORD": "pw-8d2e77b3"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; restart() brings it back on the same port and store."""
    root, port = tmp_path_factory.mktemp("server"), free_port()
    box = SimpleNamespace(root=root, uri=f"http://127.0.0.1:{port}", proc=start_server(root, port))
    box.kill = lambda: stop(box.proc)
    box.restart = lambda: setattr(box, "proc", start_server(root, port))
    yield box
    if box.proc.poll() is None:
        stop(box.proc)


def job(server, work: Path, experiment: str, *args, multirun=False, cache=None, env=None):
    """python -m pipeline.run started from `work` (no mlruns/ there), credentials in its environment."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SECRET, "PYTHONHASHSEED": "0", "XDG_CACHE_HOME": str(cache or work / "cache"),
           **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [PY, "-m", "pipeline.run", *(["-m"] if multirun else []), *SMOKE, "tracking=server",
           f"tracking.uri={server.uri}", f"tracking.experiment={experiment}", f"{out}={work}/out", *args]
    return subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def runs_of(experiment: str, uri: str):
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def check_artifacts(client, run, folder: Path) -> list[bytes]:
    """Every artifact the run recorded a checksum for is downloadable through the proxy and matches it."""
    sums = json.loads(run.data.tags[tracking.CHECKSUMS_TAG])
    assert sums, run.info.run_name
    blobs = []
    for name, digest in sums.items():
        path = Path(client.download_artifacts(run.info.run_id, name, str(folder / run.info.run_id)))
        blobs.append(path.read_bytes())
        assert hashlib.sha256(blobs[-1]).hexdigest() == digest, name
    return blobs


def test_workers_elsewhere_share_one_baseline_through_the_server(server, tmp_path):
    procs = [job(server, tmp_path / f"worker{i}", "shared", f"sparsity.target={t}")
             for i, t in enumerate(("0.3", "0.5"))]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    client, runs = runs_of("shared", server.uri)
    jobs = [r for r in runs if r.data.tags.get("config_hash")]
    baselines = [r for r in runs if r.data.tags.get("kind") == "baseline"]
    assert sorted(r.info.status for r in jobs) == ["FINISHED", "FINISHED"]
    assert [b.info.status for b in baselines] == ["FINISHED"]  # one trained; the claim that lost is deleted
    assert sorted(r.data.tags["baseline_trained_here"] for r in jobs) == ["false", "true"]
    assert {r.data.tags["baseline_hash"] for r in jobs} == {baselines[0].data.tags["baseline_hash"]}
    assert baselines[0].info.artifact_uri.startswith("mlflow-artifacts:")  # through the server's proxy
    blobs = [b for r in [*jobs, *baselines] for b in check_artifacts(client, r, tmp_path / "downloaded")]
    for i in range(2):
        assert not (tmp_path / f"worker{i}" / "mlruns").exists()
    assert not (REPO / "mlruns" / "baselines" / baselines[0].data.tags["baseline_hash"]).exists()

    # credentials: in no param, tag, log line or artifact, nor anywhere in the server's artifact store; the
    # user name only as MLflow's own `mlflow.user` tag (who ran it: on a basic-auth server, the login)
    from mlflow.entities import ViewType

    every = client.search_runs([runs[0].info.experiment_id], run_view_type=ViewType.ALL)
    assert {r.data.tags["mlflow.user"] for r in jobs} == {SECRET["MLFLOW_TRACKING_USERNAME"]}
    texts = [*outs, *(json.dumps([r.data.params, {k: v for k, v in r.data.tags.items() if k != "mlflow.user"}])
                      for r in every)]
    for secret in SECRET.values():
        assert not [t[max(0, t.find(secret) - 300):][:600] for t in texts if secret in t], secret
        assert not any(secret.encode() in b for b in blobs), secret
        where = server.root / "artifacts" if secret == SECRET["MLFLOW_TRACKING_USERNAME"] else server.root  # + db
        assert not any(secret.encode() in p.read_bytes() for p in where.rglob("*") if p.is_file()), secret


def tiny_store(server, experiment: str, timeout: float = 60.0) -> RunStore:
    client = tracking.client(server.uri)
    return RunStore(client, tracking.experiment_id(client, experiment, server.uri), timeout)


def tiny(trained: list, seconds: float = 0.0):
    """build and train of a tiny model; `trained` counts the trainings."""
    def build():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    def train(model):
        trained.append(threading.get_ident())
        time.sleep(seconds)
        return {"loss": [1.0]}

    def describe(run, model, history, path):
        run.artifact(path, "model")
    return build, train, describe


def test_workers_that_claim_at_once_train_once_and_a_dead_trainer_is_taken_over(server, monkeypatch):
    monkeypatch.setattr(RunStore, "POLL_S", 0.5)
    trained, got = [], []
    spec = {"probe": time.time()}
    workers = [threading.Thread(target=lambda: got.append(tiny_store(server, "claims").obtain(
        spec, *tiny(trained, seconds=2.0)))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert len(trained) == 1 and len(got) == 3
    assert sorted(trained_now for _, _, trained_now in got) == [False, False, True]

    # a claim whose process on this host is gone is taken over at once; one elsewhere, after its timeout
    store = tiny_store(server, "claims", timeout=3.0)
    for host, pid, spec in ((socket.gethostname(), "999999", {"dead": time.time()}),
                            ("elsewhere", "1", {"silent": time.time()})):
        key = stable_hash(spec)
        stale = store.client.create_run(store.exp_id, tags={"kind": "baseline", "baseline_hash": key,
                                                              "host": host, "pid": pid})
        started = time.monotonic()
        model, _, trained_now = store.obtain(spec, *tiny(trained))
        assert trained_now and isinstance(model, keras.Model)
        assert store.client.get_run(stale.info.run_id).info.status == "KILLED"
        assert (time.monotonic() - started > 3.0) == (host == "elsewhere")


def test_a_server_that_dies_mid_sweep_fails_the_jobs_and_the_rerun_completes_once(server, tmp_path):
    work, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ["sparsity.target=0.3,0.5", "training.baseline.epochs=10"]
    sweep = job(server, work, "dies", *args, multirun=True, cache=cache, env=NO_RETRIES)
    deadline, started = time.time() + 300, []
    while time.time() < deadline and not started and sweep.poll() is None:
        started = [r for r in runs_of("dies", server.uri)[1] if r.data.tags.get("config_hash")]
        time.sleep(0.5)
    assert started, sweep.communicate()[0][-3000:]
    server.kill()
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 1, out[-3000:]
    assert "error: the sweep's report could not be written" in out and "Traceback" not in out, out[-3000:]
    server.restart()
    client, runs = runs_of("dies", server.uri)
    for run in runs:  # nothing FINISHED without its artifacts
        if run.info.status == "FINISHED" and run.data.tags.get("kind") != "sweep":
            check_artifacts(client, run, tmp_path / "downloaded")

    rerun = job(server, work, "dies", *args, multirun=True, cache=cache)
    out = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, out[-3000:]
    client, runs = runs_of("dies", server.uri)
    finished = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("config_hash")]
    assert sorted(r.info.run_name for r in finished) == ["magnitude-0.30", "magnitude-0.50"]  # no duplicates
    assert len([r for r in runs if r.data.tags.get("kind") == "baseline" and r.info.status == "FINISHED"]) == 1
    assert "RUNNING" not in {r.info.status for r in runs}  # the first sweep's runs were closed FAILED
    assert {r.info.status for r in runs if r.data.tags.get("kind") == "sweep"} == {"FAILED", "FINISHED"}
    for run in finished:
        check_artifacts(client, run, tmp_path / "downloaded")
