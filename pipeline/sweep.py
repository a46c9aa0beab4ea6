"""Sweeps: the Hydra callback that opens the parent run, validates the jobs (all before any trains with
Hydra's basic sweeper; each as it starts with another sweeper, e.g. Optuna), reports progress, and writes
the comparison report at the end; and the objective a job returns for an optimising sweeper."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import tracking
from pipeline.config import ConfigError, exit_config_error, require, run_name, validate
from pipeline.models import check_fits

log = logging.getLogger("pipeline")
TOTAL_ENV, START_ENV = "PIPELINE_SWEEP_TOTAL", "PIPELINE_SWEEP_START"
SWEPT_ENV = "PIPELINE_SWEEP_KEYS"  # the keys the sweep varies (JSON): a job's start line names their values
RESULTS_ENV = "PIPELINE_SWEEP_RESULTS"  # the absolute path of jobs.jsonl: workers may run in another folder
PROGRESS = "progress"  # with a tracking server, each job's ending also goes there, on the parent run: workers
#                        on machines that do not see the sweep's folder are counted too
# What a job needs from its sweep's process, all in the environment: the sweep's callback sets them in each
# job's process as the job starts (on_job_start), whatever process the launcher runs it in
SWEEP_ENV = (TOTAL_ENV, START_ENV, SWEPT_ENV, RESULTS_ENV, tracking.PARENT_ENV)
BASIC_SWEEPERS = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",  # hydra/sweeper=basic
                  "hydra_plugins.pipeline_grid_sweeper.grid_sweeper.BasicSweeper")  # grid, the default
# What a job returns for a sweeper to maximise (see objective()): the final model's accuracy on the
# validation split (its last fine-tuning epoch); the test split stays for the reported metrics.
OBJECTIVE_METRIC = "finetune/val_accuracy"
FAILED_OBJECTIVE = float("-inf")  # a failed job's: below every result, and the sweep goes on (Optuna stops
#                                   on None or NaN)
# hydra.sweep.dir ends in the sweep's process id: two sweeps started in the same second get two folders.
# Cached like Hydra's ${now:}, so every job of a sweep (joblib workers too) sees the parent's value.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)
_held: dict[Path, Any] = {}  # sweep folder -> its lock, held until the process ends (not on the callback:
#                              launchers pickle the callback, and a lock cannot be pickled)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _overrides(config: DictConfig) -> list:
    """The sweep's overrides, parsed: the sweeper's params, then the command line's (which win)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    return OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))


def is_basic_sweeper(config: DictConfig) -> bool:
    """Hydra's basic sweeper: its jobs are known before any starts. Another (e.g. Optuna) picks each job
    from the results so far."""
    return config.hydra.sweeper.get("_target_") in BASIC_SWEEPERS


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(_overrides(config), None) for job in batch]


def shared_overrides(config: DictConfig) -> list[str]:
    """The overrides that no sweep varies: what every job of any sweeper has in common."""
    return [o.input_line for o in _overrides(config) if not o.is_sweep_override()]


def swept_keys(config: DictConfig) -> list[str]:
    return sorted({o.key_or_group for o in _overrides(config) if o.is_sweep_override()})


def flops_budget() -> float | None:
    """The FLOPs budget of the running job's sweep callback (hydra.callbacks.sweep.flops_budget), if any."""
    if not HydraConfig.initialized():
        return None
    for callback in (HydraConfig.get().get("callbacks") or {}).values():
        if callback.get("_target_") == f"{__name__}.{SweepCallback.__name__}":
            return callback.get("flops_budget")
    return None


