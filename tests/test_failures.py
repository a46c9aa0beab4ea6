"""Failures end clean: bad seeds and URIs, a corrupt or read-only store, a tracking server that goes
away mid-job, Ctrl-C, and two sweeps that would share a folder. Real processes, real stores."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, run_pipeline

from pipeline import tracking
from pipeline.config import ConfigError
from pipeline.sweep import SweepCallback

SMOKE = ["training=smoke"]
PY = sys.executable


def one_error_line(proc, needle):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def cli(module, *args, env=None):
    return subprocess.run([PY, "-m", f"pipeline.{module}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [["seed=4294967296"], ["seed=-1"], ["-m", "seed=0,4294967296"]])
def test_seeds_outside_numpys_range_are_config_errors(tmp_path, args):
    one_error_line(run_pipeline(args, tmp_path, check=False), "seed=")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", ["a?mode=ro.db", "a%20b.db", "a#b.db"])
def test_uris_that_sqlite_would_misread_are_refused(tmp_path, name):
    proc = run_pipeline([f"tracking.uri='sqlite:///{tmp_path}/{name}'"], tmp_path, check=False)
    one_error_line(proc, "sqlite would read")
    assert list(tmp_path.glob("*.db")) == []


def test_a_corrupt_store_is_one_line_for_run_sweep_report_and_verify(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database " * 100)
    uri = f"sqlite:///{db}"
    for proc in (run_pipeline([], tmp_path, check=False), run_pipeline(["-m", "seed=0,1"], tmp_path, check=False),
                 cli("report", "--uri", uri, "--out", str(tmp_path / "report")),
                 cli("verify", "0123456789abcdef", "--uri", uri)):
        one_error_line(proc, "cannot be opened as an MLflow database")
    assert db.read_bytes().startswith(b"this is not a database")


def test_a_store_made_aside_is_put_in_place_unless_one_appeared_meanwhile(tmp_path):
    """tracking.NewStore (a sweep's new store, made while the sweep checks its data and models): placed, it is
    a working MLflow store; a store another sweep created meanwhile is kept as it is. Nothing left aside."""
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    store = tracking.NewStore(uri)
    store.place()
    client = tracking.client(uri)
    run = client.create_run(tracking.experiment_id(client, "pruning", uri))
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    uri = f"sqlite:///{tmp_path}/raced/mlflow.db"
    store = tracking.NewStore(uri)
    client = tracking.client(uri)  # the other sweep's
    exp = tracking.experiment_id(client, "theirs", uri)
    store.place()
    assert tracking.client(uri).get_experiment(exp).name == "theirs"
    assert not list(tmp_path.rglob("*.part"))


def test_a_new_store_is_a_copy_of_an_empty_one_made_by_mlflow(tmp_path, monkeypatch):
    """A new store is a copy of the empty store MLflow made once in the user's cache, as MLflow would have made
    it here (its default experiment's artifacts under ./mlruns); without a cache to keep it in, MLflow makes it."""
    import sqlite3

    def experiments(db):
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tracking.made_by_mlflow(tmp_path / "by-mlflow.db")
    tracking.client(f"sqlite:///{tmp_path}/first.db")
    template = tracking.empty_store()
    assert template.parent == tmp_path / "cache" / "pipeline"
    made = template.stat().st_mtime_ns
    tracking.NewStore(f"sqlite:///{tmp_path}/second.db").place()
    assert template.stat().st_mtime_ns == made  # made once
    assert experiments(tmp_path / "first.db") == experiments(tmp_path / "second.db") == experiments(
        tmp_path / "by-mlflow.db") == [(0, "Default", str(tmp_path / "mlruns" / "0"))]
    (tmp_path / "cache").rename(tmp_path / "cache-gone")
    (tmp_path / "cache").write_text("not a folder")  # nowhere to keep a template
    client = tracking.client(f"sqlite:///{tmp_path}/third.db")
    assert client.create_experiment("x") and experiments(tmp_path / "third.db")[0] == experiments(
        tmp_path / "first.db")[0]


def test_a_read_only_store_can_be_reported_and_verified():
    """As a user who may read the store but not write its folder: no lock file, no tag, no error."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0 or subprocess.run([*nobody, "true"]).returncode != 0:
        pytest.skip("needs root, to read the store as another user")
    if subprocess.run([*nobody, PY, "-c", "import pipeline.report"], cwd="/tmp", capture_output=True).returncode:
        pytest.skip(f"another user cannot run this checkout's Python ({PY}): a folder above it is private, "
                    "e.g. a clone made in `mktemp -d`")
    store = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp folders are private to their owner
    # the other user's home and cache: not /tmp itself, whose pipeline/ cache folder would pass for the package
    home = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(store, 0o755)
        os.chmod(home, 0o777)
        run_pipeline([*SMOKE], store)
        uri = f"sqlite:///{store}/mlflow.db"
        client = tracking.client(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id],
                                    "tags.config_hash != ''")
        (store / "mlflow.db.lock").unlink(missing_ok=True)  # the writers' lock: readers must not need it
        env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home), "MPLCONFIGDIR": str(home)}
        out = home / "report"
        for args in (["report", "--uri", uri, "--out", str(out)], ["verify", run.info.run_id, "--uri", uri]):
            proc = subprocess.run([*nobody, PY, "-m", f"pipeline.{args[0]}", *args[1:]], cwd="/tmp",
                                  capture_output=True, text=True, timeout=300, env=env)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
        assert (out / "results.md").exists()
        assert not (store / "mlflow.db.lock").exists()
        assert "verified" not in client.get_run(run.info.run_id).data.tags  # nothing could be written
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


# MLflow's HTTP retries (pipeline.tracking's defaults) only delay a job whose server is gone for good
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int):
    """A real `mlflow server` on loopback, artifacts proxied, serving until stopped."""
    cmd = [str(Path(PY).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/server.db", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise AssertionError("mlflow server did not start")


def stop(server):
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_server_that_goes_away_fails_the_job_and_the_rerun_closes_it(tmp_path):
    root, work = tmp_path / "server", tmp_path / "job"
    root.mkdir()
    work.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONHASHSEED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [*SMOKE, "training.baseline.epochs=30", f"tracking.uri={uri}", f"hydra.run.dir={work}/out"]
    server = start_server(root, port)
    try:  # NO_RETRIES: once the server is gone, each request fails at once instead of after pauses
        job = subprocess.Popen([PY, "-m", "pipeline.run", *args], cwd=work, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**env, **NO_RETRIES})
        client = tracking.client(uri)
        deadline, running = time.time() + 120, []
        while time.time() < deadline and not running:
            exp = client.get_experiment_by_name("pruning")
            running = exp and client.search_runs([exp.experiment_id], "tags.config_hash != ''")
            time.sleep(0.5)
        assert running, "the job's run never appeared"
    finally:
        stop(server)  # while the job trains its baseline
    out, _ = job.communicate(timeout=300)  # MLflow's own retries would wait about 10 minutes
    assert job.returncode != 0
    assert "will be marked FAILED on the next start" in out, out[-3000:]
    assert list((tmp_path / "cache" / "pipeline" / "unclosed-runs").glob("*.json"))

    server = start_server(root, port)
    try:
        args[1] = "training.baseline.epochs=2"  # another job: only its start closes the journaled run
        rerun = subprocess.run([PY, "-m", "pipeline.run", *args], cwd=work, capture_output=True, text=True,
                               env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        first = tracking.client(uri).get_run(running[0].info.run_id)
        assert first.info.status == "FAILED"
        assert "MlflowException" in first.data.tags["error"] or "Connection" in first.data.tags["error"]
        assert not list((tmp_path / "cache" / "pipeline" / "unclosed-runs").glob("*.json"))
    finally:
        stop(server)


def test_ctrl_c_ends_a_joblib_sweep_with_one_line_and_killed_runs(tmp_path):
    cmd = [PY, "-m", "pipeline.run", "-m", *SMOKE, "training.baseline.epochs=400", "sparsity.target=0.3,0.5",
           "hydra/launcher=workers", "hydra.launcher.n_jobs=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # a terminal's default Ctrl-C: a shell without job control starts background jobs (a CI runner's) with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = None
    deadline, running = time.time() + 180, []
    while time.time() < deadline and len(running) < 2:
        if (tmp_path / "mlflow.db").exists():
            client = client or tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
            exp = client.get_experiment_by_name("pruning")
            running = exp and client.search_runs([exp.experiment_id], "tags.config_hash != ''") or []
        time.sleep(0.5)
    assert len(running) == 2, "both jobs should be running"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted:"), err[-2000:]
    statuses = {r.info.status for r in client.search_runs([running[0].info.experiment_id])}
    assert "RUNNING" not in statuses and "KILLED" in statuses


def test_a_new_stores_migrations_are_collected_at_once(tmp_path, monkeypatch):
    """Creating a store leaves SQLAlchemy classes whose collection, were a Ctrl-C to come during it, printed a
    traceback (the Ctrl-C test above caught one): whoever makes a store (here, the empty one new stores copy)
    collects them at once."""
    import gc

    from sqlalchemy.orm import clsregistry

    removed, remove = [], clsregistry._MultipleClassMarker._remove_item
    monkeypatch.setattr(clsregistry._MultipleClassMarker, "_remove_item",
                        lambda marker, ref: (removed.append(ref), remove(marker, ref)))
    gc.collect()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the empty store is made here, once
    tracking.client(f"sqlite:///{tmp_path}/made-here.db")
    tracking.NewStore(f"sqlite:///{tmp_path}/made-aside.db").place()
    made = len(removed)
    gc.collect()
    assert made >= 2 and len(removed) == made


def test_two_sweeps_never_share_a_folder(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")  # time and the sweep's process id
    folder = tmp_path / "sweep"
    claim = [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.sweep import "
             "SweepCallback; SweepCallback._claim(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
             str(folder)]
    holder = subprocess.Popen(claim, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="in use by another sweep"):
            SweepCallback._claim(folder)
    finally:
        holder.kill()
        holder.wait()
    SweepCallback._claim(folder)  # free again once that sweep has ended
