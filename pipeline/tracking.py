"""The MLflow side: the store, the experiment, one run per job, and what it logs."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from contextlib import closing
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.files import cache_dir, replaced

REPO = Path(__file__).resolve().parents[1]
DEFAULT_URI = f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
PARENT_ENV = "PIPELINE_PARENT_RUN_ID"
CHECKSUMS_TAG = "artifacts.sha256"
LOGGED_MODEL = "masked_model"  # the final model as an MLflow Logged model (Keras flavour)
EXPERIMENT_NOTE = (
    "Pruning jobs of `python -m pipeline.run`: one run per job, named `<method>-<target>`, with its "
    "accuracy (`eval/accuracy`), sparsity over every denominator (`eval/*sparsity`), FLOPs and latency, "
    "masks and model. Each sweep is a parent run (`sweep-<time>`) whose description, report "
    "(`report/results.md`) and charts (`frontier/<method>/accuracy` against sparsity in per mille) "
    "compare its jobs; baselines are runs tagged `kind=baseline`.")
# MLflow retries a failing HTTP request 7 times with growing pauses (about 10 minutes) by default:
# a tracking server that is down fails the job within about a minute instead.
for _key, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_key, _value)
log = logging.getLogger(__name__)


def resolve_uri(uri: str | None) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else the sqlite store under the repo's mlruns/."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def writable(uri: str) -> bool:
    """Can this process write the store? (A sqlite file needs its folder too, for its journal.)"""
    db = sqlite_path(uri)
    return db is None or (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK))


def store_dir(uri: str) -> Path:
    """Where files beside the store live (artifacts, baselines): next to a sqlite db, else mlruns/."""
    db = sqlite_path(uri)
    return db.parent if db else REPO / "mlruns"


def check_store(uri: str) -> None:
    """Fail with one line if the store cannot be reached or written, before anything is written."""
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"tracking.uri={uri!r}: the file store is not supported by MLflow 3; use "
                          "sqlite:///<absolute path>.db or http://host:port")
    db = sqlite_path(uri)
    if db is not None:
        odd = sorted({c for c in "?#%" if c in str(db)})
        if odd:  # sqlite reads '?' as the start of options and '%20' as an escaped space: another file
            raise ConfigError(f"tracking.uri={uri!r}: the path contains {' '.join(odd)}, which sqlite would "
                              "read as URI syntax and open another file; use a path without ? # %")
        parent = db.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise ConfigError(f"tracking.uri={uri!r}: {parent} is not writable")
        if db.exists():
            _check_sqlite(db)
        return
    if uri.startswith(("http://", "https://")):
        from urllib.parse import urlparse

        url = urlparse(uri)
        if url.username or url.password:  # the URI is logged (params, config.yaml): never a secret in it
            raise ConfigError(f"tracking.uri: credentials in the URI are not allowed (they would be logged); "
                              f"use {url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path} "
                              "with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
        except OSError as e:
            raise ConfigError(f"tracking.uri={uri!r}: cannot reach the tracking server ({e})") from None
        return
    raise ConfigError(f"tracking.uri={uri!r}: allowed schemes are sqlite:/// and http(s)://")


def _check_sqlite(db: Path) -> None:
    """A file that is not a sqlite database (or a damaged one) fails here, in one line."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            conn.execute("select count(*) from sqlite_master").fetchall()
    except sqlite3.Error as e:
        raise ConfigError(f"tracking store {db} cannot be opened as an MLflow database: {e}") from None


_clients: dict[str, tuple] = {}  # sqlite uri -> (its file's device and inode, client), for a worker's next jobs