def objective(metrics: dict[str, float], budget: float | None = None) -> float:
    """What a job returns for a sweeper (e.g. Optuna) to maximise, from the metrics its run logged: the
    final model's validation accuracy. With a FLOPs budget (the fraction of the dense model's
    multiply-accumulates a job may keep: eval/flops_effective / eval/flops_dense <= budget), a job over
    it scores minus its excess instead: below every job within the budget, and higher the nearer it
    comes, so the search is led towards the budget."""
    accuracy = float(metrics[OBJECTIVE_METRIC])
    if math.isnan(accuracy):
        return FAILED_OBJECTIVE
    if budget is None:
        return accuracy
    kept = metrics["eval/flops_effective"] / metrics["eval/flops_dense"]
    return accuracy if kept <= budget else -(kept - budget)


def results_file(config: DictConfig | None = None) -> Path:
    """Where the jobs of this sweep record how they ended (one JSON line each)."""
    if config is None and os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    sweep_dir = config.hydra.sweep.dir if config is not None else HydraConfig.get().sweep.dir
    return Path(sweep_dir) / "jobs.jsonl"


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Job:
    """One job of a sweep: announces itself and records how it ended. With Hydra's basic sweeper the
    sweep's callback knows the total and validated this job before any started; with another sweeper
    the total is unknown ("job 3") and the job is validated as it starts (`validated` is False)."""

    def __init__(self, cfg: DictConfig):
        hydra_cfg = HydraConfig.get()
        self.num = hydra_cfg.job.num
        total = os.environ.get(TOTAL_ENV, "")
        self.total = int(total) if total.isdigit() and int(total) > 0 else None
        self.validated = self.total is not None
        self.start = time.time()
        self.label = f"[job {self.num + 1} of {self.total}]" if self.total else f"[job {self.num + 1}]"
        try:
            self.name = run_name(cfg.method.name, cfg.sparsity.target)
        except Exception:  # a config that cannot even name its run: validating it will say why
            self.name = f"job-{self.num + 1}"
        try:
            uri = tracking.resolve_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
        except Exception:  # as for the name
            uri = None
        self.server = uri if uri and not tracking.sqlite_path(uri) and os.environ.get(tracking.PARENT_ENV) else None
        swept = set(json.loads(os.environ.get(SWEPT_ENV) or "[]"))
        chosen = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
        log.info("%s %s started%s", self.label, self.name, f": {' '.join(chosen)}" if chosen else "")

    def _record(self, **entry) -> None:
        entry = {"job": self.num, "name": self.name, "seconds": round(time.time() - self.start, 2), **entry}
        path, done = results_file(), 0
        if path.parent.is_dir():  # the sweep's folder, where this worker sees it (this machine, a shared disk)
            with open(path, "a") as f:  # one short line per write: appends do not interleave
                f.write(json.dumps(entry) + "\n")
            done = len(read_results(path))
        if self.server:
            try:
                client, parent = tracking.client(self.server), os.environ[tracking.PARENT_ENV]
                client.log_text(parent, json.dumps(entry), f"{PROGRESS}/job-{self.num:05d}.json")
                done = max(done, len(client.list_artifacts(parent, PROGRESS)))
            except Exception as e:  # the server is away: the job's own run says what happened
                log.warning("%s could not be counted on the sweep's run: %s", self.label, type(e).__name__)
        elapsed = time.time() - float(os.environ.get(START_ENV) or self.start)
        left = f", about {elapsed / done * (self.total - done):.0f}s left" if self.total and done else ""
        scored = f" (objective {entry['objective']:.4f})" if entry.get("objective") is not None else ""
        log.info("%s %s %s in %.1fs%s; %d done, elapsed %.0fs%s", self.label, self.name, entry["status"].lower(),
                 entry["seconds"], scored, done, elapsed, left)

    def finished(self, result: dict[str, Any], objective: float | None = None) -> None:
        status = "SKIPPED" if result.get("skipped") else "FINISHED"
        self._record(status=status, run_id=result.get("run_id"), accuracy=result.get("accuracy"),
                     objective=objective)

    def failed(self, error: BaseException) -> None:
        what = "invalid config" if isinstance(error, ConfigError) else type(error).__name__
        text = " ".join(str(error).split())
        log.error("%s %s failed: %s: %s", self.label, self.name, what, text)
        self._record(status="FAILED", error=f"{what}: {text}")


