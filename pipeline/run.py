"""python -m pipeline.run: one job = train -> prune -> fine-tune -> evaluate in one MLflow run.

This module only wires the stages together and owns the run's lifecycle.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import sweep, tracking
from pipeline.config import (
    ConfigError,
    config_hash,
    exit_config_error,
    identity,
    job_config,
    run_name,
    validate,
)
from pipeline.models import check_fits

log = logging.getLogger("pipeline")


def run_job(cfg: DictConfig, parts: dict, data) -> dict[str, float]:
    import pandas as pd

    from pipeline import baseline
    from pipeline.pruning import accounting
    from pipeline.pruning.masks import save_masks
    from pipeline.pruning.surgery import shrink
    from pipeline.stages.evaluate import evaluate, test_metrics
    from pipeline.stages.finetune import finetune
    from pipeline.stages.prune import prune
    from pipeline.stages.train import configure

    method, schedule, training, track = (parts[k] for k in ("method", "sparsity", "training", "tracking"))
    baseline.seed_everything(cfg.seed, training.deterministic)
    configure(training)  # precision and XLA, before any model is built
    conf = job_config(cfg)
    ident = identity(cfg.seed, parts, data.digest)
    chash, name = config_hash(ident), run_name(method.name, schedule.target)
    store = tracking.Store(track)
    client, exp_id = store.client, store.exp_id
    if client:
        tracking.close_journaled(client)
        tracking.close_abandoned(client, exp_id, chash)
    if client and track.skip_finished:
        previous = tracking.finished_run(client, exp_id, chash)
        if previous is not None:
            log.info("%s skipped: the same job (config, code %s, data %s, seed %d) FINISHED as run %s (%s); "
                     "tracking.skip_finished=false runs it again", name, ident["code_version"], data.digest,
                     cfg.seed, previous.info.run_id, previous.info.run_name)
            return {"skipped": 1.0, "run_id": previous.info.run_id}

    tags = {"method": method.name, "config_hash": chash, "code_version": ident["code_version"],
            "data_digest": data.digest, **tracking.device_tags()}
    if data.warnings:
        tags["data_warnings"] = "; ".join(data.warnings)
    tags.update(parts["model"].tags())  # e.g. model.safe_mode=false
    started = time.perf_counter()
    with tracking.Run(client, exp_id, name, tags) as run:
        run.params(tracking.params_of(conf))
        run.dataset(data)
        run.text(OmegaConf.to_yaml(conf), "config.yaml")
        model, bhash, trained = baseline.for_job(conf, parts, data, store)
        run.tag("baseline_hash", bhash)
        run.tag("baseline_trained_here", str(trained).lower())
        # From here on, the same random numbers whether the baseline was trained here or loaded.
        baseline.seed_everything(cfg.seed, training.deterministic)
        dense_weights = model.get_weights()
        run.metrics(baseline.test_metrics(model, dense_weights, data, bhash), prefix="baseline/")

        method.bind(data)  # for criteria that score on a training batch (channel, importance=taylor)
        masked = prune(model, method, schedule.initial, cfg.seed)
        run.metrics(test_metrics(model, data) | {"sparsity": accounting.summary(model)["sparsity"]},
                    prefix="pruned/")
        history = finetune(masked, data, training.finetune, method, schedule, cfg.seed,
                           bn_recalibration=training.bn_recalibration)
        run.history("finetune", history)
        masked.detach()
        small, kept = shrink(model)
        metrics = evaluate(model, data, dense_weights=dense_weights, small_model=small if kept else None,
                           latency=parts["eval"].latency)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_masks(masked.masks, tmp / "masks.npz")
            run.artifact(tmp / "masks.npz")
            pd.DataFrame(accounting.layer_rows(model)).to_csv(tmp / "layers.csv", index=False)
            run.artifact(tmp / "layers.csv")
            model.save(tmp / "model.keras")
            run.artifact(tmp / "model.keras", "model")  # the file pipeline.verify checks
            run.keras_model(model, data.sample(2))
            if kept:
                small.save(tmp / "shrunk.keras")
                run.artifact(tmp / "shrunk.keras", "model")
                run.text("\n".join(f"{k}: {v}" for k, v in kept.items()), "channels_kept.txt")
        # after the Logged model: its metrics too (tracking.Run.keras_model)
        run.metrics({**{f"eval/{k}": v for k, v in metrics.items()}, **accounting.layer_sparsity(model),
                     "time/job_seconds": time.perf_counter() - started,
                     "time/finetune_seconds": sum(history["seconds"])})
        log.info("%s: baseline %.4f -> pruned %.4f -> fine-tuned %.4f at sparsity %.3f (run %s)", name,
                 run.logged.get("baseline/accuracy", float("nan")), run.logged.get("pruned/accuracy", 0),
                 metrics["accuracy"], metrics["sparsity"], run.id)
        return {"run_id": run.id, **metrics}


def prepare_baseline(cfg: DictConfig, new_store: bool = False) -> None:
    """Find or train the baseline of the job of this config, as run_job would (same seed, same store and
    cache), unless that job FINISHED already and will be skipped: a sweep's worker starts on it while the
    sweep is still starting, so that its jobs find it ready. A store the sweep has just made (`new_store`) holds
    no run: it is opened only to log the baseline, after training it."""
    from pipeline import baseline
    from pipeline.stages.train import configure

    parts = validate(cfg)
    data = parts["data"].load(cfg.seed)
    training, track = parts["training"], parts["tracking"]
    baseline.seed_everything(cfg.seed, training.deterministic)
    configure(training)
    store = tracking.Store(track)
    if not new_store and store.client and track.skip_finished:
        chash = config_hash(identity(cfg.seed, parts, data.digest))
        if tracking.finished_run(store.client, store.exp_id, chash) is not None:
            return
    baseline.for_job(job_config(cfg), parts, data, store)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One job. Returns its objective, the number a sweeper such as Optuna maximises (sweep.objective: the
    validation accuracy, or minus the excess over hydra.callbacks.sweep.flops_budget), read from the job's
    run: the one it made or, when skipped as already FINISHED, the one it reuses (NaN with tracking off).
    In a sweep a failed job returns -inf, and the sweep goes on."""
    if not sweep.in_multirun():
        try:
            parts = validate(cfg)
            data = parts["data"].load(cfg.seed)
            check_fits(parts["model"], data.input_shape, data.num_classes)
            if parts["tracking"].enabled:
                tracking.check_store(tracking.resolve_uri(parts["tracking"].uri))
        except ConfigError as e:
            exit_config_error(e)  # here, not in cli(): Hydra would print a job error line first
        return job_objective(run_job(cfg, parts, data), parts["tracking"])
    job = sweep.Job(cfg)
    try:  # with the basic sweeper, the sweep's callback validated every job's config and data before any started
        parts = validate(cfg)
        data = parts["data"].load(cfg.seed)
        if not job.validated:  # another sweeper's job: known only now
            check_fits(parts["model"], data.input_shape, data.num_classes)
        result = run_job(cfg, parts, data)
        value = job_objective(result, parts["tracking"])
    except Exception as e:  # one failing job never stops the sweep; its run (if it had one) is already FAILED
        job.failed(e)
        return sweep.FAILED_OBJECTIVE
    job.finished(result, value)
    return value


