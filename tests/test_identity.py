"""A result's identity: the config as the schema fills it, the data's content, the seed and the code.
A job is reused only when all of them match; it never depends on whether it trained its baseline."""

import shutil

import numpy as np
import pytest
from conftest import REPO, compose_config, run_in_process, run_pipeline

from pipeline import tracking
from pipeline.config import ConfigError, config_hash, identity, run_name, validate

SMOKE = ["training=smoke"]


def job_hash(overrides, digest="d"):
    cfg = compose_config(overrides)
    return config_hash(identity(cfg.seed, validate(cfg), digest))


def job_runs(tmp_path):
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pruning").experiment_id
    return sorted(client.search_runs([exp], "tags.config_hash != ''"), key=lambda r: r.info.start_time)


def test_a_default_spelled_out_is_the_same_job():
    assert job_hash([]) == job_hash(["+training.finetune.momentum=0.9"])
    assert job_hash([]) != job_hash(["+training.finetune.momentum=0.8"])
    assert job_hash([]) != job_hash(["seed=1"])
    assert job_hash([]) != job_hash([], digest="other data")
    assert job_hash(["tracking.experiment=a"]) == job_hash(["tracking.experiment=b"])  # where, not what


def test_the_name_follows_the_target_class():
    with pytest.raises(ConfigError, match=r"method.name='magnitude' is not allowed: 'random'"):
        validate(compose_config(["method=random", "method.name=magnitude"]))
    with pytest.raises(ConfigError, match=r"model.name"):
        validate(compose_config(["model=vgg_bn", "model.name=seed_cnn"]))
    assert validate(compose_config(["method=random", "method.name=random"]))["method"].name == "random"


@pytest.mark.parametrize("target, name", [(0.5, "magnitude-0.50"), (0.5000001, "magnitude-0.5000001"),
                                          (0.999999, "magnitude-0.999999"), (0.1, "magnitude-0.10"),
                                          (0.125, "magnitude-0.125")])
def test_run_names_keep_the_exact_target(target, name):
    assert run_name("magnitude", target) == name


def test_a_changed_source_file_reruns_the_job_and_its_baseline(tmp_path):
    """The code version is a hash of the package source: an uncommitted edit is a new job."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", copy / "conf")
    env = {"PYTHONPATH": str(copy)}
    run_pipeline(SMOKE, tmp_path, env=env)
    with open(copy / "pipeline" / "stages" / "train.py", "a") as f:
        f.write("\n# an edit\n")
    proc = run_pipeline(SMOKE, tmp_path, env=env)
    assert "skipped" not in proc.stdout + proc.stderr
    first, second = job_runs(tmp_path)
    assert first.info.status == second.info.status == "FINISHED"
    assert first.data.tags["code_version"] != second.data.tags["code_version"]
    assert first.data.tags["baseline_hash"] != second.data.tags["baseline_hash"]
    assert second.data.tags["baseline_trained_here"] == "true"
    proc = run_pipeline(SMOKE, tmp_path, env=env)  # unchanged now: reused, and the log says which run
    assert "skipped: the same job" in proc.stdout and second.info.run_id in proc.stdout
    assert len(job_runs(tmp_path)) == 2


def test_new_content_at_the_same_path_is_a_new_job(tmp_path, digits):
    path = tmp_path / "data.npz"

    def write(scale):
        np.savez(path, x_train=np.concatenate([digits.x_train, digits.x_val]) * scale,
                 y_train=np.concatenate([digits.y_train, digits.y_val]), x_test=digits.x_test * scale,
                 y_test=digits.y_test)

    args = [*SMOKE, "data=npz", f"data.path={path}"]
    write(1.0)
    run_in_process(tmp_path, args)
    write(0.5)
    assert "skipped" not in run_in_process(tmp_path, args)
    first, second = job_runs(tmp_path)
    assert first.data.tags["data_digest"] != second.data.tags["data_digest"]
    assert first.data.tags["baseline_hash"] != second.data.tags["baseline_hash"]
    assert first.data.tags["config_hash"] != second.data.tags["config_hash"]


def test_slimming_gives_the_same_result_whether_or_not_it_trained_the_baseline(tmp_path):
    """The trained path used to fine-tune with the L1 penalty still on the BatchNorm scales."""
    args = [*SMOKE, "model=vgg_bn", "model.widths=[8,8]", "model.hidden=16", "method=slim",
            "sparsity.target=0.4", "tracking.skip_finished=false"]
    run_in_process(tmp_path, args)
    run_in_process(tmp_path, args)
    trained, loaded = job_runs(tmp_path)
    assert trained.data.tags["baseline_trained_here"] == "true"
    assert loaded.data.tags["baseline_trained_here"] == "false"
    assert trained.data.tags["config_hash"] == loaded.data.tags["config_hash"]
    timing = ("latency", "speedup_measured", "seconds")
    results = [{k: v for k, v in run.data.metrics.items() if not any(t in k for t in timing)}
               for run in (trained, loaded)]
    assert "eval/accuracy" in results[0] and results[0] == results[1]


def test_a_baseline_prepared_ahead_of_its_job_is_the_one_the_job_would_train(tmp_path):
    """A sweep's worker trains the first job's baseline before the jobs start (run.prepare_baseline): the
    job then loads it, with the results it gets training the baseline itself."""
    from pipeline.run import prepare_baseline

    args = [*SMOKE, "model=vgg_bn", "model.widths=[8,8]", "model.hidden=16", "sparsity.target=0.4"]
    prepare_baseline(compose_config([*args, f"tracking.uri=sqlite:///{tmp_path / 'ahead'}/mlflow.db"]))
    run_in_process(tmp_path / "ahead", args)
    run_in_process(tmp_path / "in_job", args)
    (ahead,), (in_job,) = job_runs(tmp_path / "ahead"), job_runs(tmp_path / "in_job")
    assert ahead.data.tags["baseline_trained_here"] == "false" and in_job.data.tags["baseline_trained_here"] == "true"
    timing = ("latency", "speedup_measured", "seconds")
    results = [{k: v for k, v in run.data.metrics.items() if not any(t in k for t in timing)}
               for run in (ahead, in_job)]
    assert "baseline/accuracy" in results[0] and results[0] == results[1]


def test_where_the_data_lies_is_not_what_it_is():
    npz = ["data=npz", "data.path=/a.npz"]
    assert job_hash(npz) == job_hash(["data=npz", "data.path=/b.npz"])  # the digest stands for the content
    assert job_hash(npz) != job_hash(npz, digest="other data")