def stand_back() -> None:
    """For a sweep whose jobs run in workers, once they have their first work: this process only launches the
    jobs, waits, and writes the report. It yields the cores to the workers (with hydra/sweeper=basic, Hydra
    composes every job once more here while the first baseline trains), and imports the report's modules
    meanwhile (a second less at the end)."""
    os.nice(10)  # per thread on Linux: this one and those it starts
    threading.Thread(target=_import_report, daemon=True).start()


def _import_report() -> None:
    os.nice(9)  # 19: last, after what the jobs need first (the workers import MLflow at 10 meanwhile)
    import matplotlib.pyplot  # noqa: F401

    from pipeline import report  # noqa: F401


def first_problem(checks: list[tuple]) -> str | None:
    """For each (data source, seed, model spec): the data loads and the model fits it. The first problem's
    error (one line), or None."""
    loaded = {}
    for source, seed, spec in checks:
        try:
            key = repr((source, seed))
            if key not in loaded:
                loaded[key] = source.load(seed)
            check_fits(spec, loaded[key].input_shape, loaded[key].num_classes)
        except ConfigError as e:
            return str(e)
    return None


class Workers:
    """What the sweep asks of the processes its jobs will run in, before any job starts: check that its data
    sets load and its models fit them (check), and find or train the first job's baseline (prepare, which
    returns at once). Here, the jobs run in the sweep's process (Hydra's basic launcher): the sweep checks,
    and its first job trains the baseline. Launchers whose workers start with the sweep do both in a worker,
    sparing the sweep's process TensorFlow and having the baseline ready sooner: hydra/launcher=ray (which
    sets `workers`) and joblib (pipeline/joblib_workers.py)."""

    elsewhere = False  # the jobs run in processes other than the sweep's

    def check(self, checks: list[tuple]) -> str | None:
        return first_problem(checks)

    def prepare(self, cfg: DictConfig, new_store: bool) -> None:
        """new_store: the sweep made the store (no job can have finished in it: run.prepare_baseline)."""


workers: Workers | None = None


