"""Every method under every schedule runs end to end on both study models (training=smoke, small data)."""

from conftest import run_pipeline

METHODS = ["magnitude", "filter", "slim", "hybrid", "random"]
SCHEDULES = ["one_shot", "iterative", "gradual"]


def test_every_method_and_schedule_runs_on_both_models(tmp_path, client_for):
    run_pipeline(["-m", f"method={','.join(METHODS)}", f"sparsity={','.join(SCHEDULES)}", "sparsity.target=0.5",
                  "model=seed_cnn,vgg_bn", "data.limit=300",
                  "training=smoke", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path)
    client = client_for(tmp_path)
    exp = client.get_experiment_by_name("pruning")
    jobs = [r for r in client.search_runs([exp.experiment_id]) if "config_hash" in r.data.tags]
    assert len(jobs) == len(METHODS) * len(SCHEDULES) * 2
    assert all(r.info.status == "FINISHED" for r in jobs)
    for r in jobs:
        m = r.data.metrics
        assert 0 < m["eval/sparsity"] < 1 and m["eval/conv_sparsity"] > 0, r.info.run_name
        if r.data.params["method.name"] in ("magnitude", "random"):  # their pool is exactly eval/sparsity's
            assert abs(m["eval/sparsity"] - 0.5) < 1e-3, (r.info.run_name, m["eval/sparsity"])