def client(uri: str):
    """An MlflowClient whose store exists. A new sqlite store is created (create_store) under a file lock beside
    it: MLflow's SqlAlchemyStore creates its tables unguarded, and two processes doing so at the same moment
    corrupt the database (e.g. two sweeps started together on a new store). A store this process cannot write
    is opened without the lock, so a read-only store can still be read. A store that is not an MLflow
    database raises ConfigError (one line). A store this process opened before (the same file) is not checked
    again: a sweep's worker opens it twice a job."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)  # MLflow's own helpers (e.g. Logged models) would else open ./mlflow.db
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    try:
        file = db.stat()
        known = _clients.get(uri)
        if known and known[0] == (file.st_dev, file.st_ino):  # opened and checked by this process before
            return known[1]
    except OSError:
        pass
    try:
        if db.exists() and not writable(uri):  # read-only: nothing to create, and no lock file can be made
            return _opened(MlflowClient(tracking_uri=uri))
        made = create_store(db)
        opened = _opened(MlflowClient(tracking_uri=uri))  # upgrades the tables of a store made by an older MLflow
        if made:
            collect_sqlalchemy()
        file = db.stat()
        _clients[uri] = (file.st_dev, file.st_ino), opened
        return opened
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"tracking store {db} cannot be opened as an MLflow database: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def preload(uri: str) -> None:
    """Import what opening the store at `uri` and starting a run there take (MLflow, its run context and its
    sqlite store: two to three seconds), e.g. in a thread while the process waits for something else."""
    import mlflow.tracking.context.registry  # noqa: F401

    if sqlite_path(uri) is not None:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def creation_lock(db: Path):
    """The lock beside a sqlite store under which it is created."""
    from filelock import FileLock

    return FileLock(str(db.with_name(db.name + ".lock")))


def create_store(db: Path) -> bool:
    """The sqlite store db, unless it exists (then False): a copy of empty_store(), whose default experiment's
    artifact location is then set as MLflow sets it (./mlruns/0, made absolute: the copy had its maker's)."""
    import sqlite3

    db.parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(db):
        if db.exists():
            return False
        with replaced(db) as part:
            try:
                shutil.copyfile(empty_store(), part)
            except OSError:  # no cache to keep it in (e.g. a read-only home): MLflow makes this one
                made_by_mlflow(part)
            now = int(time.time() * 1000)
            with closing(sqlite3.connect(part)) as conn, conn:
                conn.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                             "WHERE experiment_id = 0", (os.path.join(os.path.abspath("mlruns"), "0"), now, now))
        return True


def empty_store() -> Path:
    """An empty MLflow sqlite store (its tables and migrations, made by MLflow), kept in the user's cache per
    MLflow version: each new store is a copy, made in milliseconds where MLflow's migrations take one to two
    seconds, each time."""
    from importlib.metadata import version

    template = cache_dir() / f"empty-store-mlflow-{version('mlflow')}.db"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with creation_lock(template):
        if not template.exists():
            with replaced(template) as part:
                made_by_mlflow(part)
    return template


def made_by_mlflow(db: Path) -> None:
    """A new store made at db by MLflow (its tables and migrations), quietly."""
    from mlflow.tracking import MlflowClient

    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    finally:
        quiet.setLevel(level)
    collect_sqlalchemy()


def collect_sqlalchemy() -> None:
    """Making a store, and opening a new one, leave SQLAlchemy classes to the garbage collector, whose
    callbacks, should a Ctrl-C come while one runs, print a traceback: collected at once instead."""
    import gc

    gc.collect()


class NewStore:
    """A sqlite store that does not exist yet, put in place (create_store) only once the sweep's checks pass:
    a sweep that fails them writes nothing (discard). The first store made with this MLflow makes
    empty_store() meanwhile, in a thread. Nothing to do for a store that exists, or a server."""

    def __init__(self, uri: str):
        db = sqlite_path(uri)
        self.db = db if db is not None and not db.exists() else None
        if self.db is not None:
            self.thread = threading.Thread(target=self._prepare, daemon=True)
            self.thread.start()

    @staticmethod
    def _prepare() -> None:
        try:
            empty_store()
        except Exception:  # made again by place(), which says what is wrong
            pass

    @property
    def made(self) -> bool:
        """Whether this is a store the sweep makes (it holds no run)."""
        return self.db is not None

    def place(self) -> None:
        """The new store, in place, unless one appeared meanwhile (another sweep's)."""
        if self.db is not None:
            self.thread.join()
            create_store(self.db)

    def discard(self) -> None:
        if self.db is not None:
            self.thread.join()


def existing_client(uri: str):
    """A client for reading a store that must already exist (report, verify): never creates one."""
    db = sqlite_path(uri)
    if db is None and not uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking URI {uri!r}: allowed schemes are sqlite:/// and http(s)://")
    if db is not None and not db.is_file():
        raise ConfigError(f"no tracking store at {db} (tracking URI {uri})")
    if db is not None:
        _check_sqlite(db)
    else:
        check_store(uri)
    return client(uri)


def _opened(mlflow_client):
    mlflow_client.search_experiments(max_results=1)  # reads the store now: a corrupt file fails here
    return mlflow_client