def job_objective(result: dict, track) -> float:
    """sweep.objective from the metrics of the job's run as the store holds them (the same for a run made
    now and for one reused); NaN when tracking is off (no run to read; an optimising sweep requires one)."""
    if not result.get("run_id"):
        return float("nan")
    metrics = tracking.Store(track).client.get_run(result["run_id"]).data.metrics
    return sweep.objective(metrics, sweep.flops_budget())


def cli() -> None:
    """Configuration mistakes end with one line and exit status 2; nothing is written before."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let the errors reach us instead of Hydra's printer
    started = time.time()
    try:
        main()
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        exit_config_error(e)
    except KeyboardInterrupt:  # runs are already marked KILLED
        print("interrupted: unfinished runs are marked KILLED; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not store_failed(e):
            raise
        print(f"error: the tracking store failed: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        sys.exit(1)  # the run's ending is journaled
    finally:
        gc.freeze()  # the interpreter's exit then skips its collections over every object (about a second)
    log.debug("done in %.1fs", time.time() - started)


def store_failed(error: Exception) -> bool:
    """The tracking store stopped answering (an MlflowException). MLflow is imported only once a job or sweep
    uses it: importing it up front took two seconds before a sweep could start its workers."""
    errors = sys.modules.get("mlflow.exceptions")
    return errors is not None and isinstance(error, errors.MlflowException)


if __name__ == "__main__":
    cli()
