"""hydra/launcher=ray: the jobs of a sweep on a Ray cluster (conf/hydra/launcher/ray.yaml).

One Ray actor per worker slot of the cluster (a slot: the resources one job asks for, hydra.launcher.remote);
each actor runs its jobs one after another in its own process, as Hydra's basic launcher does in the
sweep's, so TensorFlow is imported once per worker, not once per job, and the next job goes to whichever
worker is free first. The workers start with the sweep (StartWorkers, a callback before the sweep's own), so
they import what the jobs need while the sweep validates its jobs.

Our own small launcher, not hydra-ray-launcher 1.2.2: that plugin requires cloudpickle < 3 (for its AWS
launcher only), which joblib 1.6 (cloudpickle >= 3, needed by scikit-learn and the joblib launcher) cannot
be installed with; and when joining a running cluster it passes object_store_memory, which Ray refuses.
It lives under hydra_plugins because Hydra instantiates launchers from that package only.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from pipeline import launch
from pipeline.config import ConfigError, exit_config_error
from pipeline.sweep import Workers

log = logging.getLogger(__name__)
# A job's options (hydra.launcher.remote) -> the cluster resource each one takes
RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
# the sweep's TensorFlow settings (pipeline/__init__.py), for its workers
TF_ENV = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE")
_started: dict[str, Any] = {}  # the workers started by StartWorkers, for the launcher Hydra creates after it


class Worker:
    """One worker process of the sweep (a Ray actor): TensorFlow's settings before it starts, the modules
    the jobs need imported, then jobs one after another."""

    def __init__(self, env: dict[str, str], preload: Sequence[str]) -> None:
        os.environ.update(env)  # workers of a cluster started before the sweep do not inherit its environment
        started = time.time()
        for module in preload:
            importlib.import_module(module)
        self.ready = {"pid": os.getpid(), "host": os.uname().nodename, "preload_s": round(time.time() - started, 1)}

    def info(self) -> dict[str, Any]:
        return self.ready

    def check(self, checks: list[tuple]) -> str | None:
        """The sweep's check that its data sets load and its models fit them (pipeline.sweep.Workers)."""
        from pipeline.sweep import first_problem

        return first_problem(checks)

    def prepare(self, cfg: DictConfig, new_store: bool, cwd: str) -> None:
        """The first job's baseline, found or trained before the jobs start (pipeline.sweep.Workers), from the
        sweep's folder as the jobs run (a relative tracking.uri)."""
        from pipeline.run import prepare_baseline

        if os.path.isdir(cwd):
            os.chdir(cwd)
        prepare_baseline(cfg, new_store)

    def run(self, task: dict, state: tuple, hydra_context: HydraContext, master: DictConfig,
            task_function: TaskFunction, cwd: str) -> JobReturn:
        """One job (pipeline.launch.run), in the sweep's folder when this worker can see it (same machine or
        shared filesystem)."""
        if os.path.isdir(cwd):
            os.chdir(cwd)
        return launch.run(task, state, hydra_context, master, task_function)