class Store:
    """A job's tracking store (its tracking config `track`): the URI, and the client and experiment id opened
    on first use (None with tracking off), so that a baseline can train before MLflow is even imported."""

    def __init__(self, track):
        self.track, self.uri = track, resolve_uri(track.uri)

    @functools.cached_property
    def client(self):
        return client(self.uri) if self.track.enabled else None

    @functools.cached_property
    def exp_id(self) -> str | None:
        return experiment_id(self.client, self.track.experiment, self.uri) if self.client else None


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created (with artifacts beside a sqlite store) if it does not exist."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (store_dir(uri) / "artifacts").as_uri() if sqlite_path(uri) else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifacts,
                                               tags={"mlflow.note.content": EXPERIMENT_NOTE})
    except Exception:  # created meanwhile by another process
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def params_of(conf: dict[str, Any]) -> dict[str, Any]:
    """A config as MLflow params: dotted keys, without `_target_` class paths and unset (null) values."""
    from pipeline.config import flatten

    return {k: v for k, v in flatten(conf).items() if v is not None and not k.endswith("_target_")}


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i: i + 100])


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int = 0,
                model_id: str | None = None, history: dict[str, dict[str, list[float]]] | None = None) -> None:
    """The metrics at `step`; with `model_id`, the Logged model's too. With them, `history`: per prefix,
    per-epoch metrics (step = epoch, from 1)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}/{k}", float(v), now, epoch)
             for prefix, metrics_of in (history or {}).items()
             for k, vals in metrics_of.items() for epoch, v in enumerate(vals, start=1)]
    items += [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        mlflow_client.log_batch(run_id, metrics=items[i: i + 500])


class Run:
    """One MLflow run as a context manager: FINISHED on success, FAILED (with the error as a tag) if not.
    With no client (tracking=none) it logs nothing but still remembers the metrics."""

    def __init__(self, mlflow_client, exp_id: str | None, name: str, tags: dict[str, str]):
        self.client, self.name, self.logged, self.checksums, self.histories = mlflow_client, name, {}, {}, {}
        self.id, self.exp_id, self.model_id = None, exp_id, None
        if mlflow_client is None:
            return
        tags = {**context_tags(), **tags, "pid": str(os.getpid()), "host": socket.gethostname()}
        if os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        self.id = mlflow_client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """FINISHED with the artifacts' checksums, or FAILED/KILLED with the error. If the store cannot
        be told (server down, disk full), the ending is journaled and recorded on the next start."""
        if self.client is None:
            return False
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        error = None if exc is None else f"{exc_type.__name__}: {exc}"
        try:
            if self.histories:
                self.metrics({})
            if exc is None:
                self.client.set_tag(self.id, CHECKSUMS_TAG, json.dumps(self.checksums, sort_keys=True))
            else:
                self.client.set_tag(self.id, "error", error[:5000])
                self.text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
            self.client.set_terminated(self.id, status)
        except Exception as store_error:
            cause = error or f"the tracking store failed while closing the run: {type(store_error).__name__}"
            journal(self.client.tracking_uri, self.id, "FAILED" if status == "FINISHED" else status, cause)
            if exc is None:
                raise
        return False

    def params(self, params: dict[str, Any]) -> None:
        if self.client:
            log_params(self.client, self.id, params)

    def tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.id, key, value)

    def metrics(self, metrics: dict[str, float], prefix: str = "", step: int = 0) -> None:
        named = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        self.logged.update(named)
        if self.client:
            log_metrics(self.client, self.id, named, step, self.model_id, self.histories)
        self.histories = {}

    def history(self, prefix: str, history: dict[str, list[float]]) -> None:
        """Per-epoch metrics, written with the run's next metrics() or at its end (one write fewer)."""
        self.histories[prefix] = history

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.client:
            self.client.log_artifact(self.id, str(path), folder)
            name = f"{folder}/{Path(path).name}" if folder else Path(path).name
            self.checksums[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    def text(self, text: str, name: str) -> None:
        if self.client:
            self.client.log_text(self.id, text, name)
            self.checksums[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def dataset(self, data) -> None:
        """The data set as the run's input (the runs table's Dataset column): name, source, content digest,
        and the split sizes and class count as its profile."""
        if not self.client:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = {"train": len(data.y_train), "validation": len(data.y_val), "test": len(data.y_test),
                   "classes": data.num_classes, "image_shape": list(data.input_shape)}
        if data.class_names:
            profile["class_names"] = list(data.class_names)
        entity = Dataset(data.name, data.digest, "local", json.dumps({"uri": data.source}), profile=json.dumps(profile))
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "train")])]
        try:
            self.client.log_inputs(self.id, inputs)
        except Exception as e:  # a tracking server creates a data set unguarded: two jobs that log the same
            if "UNIQUE constraint" not in str(e) and "duplicate key" not in str(e):  # one at once, one fails
                raise
            self.client.log_inputs(self.id, inputs)  # it exists now: this links it

    def keras_model(self, model, example) -> None:
        """The model as an MLflow Logged model (Keras flavour, signature inferred from `example` and the model's
        output shape): it can be registered and served from the UI. The metrics logged after it are the Logged
        model's too: MLflow links those logged before by reading each one's history (a tenth of a second for a
        job's)."""
        if not self.client:
            return
        import keras
        import mlflow
        import mlflow.tensorflow
        import numpy as np
        import tensorflow as tf
        from mlflow.models import infer_signature

        mlflow.set_experiment(experiment_id=self.exp_id)  # where the fluent API creates it (store: tracking.client)
        out = model.compute_output_spec(keras.KerasTensor((None, *example.shape[1:]), str(example.dtype)))
        signature = infer_signature(example, np.zeros((len(example), *out.shape[1:]), out.dtype))  # shapes: no call
        # not named "model": MLflow 3 would then read the run's artifacts under model/ from the Logged model
        self.model_id = mlflow.tensorflow.log_model(
            model, name=LOGGED_MODEL, signature=signature, run_id=self.id,
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]).model_id


