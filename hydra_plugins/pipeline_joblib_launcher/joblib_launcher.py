"""hydra/launcher=workers (conf/hydra/launcher/workers.yaml): Hydra's joblib launcher, its options and its loky
workers, but each job runs from the config the sweep composed and validated (pipeline.launch), not composed
again in the worker. It lives under hydra_plugins because Hydra instantiates launchers from that package only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher import joblib_launcher
from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg

from pipeline import launch

log = logging.getLogger(__name__)


class JoblibLauncher(joblib_launcher.JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib import Parallel, delayed

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        options = {**self.joblib, "backend": "loky"}  # as Hydra's: its threading backend cannot run Hydra jobs
        process_joblib_cfg(options)
        log.info("Joblib.Parallel(%s) is launching %d jobs", ",".join(f"{k}={v}" for k, v in options.items()),
                 len(job_overrides))
        log.info("Launching jobs, sweep output dir : %s", sweep_dir)
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        name, state = self.config.hydra.job.name, launch.new_launch()
        tasks = (launch.job(overrides, idx, f"{name}_{idx}") for idx, overrides in enumerate(job_overrides,
                                                                                             start=initial_job_idx))
        return Parallel(**options)(delayed(launch.run)(task, state, self.hydra_context, self.config, self.task_function)
                                   for task in tasks)
