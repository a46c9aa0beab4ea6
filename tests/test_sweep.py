"""Sweeps: one baseline shared by the jobs, nested runs under one parent, the report, resume, failures."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import CONF, run_pipeline

SMOKE = ["training=smoke"]


def runs_by_kind(client):
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id])
    out = {}
    for r in runs:
        out.setdefault(r.data.tags.get("kind", "job"), []).append(r)
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("sweep")
    proc = run_pipeline(["-m", "method=magnitude,hybrid", "sparsity.target=0.3,0.6", *SMOKE], tmp)
    return tmp, MlflowClient(f"sqlite:///{tmp}/mlflow.db"), proc


def test_sweep_nests_jobs_under_one_parent_and_trains_one_baseline(sweep):
    tmp, client, proc = sweep
    kinds = runs_by_kind(client)
    assert len(kinds["sweep"]) == 1 and len(kinds["baseline"]) == 1 and len(kinds["job"]) == 4
    parent = kinds["sweep"][0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in kinds["job"]} == {parent.info.run_id}
    assert {r.info.run_name for r in kinds["job"]} == {"magnitude-0.30", "magnitude-0.60", "hybrid-0.30",
                                                       "hybrid-0.60"}
    assert len({r.data.tags["baseline_hash"] for r in kinds["job"]}) == 1
    assert sum(r.data.tags["baseline_trained_here"] == "true" for r in kinds["job"]) == 1
    assert "[job 4 of 4]" in proc.stderr + proc.stdout


def test_report_is_logged_on_the_parent(sweep):
    tmp, client, _ = sweep
    parent = runs_by_kind(client)["sweep"][0]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/results.csv", "report/results.md"} <= files
    assert any(f.endswith(".png") for f in files)
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "report/results.csv", str(tmp)))
    assert len(table) == 4
    assert set(table["method"]) == {"magnitude", "hybrid"}
    assert table["acc_finetuned"].between(0, 1).all()
    mag = table[table["method"] == "magnitude"].sort_values("target")
    assert mag["sparsity"].is_monotonic_increasing


def test_rerun_skips_every_finished_job_and_reports_the_runs_it_reused(sweep):
    tmp, client, _ = sweep
    before = len(runs_by_kind(client)["job"])
    stale = tmp / "multirun" / "report" / "accuracy_vs_sparsity_stale.png"
    stale.write_bytes(b"left by an earlier sweep")
    proc = run_pipeline(["-m", "method=magnitude,hybrid", "sparsity.target=0.3,0.6", *SMOKE], tmp)
    assert "4 skipped" in proc.stderr + proc.stdout
    assert len(runs_by_kind(client)["job"]) == before
    parent = max(runs_by_kind(client)["sweep"], key=lambda r: r.info.start_time).info.run_id
    files = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/results.md" in files and "report/accuracy_vs_sparsity_stale.png" not in files
    assert not stale.exists()
    from pipeline import report

    assert len(report.runs_frame(client, parent=parent)) == 4  # python -m pipeline.report --parent


def test_failing_job_is_failed_and_the_others_finish(tmp_path, client_for):
    # The second ratios map names a layer that does not exist: that job fails when it prunes.
    args = ["-m", "method=filter", "method.ratios={conv1:0.5},{nope:0.5}", "sparsity.target=0.5", *SMOKE]
    proc = run_pipeline(args, tmp_path, check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "1 failed" in out and "nope" in out
    jobs = runs_by_kind(client_for(tmp_path))["job"]
    status = sorted(r.info.status for r in jobs)
    assert status == ["FAILED", "FINISHED"]
    failed = next(r for r in jobs if r.info.status == "FAILED")
    assert "nope" in failed.data.tags["error"]
    lines = [json.loads(x) for x in next(tmp_path.glob("multirun/jobs.jsonl")).read_text().splitlines()]
    assert sorted(x["status"] for x in lines) == ["FAILED", "FINISHED"]


def test_the_mlflow_view_needs_no_clicking(sweep):
    """Runs carry MLflow's context and a Logged model; the parent carries a description and the frontier
    as metric series whose step is the measured sparsity in per mille; params carry no noise."""
    import mlflow

    tmp, client, _ = sweep
    kinds = runs_by_kind(client)
    exp = client.get_experiment_by_name("pruning")
    assert "parent run" in exp.tags["mlflow.note.content"]
    parent = min(kinds["sweep"], key=lambda r: r.info.start_time)
    assert "Sweep of 4 jobs" in parent.data.tags["mlflow.note.content"]
    for method in ("magnitude", "hybrid"):
        history = client.get_metric_history(parent.info.run_id, f"frontier/{method}/accuracy")
        jobs = sorted((r for r in kinds["job"] if r.data.params["method.name"] == method),
                      key=lambda r: r.data.metrics["eval/sparsity"])
        assert [h.step for h in sorted(history, key=lambda h: h.step)] == [
            round(1000 * r.data.metrics["eval/sparsity"]) for r in jobs]
        assert client.get_metric_history(parent.info.run_id, f"frontier/{method}/flops_ratio")
    job = kinds["job"][0]
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.git.commit"} <= set(job.data.tags)
    assert not any(k.endswith("_target_") for k in job.data.params)
    assert "None" not in job.data.params.values()
    (output,) = job.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == job.info.run_id and model.experiment_id == exp.experiment_id
    assert {"eval/accuracy", "eval/sparsity", "baseline/accuracy"} <= {m.key for m in model.metrics}  # its page too
    mlflow.set_tracking_uri(client.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{output.model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 8, 8, 1)
    assert "tensorflow" in info.flavors
    (dataset_input,) = job.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest) == ("digits", job.data.tags["data_digest"])
    assert "load_digits" in dataset.source
    assert json.loads(dataset.profile)["test"] == 360


def test_a_launcher_runs_each_job_from_the_config_the_sweep_composed():
    """hydra/launcher=workers and ray send each job the config the sweep's callback composed and validated (a
    worker would compose it again: about 0.1 s); a job the sweep did not compose (another sweeper's) is composed
    by its worker."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from pipeline import launch

    with initialize_config_dir(CONF, version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        composed = launch.compose(master, ["method=filter", "sparsity.target=0.3"])
    task = launch.job(["method=filter", "sparsity.target=0.3"], 5, "workers_5")
    assert task["config"] is composed
    assert (composed.method.name, composed.sparsity.target, composed.hydra.job.num) == ("filter", 0.3, 5)
    assert launch.job(["method=filter", "sparsity.target=0.3"], 6, "workers_6")["config"] is None  # taken once
    assert launch.job(["method=slim"], 7, "workers_7") == {"config": None, "overrides": ["method=slim"], "idx": 7,
                                                           "job_id": "workers_7"}


def test_the_grid_sweeper_composes_once_what_the_sweep_composed():
    """hydra/sweeper=grid (the default; an experiment may choose another) checks that a batch composes, as
    Hydra's basic sweeper does, but not the jobs the sweep's callback composed and validated already."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra_plugins.pipeline_grid_sweeper.grid_sweeper import BasicSweeper
    from pipeline import launch

    with initialize_config_dir(CONF, version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        assert master.hydra.sweeper._target_.endswith("pipeline_grid_sweeper.grid_sweeper.BasicSweeper")
        assert compose("config", ["experiment=optuna_filter"], return_hydra_config=True).hydra.sweeper._target_ \
            .endswith("OptunaSweeper")
        loader = GlobalHydra.instance().config_loader()
        sweeper = BasicSweeper(max_batch_size=None, params=None)
        sweeper.config, sweeper.hydra_context = master, type("Context", (), {"config_loader": loader})()
        composed = []
        launch.compose(master, ["method=filter"])
        real = loader.load_sweep_config
        loader.load_sweep_config = lambda master_config, sweep_overrides: (composed.append(sweep_overrides),
                                                                           real(master_config, sweep_overrides))
        try:
            sweeper.validate_batch_is_legal([["method=filter"], ["method=slim"]])
            with pytest.raises(Exception, match="nonexistent"):
                sweeper.validate_batch_is_legal([["method=nonexistent"]])
        finally:
            del loader.load_sweep_config
    launch.job(["method=filter"], 0, "grid_0")
    assert composed == [["method=slim"], ["method=nonexistent"]]


def test_shared_composition_gives_each_job_the_config_hydra_composes_alone(monkeypatch):
    """launch.shared_composition composes each choice of config groups once: every job's config (values, hydra
    node, choices) is still the one Hydra composes for it from scratch, whatever the overrides' kinds and order."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra._internal import config_loader_impl
    from omegaconf import OmegaConf

    from pipeline import launch

    jobs = [["method=filter", "sparsity.target=0.3"], ["sparsity.target=0.5", "method=filter"],
            ["method=filter", "sparsity.target=0.7", "training.finetune.epochs=2"], ["method=slim", "seed=3"],
            ["model=vgg_bn", "method=slim", "seed=3"], ["method=slim", "+training.extra=1", "seed=4"],
            ["experiment=optuna_filter", "sparsity.target=0.2"], ["method=magnitude", "sparsity=gradual"]]
    loader = config_loader_impl.ConfigLoaderImpl
    real, made = loader._compose_config_from_defaults_list, []
    monkeypatch.setattr(loader, "_compose_config_from_defaults_list",
                        lambda self, defaults, repo: made.append(1) or real(self, defaults, repo))
    with initialize_config_dir(CONF, version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        alone = [OmegaConf.to_yaml(launch.compose(master, job)) for job in jobs]
        made.clear()
        with launch.shared_composition():
            shared = [OmegaConf.to_yaml(launch.compose(master, job)) for job in jobs * 2]
        launch._composed.clear()
    assert shared == alone * 2
    assert len(made) == 5  # filter, slim, vgg_bn with slim, the experiment, gradual magnitude
    assert "target: 0.5" in alone[1] and "extra: 1" in alone[5] and "epochs: 2" in alone[2]


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked from a preloaded process on Linux only")
def test_workers_are_forked_from_one_process_that_imported_tensorflow():
    """hydra/launcher=workers: TensorFlow is imported once, in the process the workers are forked from, and every
    worker (however joblib hands out the first tasks) imports the tracking modules by itself and has loky's
    collection after each task turned off."""
    script = textwrap.dedent(f"""
        import json, os, sys, threading, time
        from hydra import compose, initialize_config_dir
        from joblib import delayed
        from pipeline import joblib_workers

        def probe():
            from joblib.externals.loky import process_executor
            time.sleep(1)  # each worker takes one
            for thread in threading.enumerate():
                if thread.name == "pipeline-imports":
                    thread.join(60)
            return {{"pid": os.getpid(), "parent": os.getppid(), "tensorflow": "tensorflow" in sys.modules,
                     "tracking": all(m in sys.modules for m in joblib_workers.PRELOAD_TRACKING),
                     "delay": process_executor._MEMORY_LEAK_CHECK_DELAY}}

        with initialize_config_dir({str(CONF)!r}, version_base="1.3"):
            cfg = compose("config", ["hydra/launcher=workers", "hydra.launcher.n_jobs=2"], return_hydra_config=True)
        joblib_workers.JoblibWorkers(cfg, 2)
        workers = joblib_workers._parallel(cfg)([delayed(probe)() for _ in range(2)])
        joblib_workers.stop()
        print(json.dumps({{"main": os.getpid(), "workers": workers}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    workers = out["workers"]
    assert len({w["pid"] for w in workers}) == 2
    assert len({w["parent"] for w in workers}) == 1 and workers[0]["parent"] != out["main"]  # the forkserver
    assert all(w["tensorflow"] and w["tracking"] and w["delay"] >= 600 for w in workers), workers
