"""Any sweeper: an Optuna search (the optional extra `optuna`) keeps the parent run, the report and the
validation of every job (as it starts), and maximises what pipeline.run returns (sweep.objective)."""

import json
import math

import pytest
from conftest import run_pipeline

from pipeline import sweep


def have_optuna_sweeper() -> bool:
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        return False
    return True


needs_optuna = pytest.mark.skipif(not have_optuna_sweeper(), reason="hydra-optuna-sweeper is not installed: it is the "
                                  "optional extra `optuna` (pip install -e '.[optuna]')")
SEARCH = ["-m", "experiment=optuna_filter", "hydra.sweeper.n_trials=3", "training=smoke"]


def test_objective_is_the_validation_accuracy_within_the_flops_budget():
    m = {sweep.OBJECTIVE_METRIC: 0.8, "eval/accuracy": 0.7, "eval/flops_effective": 40.0, "eval/flops_dense": 100.0}
    assert sweep.objective(m) == 0.8  # no budget: the validation accuracy, never the test accuracy
    assert sweep.objective(m, 0.4) == 0.8  # within the budget (inclusive)
    assert sweep.objective(m, 0.3) == pytest.approx(-0.1)  # over it: minus the excess, below any job within
    assert sweep.objective(m, 0.3) > sweep.objective(m, 0.2)  # nearer the budget ranks higher
    assert sweep.objective({**m, sweep.OBJECTIVE_METRIC: math.nan}) == sweep.FAILED_OBJECTIVE == -math.inf


def read_jobs(tmp):
    return [json.loads(x) for x in (tmp / "multirun" / "jobs.jsonl").read_text().splitlines()]


def read_best(tmp):
    from omegaconf import OmegaConf

    return OmegaConf.load(tmp / "multirun" / "optimization_results.yaml")


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("optuna")
    # on the workers launcher: each trial, known only as it starts, is composed in its worker
    proc = run_pipeline([*SEARCH, "hydra/launcher=workers"], tmp)
    return tmp, MlflowClient(f"sqlite:///{tmp}/mlflow.db"), proc


@needs_optuna
def test_optuna_search_has_a_parent_run_with_its_report_and_maximises_what_jobs_return(search):
    tmp, client, proc = search
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    jobs = [r for r in runs if "kind" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["sweeper"] == "OptunaSweeper" and parent.data.tags["jobs"] == "?"
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/results.csv", "report/results.md"} <= files
    assert len(jobs) == 3 and {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    with open(client.download_artifacts(parent.info.run_id, "jobs.json", str(tmp))) as f:
        reported = json.load(f)
    assert sorted(reported) == sorted(r.info.run_id for r in jobs)

    # Each job returned sweep.objective of its run's metrics (budget 0.5 from the experiment); the
    # sweeper's best is the best of them, with that job's ratios.
    lines = read_jobs(tmp)
    assert sorted(x["status"] for x in lines) == ["FINISHED"] * 3
    by_id = {r.info.run_id: r for r in jobs}
    for x in lines:
        assert x["objective"] == sweep.objective(by_id[x["run_id"]].data.metrics, 0.5)
    best_line = max(lines, key=lambda x: x["objective"])
    best = read_best(tmp)
    assert best.best_value == best_line["objective"]
    best_run = by_id[best_line["run_id"]]
    assert {k: float(v) for k, v in best.best_params.items()} == {
        f"method.ratios.{layer}": float(best_run.data.params[f"method.ratios.{layer}"])
        for layer in ("conv1", "conv2", "conv3", "conv4")}

    out = proc.stdout + proc.stderr
    assert "[job 3] filter-0.50 started: method.ratios.conv1=" in out  # no total the sweep cannot know
    assert " of 3]" not in out and "elapsed" in out


@needs_optuna
def test_optuna_rerun_skips_finished_jobs_and_returns_their_logged_objective(search):
    tmp, client, _ = search
    before = read_best(tmp).best_value
    proc = run_pipeline(SEARCH, tmp)  # the same seeded sampler asks for the same three jobs
    assert "3 skipped" in proc.stdout + proc.stderr
    assert sorted(x["status"] for x in read_jobs(tmp)) == ["SKIPPED"] * 3
    assert read_best(tmp).best_value == before


@needs_optuna
def test_optuna_job_with_a_bad_value_fails_in_one_line_and_the_search_goes_on(tmp_path, client_for):
    proc = run_pipeline([*SEARCH, "hydra.sweeper.n_trials=2", "method.ratios.conv1=choice(1.5)"], tmp_path,
                        check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    for job in (1, 2):  # one line as each fails (and the list at the end)
        assert f"[job {job}] filter-0.50 failed: invalid config: method.ratios.conv1=1.5 is not allowed" in out
    assert "Traceback" not in out
    assert [x["status"] for x in read_jobs(tmp_path)] == ["FAILED", "FAILED"]
    assert read_best(tmp_path).best_value == -math.inf
    runs = client_for(tmp_path).search_runs([client_for(tmp_path).get_experiment_by_name("pruning").experiment_id])
    assert [(r.data.tags.get("kind"), r.info.status) for r in runs] == [("sweep", "FAILED")]


@needs_optuna
@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.direction=minimize", "hydra.sweeper.direction='minimize' is not allowed: maximize"),
    ("hydra.callbacks.sweep.flops_budget=1.5", "hydra.callbacks.sweep.flops_budget=1.5 is not allowed"),
    ("tracking=none", "tracking='none' is not allowed"),
])
def test_optuna_search_that_cannot_work_stops_before_any_job(tmp_path, override, message):
    proc = run_pipeline(["-m", "experiment=optuna_filter", override], tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "multirun" / "jobs.jsonl").exists()