def device_tags() -> dict[str, str]:
    """Where the job computes: `device` (the GPU's name, or CPU), TensorFlow's version and build, and whether
    its CPU kernels are oneDNN's (`tf.onednn`: TF_ENABLE_ONEDNN_OPTS; their float rounding differs from Eigen's)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    build = {k: str(v) for k, v in tf.sysconfig.get_build_info().items()
             if k in ("cuda_version", "cudnn_version", "is_cuda_build", "is_rocm_build")}
    return {"device": ", ".join(names) or "CPU", "tf.version": tf.__version__,
            "tf.build": json.dumps(build, sort_keys=True), "tf.onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")}


def context_tags() -> dict[str, str]:
    """MLflow's standard run context, as mlflow.start_run records it: user, source, git commit."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # context is a courtesy: never fail a run for it
        return {}


def journal_dir() -> Path:
    """Where a run's ending waits when the store could not be told (outside the store, on purpose)."""
    return cache_dir() / "unclosed-runs"


def journal(uri: str, run_id: str, status: str, error: str) -> None:
    folder = journal_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"uri": uri, "run_id": run_id, "status": status, "error": error[:5000], "time": time.time()}
    with replaced(folder / f"{run_id}.json") as part:
        part.write_text(json.dumps(entry))
    log.error("the tracking store did not answer: run %s will be marked %s on the next start (%s)",
              run_id, status, folder)


def close_journaled(mlflow_client) -> int:
    """Record the endings journaled for this store; return how many."""
    folder, closed = journal_dir(), 0
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry = json.loads(path.read_text())
        if entry["uri"] != mlflow_client.tracking_uri:
            continue
        if _status(mlflow_client, entry["run_id"]) == "RUNNING":
            mlflow_client.set_tag(entry["run_id"], "error", entry["error"])
            mlflow_client.set_terminated(entry["run_id"], entry["status"], int(entry["time"] * 1000))
            closed += 1
        path.unlink()
    return closed


def finished_run(mlflow_client, exp_id: str, config_hash: str):
    """The newest FINISHED run of this exact config, if any."""
    runs = mlflow_client.search_runs([exp_id], f"tags.config_hash = '{config_hash}' and "
                                     "attributes.status = 'FINISHED'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def close_abandoned(mlflow_client, exp_id: str, config_hash: str) -> int:
    """Mark RUNNING runs of this config whose process is gone (killed hard) as KILLED."""
    runs = mlflow_client.search_runs([exp_id], f"tags.config_hash = '{config_hash}' and "
                                     "attributes.status = 'RUNNING'")
    closed = 0
    for run in runs:
        pid, host = run.data.tags.get("pid"), run.data.tags.get("host")
        if host == socket.gethostname() and pid and not alive(int(pid)):
            mlflow_client.set_tag(run.info.run_id, "error", "process ended without closing the run")
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


def _status(mlflow_client, run_id: str) -> str | None:
    """The run's status, or None if the store has no such run (deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id).info.status
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def alive(pid: int) -> bool:
    """Is the process running (a zombie, dead but not yet reaped, is not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
