"""Every method under every schedule runs end to end (training=smoke, small data), on 2 joblib workers
that share one baseline per baseline config."""

from conftest import no_tensorflow_here, run_pipeline

METHODS = ["magnitude", "filter", "slim", "hybrid", "random"]
SCHEDULES = ["one_shot", "iterative", "gradual"]


def test_every_method_and_schedule_runs_end_to_end(tmp_path, client_for):
    # vgg_bn has BatchNorm, so every code path runs (slimming's penalty, BatchNorm masks, surgery);
    # seed_cnn's runs are in test_sweep.py and test_e2e.py.
    proc = run_pipeline(["-m", f"method={','.join(METHODS)}", f"sparsity={','.join(SCHEDULES)}",
                         "sparsity.target=0.5", "model=vgg_bn", "model.widths=[8,8]", "model.hidden=16",
                         "data.limit=200", "training=smoke", "training.baseline.epochs=1", "hydra/launcher=workers",
                         "hydra.launcher.n_jobs=2"], tmp_path,
                        env=no_tensorflow_here(tmp_path))  # the workers check the models fit, not the sweep
    client = client_for(tmp_path)
    exp = client.get_experiment_by_name("pruning")
    runs = client.search_runs([exp.experiment_id])
    jobs = [r for r in runs if "config_hash" in r.data.tags]
    assert len(jobs) == len(METHODS) * len(SCHEDULES)
    assert all(r.info.status == "FINISHED" for r in jobs)
    assert len({r.data.tags["pid"] for r in jobs}) == 2  # really two worker processes
    # what the workers, started before the sweep had its parent run, learn from it as each job starts
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    n = len(METHODS) * len(SCHEDULES)
    out = proc.stdout + proc.stderr
    assert f"of {n}] random-0.50 finished" in out and f"; {n} done" in out, out[-3000:]
    for r in jobs:
        m = r.data.metrics
        assert 0 < m["eval/sparsity"] < 1 and m["eval/conv_sparsity"] > 0, r.info.run_name
        if r.data.params["method.name"] in ("magnitude", "random"):  # their pool is exactly eval/sparsity's
            assert abs(m["eval/sparsity"] - 0.5) < 1e-3, (r.info.run_name, m["eval/sparsity"])

    # slim's L1 penalty makes its own baseline; each baseline is trained once: the first job's by a worker
    # while the sweep was starting (no job trained it), slim's by one of its jobs
    hashes = {r.data.tags["baseline_hash"] for r in jobs}
    assert len(hashes) == 2
    assert len([r for r in runs if r.data.tags.get("kind") == "baseline"]) == 2
    trained_here = [r.data.tags["baseline_hash"] for r in jobs if r.data.tags["baseline_trained_here"] == "true"]
    first = next(r.data.tags["baseline_hash"] for r in jobs if r.data.params["method.name"] == "magnitude")
    assert len(trained_here) == 1 and first not in trained_here
