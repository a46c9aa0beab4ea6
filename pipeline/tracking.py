"""The MLflow side: the store, the experiment, one run per job, and what it logs."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_URI = f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
PARENT_ENV = "PIPELINE_PARENT_RUN_ID"


def resolve_uri(uri: str | None) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else the sqlite store under the repo's mlruns/."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


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
        parent = db.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise ConfigError(f"tracking.uri={uri!r}: {parent} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        from urllib.parse import urlparse

        url = urlparse(uri)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
        except OSError as e:
            raise ConfigError(f"tracking.uri={uri!r}: cannot reach the tracking server ({e})") from None
        return
    raise ConfigError(f"tracking.uri={uri!r}: allowed schemes are sqlite:/// and http(s)://")


def client(uri: str):
    """An MlflowClient whose store exists. A fresh sqlite database is created (tables and migrations)
    under a file lock beside it: MLflow's SqlAlchemyStore creates its tables unguarded, and two processes
    doing so at the same moment corrupt the database (e.g. two sweeps started together on a new store)."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.with_name(db.name + ".lock"))):
        return MlflowClient(tracking_uri=uri)  # opens the store at once: creates or upgrades the tables


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created (with artifacts beside a sqlite store) if it does not exist."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (store_dir(uri) / "artifacts").as_uri() if sqlite_path(uri) else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created meanwhile by another process
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i: i + 100])


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        mlflow_client.log_batch(run_id, metrics=items[i: i + 500])


def log_history(mlflow_client, run_id: str, prefix: str, history: dict[str, list[float]]) -> None:
    """Per-epoch metrics, step = epoch (1-based)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}/{k}", float(v), now, epoch)
             for k, vals in history.items() for epoch, v in enumerate(vals, start=1)]
    for i in range(0, len(items), 500):
        mlflow_client.log_batch(run_id, metrics=items[i: i + 500])


class Run:
    """One MLflow run as a context manager: FINISHED on success, FAILED (with the error as a tag) if not.
    With no client (tracking=none) it logs nothing but still remembers the metrics."""

    def __init__(self, mlflow_client, exp_id: str | None, name: str, tags: dict[str, str]):
        self.client, self.name, self.logged = mlflow_client, name, {}
        self.id = None
        if mlflow_client is None:
            return
        tags = {**tags, "pid": str(os.getpid()), "host": socket.gethostname()}
        if os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        self.id = mlflow_client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.client is None:
            return False
        if exc is None:
            self.client.set_terminated(self.id, "FINISHED")
            return False
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_tag(self.id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
        finally:
            self.client.set_terminated(self.id, status)
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
            log_metrics(self.client, self.id, named, step)

    def history(self, prefix: str, history: dict[str, list[float]]) -> None:
        if self.client:
            log_history(self.client, self.id, prefix, history)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.client:
            self.client.log_artifact(self.id, str(path), folder)

    def text(self, text: str, name: str) -> None:
        if self.client:
            self.client.log_text(self.id, text, name)


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
        if host == socket.gethostname() and pid and not _alive(int(pid)):
            mlflow_client.set_tag(run.info.run_id, "error", "process ended without closing the run")
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


def _alive(pid: int) -> bool:
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
