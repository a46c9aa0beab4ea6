"""hydra/launcher=ray: each job of a sweep as one task on a Ray cluster (conf/hydra/launcher/ray.yaml).

Our own small launcher, not hydra-ray-launcher 1.2.2: that plugin requires cloudpickle < 3 (for its AWS
launcher only), which joblib 1.6 (cloudpickle >= 3, needed by scikit-learn and the joblib launcher) cannot
be installed with; and when joining a running cluster it passes object_store_memory, which Ray refuses.
It lives under hydra_plugins because Hydra instantiates launchers from that package only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def _job(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, singleton: dict,
         cwd: str) -> JobReturn:
    """One job inside a Ray worker: Hydra's state as the sweep had it, then Hydra's own run_job. It runs
    in the sweep's folder when this worker can see it (same machine or shared filesystem)."""
    from hydra.core.hydra_config import HydraConfig

    if os.path.isdir(cwd):
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton)
    HydraConfig.instance().set_config(config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class RayLauncher(Launcher):
    def __init__(self, init: DictConfig | None = None, remote: DictConfig | None = None) -> None:
        """init: ray.init's options (address null: RAY_ADDRESS, else a cluster started on this machine, else
        a new local one); remote: each task's options (num_cpus, num_gpus, memory, runtime_env, ...)."""
        self.init, self.remote = init, remote
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def _options(self) -> dict[str, Any]:
        """Each task's options, with what a job needs from its sweep (workers of a cluster started before
        it do not inherit the sweep's environment)."""
        from pipeline.sweep import SWEEP_ENV

        options = OmegaConf.to_container(self.remote, resolve=True) if self.remote else {}
        runtime_env = options.setdefault("runtime_env", {}) or {}
        # TensorFlow uses as many threads as the task has CPUs: two tasks on two cores do not fight
        threads = str(max(1, int(options.get("num_cpus") or 1)))
        runtime_env["env_vars"] = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads,
                                   **(runtime_env.get("env_vars") or {}),
                                   **{k: os.environ[k] for k in SWEEP_ENV if k in os.environ}}
        options["runtime_env"] = runtime_env
        return options

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            init = OmegaConf.to_container(self.init, resolve=True) if self.init else {}
            ray.init(**{k: v for k, v in init.items() if v is not None})
        task = ray.remote(_job).options(**self._options())
        log.info("Ray launcher: %d jobs on %s", len(job_overrides), ray.get_runtime_context().gcs_address)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = f"ray_{idx}"
                config.hydra.job.num = idx
            refs.append(task.remote(self.hydra_context, config, self.task_function, Singleton.get_state(),
                                    os.getcwd()))
        try:
            return ray.get(refs)
        except KeyboardInterrupt:  # Ctrl-C: the jobs stop too (their runs are marked KILLED by the sweep)
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
