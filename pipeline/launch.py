"""What our launchers share (hydra/launcher=workers and ray, in hydra_plugins/): each job's config is composed
once, by the sweep's callback that validates it (compose), and sent to the worker that runs it (run).

Hydra's own joblib launcher composes every job again in its worker and restores Hydra's state there before
each job, which rescans Hydra's plugins: about 0.15 s of a worker's time per job, as long as some jobs'
training. Here a worker restores the state once per launch.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

_composed: dict[tuple[str, ...], DictConfig] = {}  # by the sweep's callback, until a launcher takes them
_restored: str | None = None  # in a worker: the launch whose Hydra state this process holds


def compose(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A job's config as Hydra's launchers compose it (the sweep's config with the job's overrides), kept for
    the launcher."""
    from hydra.core.global_hydra import GlobalHydra

    cfg = GlobalHydra.instance().hydra.config_loader.load_sweep_config(config, list(overrides))
    _composed[tuple(overrides)] = cfg
    return cfg


@contextlib.contextmanager
def shared_composition():
    """Meanwhile, Hydra composes the configuration of a choice of config groups once: jobs that choose the same
    groups (method=filter with each sparsity.target) start from a copy of it, then Hydra applies each one's
    value overrides and fills its hydra node as usual. A job's config is the one Hydra composes on its own
    (tests/test_sweep.py); composing from scratch took two thirds of a default sweep's 80 ms per job."""
    from hydra._internal import config_loader_impl as hydra_loader

    loader = hydra_loader.ConfigLoaderImpl
    create, compose_from = hydra_loader.create_defaults_list, loader._compose_config_from_defaults_list
    lists, composed = {}, {}

    def value_override(repo, override) -> bool:  # as Hydra's defaults_list.Overrides sorts them
        return isinstance(override.value(), dict) or not repo.group_exists(override.key_or_group)

    def create_defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing):
        groups = tuple(o.input_line for o in overrides_list if o.is_sweep_override() or not value_override(repo, o))
        key = (config_name, groups, prepend_hydra, skip_missing, tuple(src.path for src in repo.get_sources()))
        if key not in lists:
            lists[key] = create(repo=repo, config_name=config_name, overrides_list=overrides_list,
                                prepend_hydra=prepend_hydra, skip_missing=skip_missing)
            return lists[key]
        shared = copy.copy(lists[key])
        shared.config_overrides = [o for o in overrides_list if not o.is_sweep_override() and value_override(repo, o)]
        return shared

    def compose_config_from_defaults_list(self, defaults, repo):
        if id(defaults) not in composed:  # the defaults list is kept alive with it: its id stays its own
            composed[id(defaults)] = defaults, compose_from(self, defaults, repo)
        return copy.deepcopy(composed[id(defaults)][1])  # Hydra then changes its copy in place

    hydra_loader.create_defaults_list = create_defaults_list
    loader._compose_config_from_defaults_list = compose_config_from_defaults_list
    try:
        yield
    finally:
        hydra_loader.create_defaults_list, loader._compose_config_from_defaults_list = create, compose_from


def composed(overrides: Sequence[str]) -> bool:
    """Whether the sweep's callback composed (and validated) the job of these overrides, not launched yet."""
    return tuple(overrides) in _composed


def begin(config: DictConfig) -> Path:
    """What Hydra's launchers do first: Hydra's globals and logging, and the sweep's folder (returned)."""
    from hydra.core.utils import configure_log, setup_globals

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    folder = Path(str(config.hydra.sweep.dir))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def jobs(job_overrides: Sequence[Sequence[str]], initial_job_idx: int, prefix: str, log) -> list[dict[str, Any]]:
    """What a worker needs to run each job (job ids prefix_idx), each job's line logged as Hydra's launchers do."""
    from hydra.core.utils import filter_overrides

    tasks = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        tasks.append(job(overrides, idx, f"{prefix}_{idx}"))
    return tasks


def job(overrides: Sequence[str], idx: int, job_id: str) -> dict[str, Any]:
    """What a worker needs to run job `idx`: its config as the sweep composed it, numbered as Hydra numbers
    jobs, or else (another sweeper's job, known only now) its overrides, to be composed in the worker."""
    cfg = _composed.pop(tuple(overrides), None)
    return {"config": None if cfg is None else _numbered(cfg, job_id, idx), "overrides": list(overrides),
            "idx": idx, "job_id": job_id}


def _numbered(cfg: DictConfig, job_id: str, idx: int) -> DictConfig:
    with open_dict(cfg):
        cfg.hydra.job.id, cfg.hydra.job.num = job_id, idx
    return cfg


def new_launch() -> tuple[str, Any]:
    """A launch's id and Hydra's state as the sweep holds it, for its workers."""
    from hydra.core.singleton import Singleton

    return uuid.uuid4().hex, Singleton.get_state()


def run(task: dict[str, Any], launch: tuple[str, Any], hydra_context, master: DictConfig, task_function):
    """One job in this worker process: Hydra's state as the sweep had it (restored once per launch), the job's
    config, then Hydra's own run_job (whose callbacks give the job the sweep's environment)."""
    global _restored
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    setup_globals()
    launch_id, state = launch
    if _restored != launch_id:
        Singleton.set_state(state)
        _restored = launch_id
    config = task["config"]
    if config is None:  # another sweeper's job: composed here
        config = _numbered(hydra_context.config_loader.load_sweep_config(master, task["overrides"]),
                           task["job_id"], task["idx"])
    HydraConfig.instance().set_config(config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
