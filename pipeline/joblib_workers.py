"""hydra/launcher=workers's (and Hydra's joblib launcher's) workers, started with the sweep rather than when the
launcher launches its jobs.

Hydra's joblib launcher runs the jobs through joblib's Parallel, which reuses loky's process-wide executor
when it is asked for one with the same options. The sweep's callback makes that executor first, from the
launcher's own config, and has each worker import what a job needs (TensorFlow above all: seconds; on
Linux once, in the process the workers are forked from) while the sweep's process validates the jobs; the
check that the data sets load and the models fit them runs in one of these workers, so the sweep's process
never imports TensorFlow. Workers read their environment when they start: the thread counts are set before;
what the sweep sets later reaches each job by the sweep's callback (SweepCallback.on_job_start).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading

from omegaconf import DictConfig, OmegaConf

from pipeline.sweep import Workers, first_problem

log = logging.getLogger("pipeline")
_tasks: list[threading.Thread] = []  # the background calls of this process's workers (warm-up, baseline)
PRELOAD = ("tensorflow", "pipeline.run")  # what checking a sweep and training a baseline need (as forkserver.py)
PRELOAD_TRACKING = ("mlflow.keras", "mlflow.store.tracking.sqlalchemy_store")  # what every job needs besides


def is_joblib(config: DictConfig) -> bool:
    return str(config.hydra.launcher.get("_target_", "")).endswith("JoblibLauncher")


def divide_threads(config: DictConfig, jobs: int | None) -> None:
    """The cores are divided among the workers: each worker's TensorFlow and BLAS get cores // workers threads
    (these variables, unless already set, are read when TensorFlow and numpy start in the worker), so parallel
    jobs do not oversubscribe the machine. joblib sets the BLAS ones in the environment its loky workers start
    with; workers forked from a preloaded process (preload_workers) inherit that process's instead."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = int(config.hydra.launcher.get("n_jobs") or -1)  # joblib's: -1 all cores, -2 all but one, ...
    workers = max(1, min(n_jobs if n_jobs > 0 else cores + 1 + n_jobs, jobs or cores))
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(max(1, cores // workers)))


def preload_workers() -> None:
    """On Linux, the workers are forked from one process that imported what checking the sweep and training a
    baseline need (multiprocessing's forkserver, started with the first worker; it imports pipeline/forkserver.py):
    TensorFlow is imported once a sweep, not once a worker, and the first worker checks the sweep and trains
    its baseline as soon as it starts, while each worker imports MLflow at low priority (forked)."""
    if sys.platform != "linux":
        return
    import multiprocessing

    from joblib.externals.loky.backend import context

    multiprocessing.set_forkserver_preload(["pipeline.forkserver"])
    context.set_start_method("forkserver", force=True)


def forked() -> None:
    """In each worker as it is forked from the preloaded process: the tracking modules are imported in a thread
    at nice 10 (this thread's nice value only; the jobs' TensorFlow threads run at the worker's own)."""
    settle()
    threading.Thread(target=_import, args=(PRELOAD_TRACKING, 10), name="pipeline-imports", daemon=True).start()


def settle() -> None:
    """Without psutil, loky runs a full collection after any task that ends a second after the last one: after
    every job, 0.15-0.3 s each, scanning what the jobs keep (compiled loops, the tracking store's tables).
    Python's own collector still runs as usual; loky's, once in ten minutes."""
    from joblib.externals.loky import process_executor

    process_executor._MEMORY_LEAK_CHECK_DELAY = max(process_executor._MEMORY_LEAK_CHECK_DELAY, 600.0)


def _import(modules: tuple[str, ...], nice: int = 0) -> None:
    os.nice(nice)
    for module in modules:
        importlib.import_module(module)
    gc.freeze()  # the half million objects of these modules live as long as the worker: out of the collector's scans


def _parallel(config: DictConfig):
    """A Parallel with the options Hydra's joblib launcher gives its own: the same executor."""
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel

    options = {k: v for k, v in OmegaConf.to_container(config.hydra.launcher, resolve=True).items() if k != "_target_"}
    options["backend"] = "loky"  # as the launcher sets it
    process_joblib_cfg(options)
    return Parallel(**options)


def _warm() -> None:
    """A worker's first task, which starts it with the sweep: where workers are not forked from a preloaded
    process (preload_workers), it imports what a job needs here."""
    if sys.platform != "linux":
        _import(PRELOAD + PRELOAD_TRACKING)
        settle()


def _prepare(cfg: DictConfig, new_store: bool) -> None:
    from pipeline.run import prepare_baseline  # imported in the worker: the sweep's process runs it as __main__

    prepare_baseline(cfg, new_store)


class JoblibWorkers(Workers):
    """The joblib launcher's workers, started at once; each imports what a job needs in the background (those
    that will get a job, of `jobs` if known)."""

    elsewhere = True

    def __init__(self, config: DictConfig, jobs: int | None):
        from joblib import delayed, effective_n_jobs

        divide_threads(config, jobs)  # before any worker starts
        preload_workers()
        self.config = config
        parallel = _parallel(config)
        workers = effective_n_jobs(parallel.n_jobs)
        self._background(parallel, [delayed(_warm)() for _ in range(min(workers, jobs or workers))], "warmed")

    @staticmethod
    def _background(parallel, tasks: list, what: str) -> None:
        def run() -> None:
            try:
                parallel(tasks)
            except (Exception, KeyboardInterrupt) as e:  # stopped (a rejected sweep, a Ctrl-C reaching the workers)
                # or broken: the jobs, or the sweep's own handling of Ctrl-C, will say why
                log.debug("joblib workers not %s: %s", what, e)

        _tasks.append(threading.Thread(target=run, name=f"joblib-{what}", daemon=True))
        _tasks[-1].start()

    def check(self, checks: list[tuple]) -> str | None:
        """In a worker, once one is ready."""
        from joblib import delayed

        return _parallel(self.config)([delayed(first_problem)(checks)])[0]

    def prepare(self, cfg: DictConfig, new_store: bool) -> None:
        from joblib import delayed

        self._background(_parallel(self.config), [delayed(_prepare)(cfg, new_store)], "preparing the baseline")


def stop() -> None:
    """Stop the workers once their background calls are done (killing them mid-call races joblib's cleanup of
    its temporary folders, whose tracker then prints a traceback): kept for reuse, idle workers would
    otherwise each tear TensorFlow down at the sweep's exit while it waits (seconds)."""
    from joblib.externals.loky import reusable_executor

    while _tasks:
        _tasks.pop().join()
    if reusable_executor._executor is not None:  # loky's process-wide executor, which joblib reuses
        reusable_executor._executor.shutdown(wait=True, kill_workers=True)
        # Its queues' semaphores sit in reference cycles: freed now, while loky's resource tracker still listens.
        # Left to the interpreter's exit, they are freed after the tracker stopped, which then warns of leaks.
        gc.collect()
