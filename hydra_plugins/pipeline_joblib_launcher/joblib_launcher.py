"""hydra/launcher=workers (conf/hydra/launcher/workers.yaml): Hydra's joblib launcher, its options and its loky
workers, but each job runs from the config the sweep composed and validated (pipeline.launch), not composed
again in the worker. It lives under hydra_plugins because Hydra instantiates launchers from that package only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher import joblib_launcher
from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg

from pipeline import launch

log = logging.getLogger(__name__)


class JoblibLauncher(joblib_launcher.JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib import Parallel, delayed

        sweep_dir = launch.begin(self.config)
        options = {**self.joblib, "backend": "loky"}  # as Hydra's: its threading backend cannot run Hydra jobs
        process_joblib_cfg(options)
        log.info("Joblib.Parallel(%s) is launching %d jobs", ",".join(f"{k}={v}" for k, v in options.items()),
                 len(job_overrides))
        log.info("Launching jobs, sweep output dir : %s", sweep_dir)
        tasks = launch.jobs(job_overrides, initial_job_idx, self.config.hydra.job.name, log)
        state = launch.new_launch()
        return Parallel(**options)(delayed(launch.run)(task, state, self.hydra_context, self.config, self.task_function)
                                   for task in tasks)
