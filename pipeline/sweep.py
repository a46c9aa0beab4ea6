"""Sweeps: the Hydra callback that opens the parent run, validates every job before any trains,
reports progress, and writes the comparison report at the end."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import tracking
from pipeline.config import ConfigError, run_name, validate
from pipeline.models import check_fits

log = logging.getLogger("pipeline")
TOTAL_ENV, START_ENV = "PIPELINE_SWEEP_TOTAL", "PIPELINE_SWEEP_START"
# hydra.sweep.dir ends in the sweep's process id: two sweeps started in the same second get two folders.
# Cached like Hydra's ${now:}, so every job of a sweep (joblib workers too) sees the parent's value.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)
_held: dict[Path, Any] = {}  # sweep folder -> its lock, held until the process ends (not on the callback:
#                              launchers pickle the callback, and a lock cannot be pickled)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def results_file(config: DictConfig | None = None) -> Path:
    """Where the jobs of this sweep record how they ended (one JSON line each)."""
    sweep_dir = config.hydra.sweep.dir if config is not None else HydraConfig.get().sweep.dir
    return Path(sweep_dir) / "jobs.jsonl"


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Job:
    """One job of a sweep: announces itself and records how it ended."""

    def __init__(self, cfg: DictConfig):
        self.num = HydraConfig.get().job.num
        self.total = int(os.environ.get(TOTAL_ENV, 0)) or "?"
        self.start = time.time()
        self.name = run_name(cfg.method.name, cfg.sparsity.target)
        log.info("[job %s of %s] %s started", self.num + 1, self.total, self.name)

    def _record(self, **entry) -> None:
        entry = {"job": self.num, "name": self.name, "seconds": round(time.time() - self.start, 2), **entry}
        with open(results_file(), "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(entry) + "\n")
        done = len(read_results(results_file()))
        elapsed = time.time() - float(os.environ.get(START_ENV, self.start))
        left = (elapsed / done * (self.total - done)) if isinstance(self.total, int) and done else float("nan")
        log.info("[job %s of %s] %s %s in %.1fs; %d done, elapsed %.0fs, about %.0fs left", self.num + 1,
                 self.total, self.name, entry["status"].lower(), entry["seconds"], done, elapsed, left)

    def finished(self, result: dict[str, Any]) -> None:
        status = "SKIPPED" if result.get("skipped") else "FINISHED"
        self._record(status=status, run_id=result.get("run_id"), accuracy=result.get("accuracy"))

    def failed(self, error: BaseException) -> None:
        log.error("[job %s] %s failed: %s: %s", self.num + 1, self.name, type(error).__name__, error)
        self._record(status="FAILED", error=f"{type(error).__name__}: {error}")


class SweepCallback(Callback):
    """Validates the whole sweep, opens the parent run, and closes it with the report."""

    parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start(config)
        except ConfigError as e:  # Hydra turns a callback's exception into a warning: stop here instead
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)

    def _start(self, config: DictConfig) -> None:
        from hydra import compose

        jobs = job_overrides(config)
        name = config.hydra.job.config_name
        configs = [compose(config_name=name, overrides=overrides) for overrides in jobs]
        parts = [validate(cfg) for cfg in configs]  # every job's config is checked before any trains
        datasets, checked = {}, set()
        for cfg, part in zip(configs, parts):  # every data set is found and readable, every model fits it
            key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True) + str(cfg.seed)
            if key not in datasets:
                datasets[key] = part["data"].load(cfg.seed)
            data, model_key = datasets[key], (key, json.dumps(OmegaConf.to_container(cfg.model), sort_keys=True))
            if model_key not in checked:
                checked.add(model_key)
                check_fits(part["model"], data.input_shape, data.num_classes)
        track = parts[0]["tracking"]
        os.environ[TOTAL_ENV], os.environ[START_ENV] = str(len(jobs)), str(time.time())
        self._claim(Path(config.hydra.sweep.dir))
        results_file(config).unlink(missing_ok=True)
        if not track.enabled:
            return
        uri = tracking.resolve_uri(track.uri)
        tracking.check_store(uri)
        client = tracking.client(uri)  # the database and experiment exist before any worker starts
        exp_id = tracking.experiment_id(client, track.experiment, uri)
        parent = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={**tracking.context_tags(), "kind": "sweep", "jobs": str(len(jobs)),
                                         "overrides": " ".join(config.hydra.overrides.task)})
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        self.client, self.parent = client, parent.info.run_id
        atexit.register(self._close_parent, "KILLED")  # interrupted (Ctrl-C): the parent is not left RUNNING
        log.info("sweep of %d jobs, parent run %s in %s", len(jobs), self.parent, uri)

    @staticmethod
    def _claim(folder: Path) -> None:
        """Hold the sweep folder for this sweep's lifetime: a second sweep into it stops with one line."""
        from filelock import FileLock, Timeout

        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".sweep.lock"))
        try:
            lock.acquire(timeout=0)
            _held[folder] = lock
        except Timeout:
            raise ConfigError(f"hydra.sweep.dir={str(folder)!r} is in use by another sweep that is still "
                              "running; choose another hydra.sweep.dir or wait for it") from None

    def _close_parent(self, status: str) -> None:
        """End the parent run; when interrupted, also the job runs that workers left RUNNING."""
        if not self.parent:
            return
        if status == "KILLED":
            for run in self.client.search_runs(
                    [self.client.get_run(self.parent).info.experiment_id],
                    f"tags.mlflow.parentRunId = '{self.parent}' and attributes.status = 'RUNNING'"):
                self.client.set_tag(run.info.run_id, "error", "the sweep was interrupted")
                self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_terminated(self.parent, status)
        self.parent = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        results = read_results(results_file(config))
        failed = [r for r in results if r["status"] == "FAILED"]
        if self.parent:
            from pipeline import report

            run_ids = [r["run_id"] for r in results if r.get("run_id")]  # skipped jobs: the runs reused
            out = Path(config.hydra.sweep.dir) / "report"
            try:
                self.client.log_text(self.parent, json.dumps(run_ids), "jobs.json")
                for path in report.write(self.client, run_ids, out):
                    self.client.log_artifact(self.parent, str(path), "report")
                frontier = log_frontier(self.client, self.parent, report.runs_frame(self.client, run_ids))
                self.client.set_tag(self.parent, "mlflow.note.content", describe(config, len(results), frontier))
                log.info("report: %s", out)
            finally:
                self._close_parent("FAILED" if failed else "FINISHED")
        counts = {s: sum(r["status"] == s for r in results) for s in ("FINISHED", "SKIPPED", "FAILED")}
        log.info("sweep done: %d finished, %d skipped (already finished), %d failed", *counts.values())
        if failed:
            for r in failed:
                log.error("  failed: job %d %s: %s", r["job"] + 1, r["name"], r["error"])
            sys.exit(1)