class SweepCallback(Callback):
    """Validates the whole sweep, opens the parent run, and closes it with the report."""

    parent: str | None = None
    env: dict[str, str] = {}  # what the jobs read from their sweep (SWEEP_ENV), set once the sweep started

    def __init__(self, flops_budget: float | None = None) -> None:
        """flops_budget (hydra.callbacks.sweep.flops_budget): the fraction of the dense model's FLOPs a
        job may keep for its objective to be its accuracy (see objective()); None: no budget."""
        require(flops_budget is None or (isinstance(flops_budget, int | float) and not isinstance(flops_budget, bool)
                                         and 0 < flops_budget <= 1), "hydra.callbacks.sweep.flops_budget",
                flops_budget, "a number in (0, 1]: the fraction of the dense model's FLOPs a job may keep")
        self.flops_budget = flops_budget

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from pipeline import joblib_workers

        try:
            self._start(config)
            self.env = {k: os.environ[k] for k in SWEEP_ENV if k in os.environ}
        except (ConfigError, HydraException, OmegaConfBaseException) as e:
            # Hydra would turn a callback's exception into a warning: stop here, in one line
            joblib_workers.stop()
            exit_config_error(e)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In the job's process: the sweep's environment, which workers started before it was set lack."""
        os.environ.update(self.env)

    def _start(self, config: DictConfig) -> None:
        from pipeline import joblib_workers, launch

        # The basic sweeper's jobs are known: each is checked here, before any trains. Another sweeper picks
        # its jobs as results come in: what they all share is checked here, each job as it starts.
        basic = is_basic_sweeper(config)
        jobs = job_overrides(config) if basic else [shared_overrides(config)]
        pool = workers or (joblib_workers.JoblibWorkers(config, len(jobs) if basic else None)
                           if joblib_workers.is_joblib(config) else Workers())
        with launch.shared_composition():
            configs = [launch.compose(config, overrides) for overrides in jobs]  # once: the launcher sends these
        parts = [validate(cfg) for cfg in configs]  # every job's config is checked before any trains
        if not basic:
            self._check_optimiser(config, parts[0]["tracking"])
        checks = {}  # every data set must be found and readable, every model fit it
        for cfg, part in zip(configs, parts):
            key = json.dumps([OmegaConf.to_container(cfg.data, resolve=True), cfg.seed,
                              OmegaConf.to_container(cfg.model, resolve=True)], sort_keys=True)
            checks.setdefault(key, (part["data"], cfg.seed, part["model"]))
        track = parts[0]["tracking"]
        uri = tracking.resolve_uri(track.uri) if track.enabled else ""
        if uri:
            tracking.check_store(uri)
        store = tracking.NewStore(uri)  # a new store is made meanwhile, put in place if all is well
        if uri and pool.elsewhere:  # while a worker checks, this process imports MLflow: its parent run is next
            threading.Thread(target=tracking.preload, args=(uri,), daemon=True).start()
        try:
            problem = pool.check(list(checks.values()))
            if problem:
                raise ConfigError(problem)
            self._claim(Path(config.hydra.sweep.dir))
        except BaseException:
            store.discard()
            raise
        store.place()
        os.environ[TOTAL_ENV], os.environ[START_ENV] = str(len(jobs)) if basic else "", str(time.time())
        os.environ[SWEPT_ENV] = json.dumps(swept_keys(config))
        results_file(config).unlink(missing_ok=True)
        os.environ[RESULTS_ENV] = str(results_file(config).resolve())
        if not uri:
            return
        if basic:  # all is checked: a worker may write to the store (the store's creation is locked)
            # the job's own settings: Hydra's (its ${now:} among them) resolve only in a Hydra job
            pool.prepare(OmegaConf.masked_copy(configs[0], [k for k in configs[0] if k != "hydra"]), store.made)
        if pool.elsewhere:
            stand_back()
        client = tracking.client(uri)  # the database and experiment exist before any job starts
        exp_id = tracking.experiment_id(client, track.experiment, uri)
        parent = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={**tracking.context_tags(), "kind": "sweep",
                                         "jobs": str(len(jobs)) if basic else "?",
                                         "sweeper": config.hydra.sweeper.get("_target_", "?").rsplit(".", 1)[-1],
                                         "overrides": " ".join(config.hydra.overrides.task)})
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        self.client, self.parent = client, parent.info.run_id
        atexit.register(self._close_parent, "KILLED")  # interrupted (Ctrl-C): the parent is not left RUNNING
        if basic:
            log.info("sweep of %d jobs, parent run %s in %s", len(jobs), self.parent, uri)
        else:
            log.info("sweep by %s (each job is validated as it starts), parent run %s in %s",
                     config.hydra.sweeper.get("_target_"), self.parent, uri)

    @staticmethod
    def _check_optimiser(config: DictConfig, track) -> None:
        """A sweeper that optimises what the jobs return must maximise it, and read it from their runs."""
        direction = config.hydra.sweeper.get("direction")
        if direction is not None:
            names = [getattr(d, "name", d) for d in (direction if OmegaConf.is_list(direction) else [direction])]
            require(names == ["maximize"], "hydra.sweeper.direction", direction,
                    "maximize: a job returns one number, higher is better (its validation accuracy)")
        sweeper = config.hydra.sweeper.get("_target_", "?").rsplit(".", 1)[-1]
        require(track.enabled, "tracking", track.name,
                f"a tracking store (local or server) with {sweeper}: each job's objective is read from its run")

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
        parent, self.parent = self.parent, None
        try:
            if status == "KILLED":
                for run in self.client.search_runs(
                        [self.client.get_run(parent).info.experiment_id],
                        f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
                    self.client.set_tag(run.info.run_id, "error", "the sweep was interrupted")
                    self.client.set_terminated(run.info.run_id, "KILLED")
            self.client.set_terminated(parent, status)
        except Exception as e:  # the store is away: the next job that starts on it closes the run
            tracking.journal(self.client.tracking_uri, parent, "FAILED" if status == "FINISHED" else status,
                             f"the sweep could not close its run: {type(e).__name__}: {e}")

    def _results(self, config: DictConfig) -> list[dict[str, Any]]:
        """How the jobs ended: from the sweep's folder and, with a tracking server, from the parent run."""
        by_job = {r["job"]: r for r in read_results(results_file(config))}
        if self.parent and not tracking.sqlite_path(self.client.tracking_uri):
            import tempfile

            try:
                with tempfile.TemporaryDirectory() as tmp:
                    if self.client.list_artifacts(self.parent, PROGRESS):
                        folder = Path(self.client.download_artifacts(self.parent, PROGRESS, tmp))
                        by_job |= {r["job"]: r for r in (json.loads(p.read_text()) for p in folder.glob("*.json"))}
            except Exception as e:  # the server is away: what this machine saw (the report will fail anyway)
                log.warning("the jobs' endings could not be read from the sweep's run: %s", type(e).__name__)
        return [by_job[k] for k in sorted(by_job)]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import joblib_workers

        joblib_workers.stop()
        results = self._results(config)
        failed = [r for r in results if r["status"] == "FAILED"]
        if self.parent:
            from pipeline import report

            run_ids = [r["run_id"] for r in results if r.get("run_id")]  # skipped jobs: the runs reused
            out = Path(config.hydra.sweep.dir) / "report"
            try:
                self.client.log_text(self.parent, json.dumps(run_ids), "jobs.json")
                runs = report.runs_frame(self.client, run_ids)
                for path in report.write(self.client, run_ids, out, df=runs):
                    self.client.log_artifact(self.parent, str(path), "report")
                frontier = log_frontier(self.client, self.parent, runs)
                self.client.set_tag(self.parent, "mlflow.note.content", describe(config, len(results), frontier))
                log.info("report: %s", out)
            except Exception as e:  # raised, Hydra would only warn and exit 0
                self._close_parent("FAILED")  # without its report a sweep is never FINISHED
                print(f"error: the sweep's report could not be written ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); the jobs' runs are in the store", file=sys.stderr)
                sys.exit(1)
            self._close_parent("FAILED" if failed else "FINISHED")
        counts = {s: sum(r["status"] == s for r in results) for s in ("FINISHED", "SKIPPED", "FAILED")}
        log.info("sweep done: %d finished, %d skipped (already finished), %d failed", *counts.values())
        if failed:
            for r in failed:
                log.error("  failed: job %d %s: %s", r["job"] + 1, r["name"], r["error"])
            sys.exit(1)


def log_frontier(client, parent: str, runs) -> list[str]:
    """Per method, mean accuracy and FLOPs ratio (dense / shrunk or effective) as metric series on the
    parent run whose step is the measured sparsity in per mille: the parent's chart tab draws accuracy
    against sparsity, one line per method. Never one line over different settings: what differs between
    the runs (the report's groups) joins the method's name. Returns the series' names."""
    import re

    from mlflow.entities import Metric

    from pipeline import report

    table, keys = report.table(runs)
    label = table["method"].str.cat([table[k].astype(str) for k in keys], sep="_")
    table["label"] = label.map(lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_"))
    now = int(time.time() * 1000)
    metrics = [Metric(f"frontier/{row['label']}/{name}", float(row[column]), now, round(1000 * row["sparsity"]))
               for _, row in table.iterrows()
               for name, column in (("accuracy", "acc_finetuned"), ("flops_ratio", "flops_ratio"))
               if row[column] == row[column]]  # NaN: not logged by these runs
    for i in range(0, len(metrics), 500):
        client.log_batch(parent, metrics=metrics[i: i + 500])
    return sorted(set(table["label"]))


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