class RayLauncher(Launcher):
    def __init__(self, init: DictConfig | None = None, remote: DictConfig | None = None,
                 workers: int | None = None, preload: Sequence[str] = ()) -> None:
        """init: ray.init's options (address null: RAY_ADDRESS, else a cluster started on this machine, else
        a new local one); remote: each worker's options (num_cpus, num_gpus, memory, resources, runtime_env);
        workers: how many (null: as many as the cluster has room for, at most one per job); preload: the
        modules each worker imports as it starts."""
        self.init, self.remote, self.workers, self.preload = init, remote, workers, list(preload or ())
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None
        self.pool: list = []  # the workers, kept for the sweep's next batch (e.g. Optuna's)
        self.connect_s = 0.0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def _options(self) -> dict[str, Any]:
        """Each worker's Ray options."""
        return OmegaConf.to_container(self.remote, resolve=True) if self.remote else {}

    def _env(self) -> dict[str, str]:
        """A worker's environment: TensorFlow as many threads as the worker has CPUs (two workers on two
        cores do not fight), and the sweep's TF settings."""
        threads = str(max(1, math.floor(self._options().get("num_cpus") or 1)))
        return {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads,
                **{k: os.environ[k] for k in TF_ENV if k in os.environ}}

    def _size(self, jobs: int | None, total: dict[str, float]) -> int:
        """Workers: as set, else as many as the cluster's resources hold (one CPU each unless said)."""
        cap = [jobs] if jobs else []
        if self.workers:
            return min([int(self.workers), *cap])
        options = self._options()
        asked = {"CPU": 1, **{RESOURCES[k]: v for k, v in options.items() if k in RESOURCES},
                 **(options.get("resources") or {})}
        return max(1, min([*cap, *(math.floor(total.get(r, 0) / v) for r, v in asked.items() if v)]))

    def start(self, jobs: int | None) -> dict[str, Any]:
        """Connect to the cluster (or start one) and start the workers (they warm up in the background)."""
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # Ray would fold the jobs' progress lines into one
        import ray

        started = time.time()
        if not ray.is_initialized():
            init = OmegaConf.to_container(self.init, resolve=True) if self.init else {}
            address = init.get("address") or os.environ.get("RAY_ADDRESS")
            _check_reachable(address)
            try:
                ray.init(**{"logging_level": logging.WARNING, **{k: v for k, v in init.items() if v is not None}})
            except ConnectionError as e:  # e.g. the head wants an auth token this process lacks
                raise ConfigError(f"hydra/launcher=ray: cannot join the Ray cluster at {address}: {e}") from None
        actor = ray.remote(Worker).options(**self._options())
        pool = [actor.remote(self._env(), self.preload) for _ in range(self._size(jobs, ray.cluster_resources()))]
        return {"pool": pool, "connect_s": time.time() - started}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        launch.begin(self.config)
        if not self.pool:
            started = _started.copy() or self.start(len(job_overrides))
            _started.clear()
            self.pool, self.connect_s = started["pool"], started["connect_s"]
        import ray
        from ray.util.actor_pool import ActorPool

        log.info("Ray launcher: %d jobs on %d workers on %s (connected in %.1fs)", len(job_overrides), len(self.pool),
                 ray.get_runtime_context().gcs_address, self.connect_s)
        jobs = launch.jobs(job_overrides, initial_job_idx, "ray", log)
        state, cwd = launch.new_launch(), os.getcwd()
        run = lambda actor, task: actor.run.remote(task, state, self.hydra_context, self.config,  # noqa: E731
                                                   self.task_function, cwd)
        try:
            ready = [actor.info.remote() for actor in self.pool]  # each answers before its first job starts
            # unordered: a worker takes the next job as soon as its own ends (in order, it would wait for the
            # jobs before it to end too)
            results = ActorPool(self.pool).map_unordered(run, jobs)
            log.info("Ray launcher: workers ready: %s", ", ".join(
                f"pid {w['pid']} on {w['host']} (preloaded in {w['preload_s']}s)" for w in ray.get(ready)))
            return sorted(results, key=lambda r: r.hydra_cfg.hydra.job.num)  # in the jobs' order, as Hydra's
        except KeyboardInterrupt:  # Ctrl-C: the jobs stop too (their runs are marked KILLED by the sweep)
            for actor in self.pool:
                ray.kill(actor)
            raise


def _check_reachable(address: str | None) -> None:
    """A cluster named as host:port answers there, or one line says so at once (Ray itself retries for a
    minute and more, then raises)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"hydra/launcher=ray: no Ray cluster answers at {address} (RAY_ADDRESS or "
                          f"hydra.launcher.init.address): {e}; start one (ray start --head) or unset the address "
                          "to start a local one") from None


class RayWorkers(Workers):
    """The sweep's checks and its first baseline on `worker`; the checks here should the worker be gone (the
    launcher then says why)."""

    elsewhere = True

    def __init__(self, worker) -> None:
        self.worker = worker

    def check(self, checks: list[tuple]) -> str | None:
        import ray

        try:
            return ray.get(self.worker.check.remote(checks))
        except ray.exceptions.RayError as e:
            log.debug("data and models checked in the sweep's process: the worker failed (%s)", type(e).__name__)
            return super().check(checks)

    def prepare(self, cfg: DictConfig, new_store: bool) -> None:
        self.worker.prepare.remote(cfg, new_store, os.getcwd())  # its next call waits for it; failing, a job trains it


class StartWorkers(Callback):
    """hydra.callbacks.ray_workers (set by hydra/launcher=ray, before the sweep's own callback): the workers
    start as the sweep does and import what the jobs need while the sweep validates them (Hydra creates
    the launcher only after the callbacks' start); should it fail, the launcher tries again and says why.
    They stop when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        from pipeline import sweep

        try:
            jobs = len(sweep.job_overrides(config)) if sweep.is_basic_sweeper(config) else None
            _started.update(instantiate(config.hydra.launcher).start(jobs))
        except ConfigError as e:  # no cluster to join: one line, before the sweep writes anything
            exit_config_error(e)
        except Exception as e:  # a wrong override is the sweep's callback's to report, in one line
            log.debug("Ray workers not started early: %s", e)
            return
        sweep.workers = RayWorkers(_started["pool"][0])  # it imports TensorFlow anyway: the sweep need not

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import ray

        from pipeline import sweep

        sweep.workers = None
        ray.shutdown()  # the workers end now (at the interpreter's exit it takes seconds longer)