def log_frontier(client, parent: str, runs) -> list[str]:
    """Per method, mean accuracy and FLOPs ratio (dense / effective, or / shrunk where the network was
    shrunk) as metric series on the parent run whose step is the measured sparsity in per mille: the
    parent's chart tab draws accuracy against sparsity, one line per method. Returns the methods."""
    import re

    from mlflow.entities import Metric

    from pipeline import report

    if runs.empty:
        return []
    flops = runs["metrics.eval/flops_shrunk"].fillna(runs["metrics.eval/flops_effective"]) \
        if "metrics.eval/flops_shrunk" in runs else runs["metrics.eval/flops_effective"]
    # never one line over different settings: what differs between the runs joins the method's name
    differing = [c for c in report.setting_columns(runs) if runs[c].nunique(dropna=False) > 1]
    label = report.method_labels(runs).str.cat([runs[c].astype(str) for c in differing], sep="_")
    label = label.map(lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_"))
    points = runs.assign(flops_ratio=runs["metrics.eval/flops_dense"] / flops, label=label).groupby(
        ["label", "params.sparsity.target"])[["metrics.eval/accuracy", "metrics.eval/sparsity", "flops_ratio"]].mean()
    now = int(time.time() * 1000)
    metrics = [Metric(f"frontier/{method}/{name}", float(row[column]), now, round(1000 * row["metrics.eval/sparsity"]))
               for (method, _), row in points.iterrows()
               for name, column in (("accuracy", "metrics.eval/accuracy"), ("flops_ratio", "flops_ratio"))]
    for i in range(0, len(metrics), 500):
        client.log_batch(parent, metrics=metrics[i: i + 500])
    return sorted({method for method, _ in points.index})


def describe(config: DictConfig, jobs: int, methods: list[str]) -> str:
    """The parent run's description (MLflow's note): what was swept and where to read the results."""
    given = list(config.hydra.overrides.task)
    named = {o.split("=", 1)[0] for o in given}  # the command line wins over the sweeper's own grid
    grid = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items() if k not in named]
    return (f"Sweep of {jobs} jobs: `{' '.join(given + grid) or '(the defaults)'}`.\n\n"
            "- Report: artifacts `report/results.md` (tables per setting), `report/results.csv`, plots.\n"
            "- Frontier: Model metrics / Chart tab, `frontier/<method>/accuracy` and `frontier/<method>/flops_ratio`"
            " against the measured sparsity in per mille (the step)" + (f", methods {', '.join(methods)}" if methods
                                                                       else "") + ".\n"
            "- Jobs: the runs nested under this one, plus those it reused (`jobs.json`).")
