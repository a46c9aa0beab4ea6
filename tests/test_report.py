"""The report on a real MLflow store: runs created directly (no training), grouped, deduplicated, written."""

import hashlib
import json

import matplotlib.image
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from pipeline import report, tracking

PARAMS = {"data.name": "digits", "model.name": "seed_cnn", "sparsity.name": "one_shot",
          "training.finetune.lr": "0.001", "tracking.experiment": "pruning"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    return uri, tracking.client(uri)


@pytest.fixture
def exp(store, request):
    """A fresh experiment per test: (client, experiment id, uri, name)."""
    uri, client = store
    name = request.node.name
    return client, tracking.experiment_id(client, name, uri), uri, name


def job(client, exp_id, method="magnitude", target=0.5, seed=0, acc=0.9, code_version="new",
        data_digest="d1", status="FINISHED", parent=None, start_time=None, config_hash=None, metrics=None,
        **params):
    """A job run as pipeline.run logs it: dotted params, tags, final metrics (more in `metrics`)."""
    params = {**PARAMS, "method.name": method, "sparsity.target": str(target), "seed": str(seed), **params}
    tags = {k: v for k, v in {"code_version": code_version, "data_digest": data_digest,
                              "mlflow.parentRunId": parent}.items() if v is not None}
    identity = {k: v for k, v in params.items() if not k.startswith("tracking.")} | tags
    identity.pop("mlflow.parentRunId", None)
    tags["config_hash"] = config_hash or hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]
    run_id = client.create_run(exp_id, start_time=start_time, tags=tags).info.run_id
    metrics = {"baseline/accuracy": 0.95, "pruned/accuracy": acc - 0.1, "eval/accuracy": acc,
               "eval/sparsity": target, **(metrics or {})}
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


def other_run(client, exp_id, kind):
    """A baseline or sweep run: no config_hash, not a job."""
    run_id = client.create_run(exp_id, tags={"kind": kind}).info.run_id
    client.log_metric(run_id, "eval/accuracy", 0.1)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def write(exp, out, **kw):
    client, exp_id, _, _ = exp
    files = report.write(client, None, out, experiment_ids=[exp_id], **kw)
    return files, pd.read_csv(out / "results.csv"), (out / "results.md").read_text()


def test_two_data_sets_make_two_tables(exp, tmp_path, capsys):
    client, exp_id, uri, name = exp
    for data in ("digits", "npz"):
        for target in (0.3, 0.6):
            job(client, exp_id, target=target, **{"data.name": data})
    files, csv, md = write(exp, tmp_path)
    assert "## data.name=digits\n" in md and "## data.name=npz\n" in md
    assert "model.name=seed_cnn" in md.split("##")[0]  # common values once, at the top
    assert len(csv) == 4 and set(csv["data.name"]) == {"digits", "npz"}
    assert (csv["seeds"] == 1).all()
    assert sorted(p.name for p in files if p.suffix == ".png") == ["accuracy_vs_sparsity_digits.png",
                                                                   "accuracy_vs_sparsity_npz.png"]
    assert report.main(["--uri", uri, "--experiment", name, "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "## data.name=digits" in out and "## data.name=npz" in out


def test_a_method_option_splits_rows_not_other_methods(exp, tmp_path):
    client, exp_id, _, _ = exp
    job(client, exp_id, acc=0.9, **{"method.scope": "global"})
    job(client, exp_id, acc=0.7, **{"method.scope": "layer"})
    job(client, exp_id, method="filter", acc=0.8)
    job(client, exp_id, method="filter", acc=0.6, seed=1)
    _, csv, md = write(exp, tmp_path)
    acc = dict(zip(csv["method"], csv["acc_finetuned"]))
    assert acc == {"filter": pytest.approx(0.7), "magnitude (scope=global)": 0.9, "magnitude (scope=layer)": 0.7}
    assert md.count("\n## ") == 1


def test_old_and_new_code_are_separate_tables(exp, tmp_path):
    client, exp_id, _, _ = exp
    job(client, exp_id, acc=0.5, code_version=None, data_digest=None)  # an old run, before these tags
    job(client, exp_id, acc=0.9, code_version="ab12cd34")
    files, csv, md = write(exp, tmp_path)
    assert "## code_version=(absent), data_digest=(absent)" in md and "## code_version=ab12cd34, data_digest=d1" in md
    assert dict(zip(csv["code_version"], csv["acc_finetuned"])) == {"(absent)": 0.5, "ab12cd34": 0.9}
    assert len([p for p in files if p.suffix == ".png"]) == 2


def test_the_same_job_twice_counts_once_the_latest(exp, tmp_path):
    client, exp_id, _, _ = exp
    job(client, exp_id, acc=0.5, start_time=1_000, config_hash="same")
    job(client, exp_id, acc=0.8, start_time=2_000, config_hash="same")
    _, csv, md = write(exp, tmp_path)
    assert len(csv) == 1 and csv["acc_finetuned"][0] == 0.8 and csv["seeds"][0] == 1
    assert "1 finished runs" in md and "1 repeated runs" in md


def test_two_seeds_are_averaged_wherever_they_are_tracked(exp, tmp_path):
    client, exp_id, _, _ = exp
    job(client, exp_id, seed=0, acc=0.8, **{"tracking.experiment": "a"})
    job(client, exp_id, seed=1, acc=0.9, **{"tracking.experiment": "b"})
    _, csv, _ = write(exp, tmp_path)
    (row,) = csv.to_dict("records")
    assert row["seeds"] == 2 and row["acc_finetuned"] == pytest.approx(0.85)
    assert row["acc_finetuned_std"] == pytest.approx(pd.Series([0.8, 0.9]).std())


def test_parent_includes_the_runs_its_sweep_reused(exp, tmp_path, capsys):
    client, exp_id, uri, _ = exp
    old = other_run(client, exp_id, "sweep")
    reused = job(client, exp_id, target=0.3, parent=old)
    job(client, exp_id, target=0.9, parent=old)  # an older sweep's job that this sweep did not ask for
    new = client.create_run(exp_id, tags={"kind": "sweep"}).info.run_id
    ran = job(client, exp_id, target=0.6, parent=new)
    _, csv, _ = write(exp, tmp_path / "children", parent=new)
    assert list(csv["target"]) == [0.6]  # no jobs.json: its children only
    client.log_text(new, json.dumps([reused, ran]), "jobs.json")
    _, csv, _ = write(exp, tmp_path / "jobs", parent=new)
    assert list(csv["target"]) == [0.3, 0.6]
    assert report.main(["--uri", uri, "--parent", new, "--out", str(tmp_path / "cli")]) == 0
    assert list(pd.read_csv(tmp_path / "cli" / "results.csv")["target"]) == [0.3, 0.6]


def test_write_replaces_its_own_files_and_returns_them(exp, tmp_path):
    client, exp_id, _, _ = exp
    digits = job(client, exp_id, **{"data.name": "digits"})
    job(client, exp_id, **{"data.name": "npz"})
    write(exp, tmp_path)
    assert (tmp_path / "accuracy_vs_sparsity_npz.png").is_file()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other.png").write_text("mine")
    files = report.write(client, [digits], tmp_path)
    assert sorted(p.name for p in files) == ["accuracy_vs_sparsity_all.png", "results.csv", "results.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_sparsity_all.png", "notes.txt",
                                                          "other.png", "results.csv", "results.md"]


def test_write_replaces_every_figure_it_owns(exp, tmp_path):
    client, exp_id, _, _ = exp
    run = job(client, exp_id)
    for name in ("accuracy_vs_cost_old.png", "difference_to_baselines_old.png"):
        (tmp_path / name).write_text("left by an earlier report")
    files = report.write(client, [run], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)


def test_only_finished_job_runs_count(exp, tmp_path):
    client, exp_id, _, _ = exp
    job(client, exp_id, acc=0.9)
    job(client, exp_id, target=0.6, status="FAILED")
    job(client, exp_id, target=0.7, status="KILLED")
    client.create_run(exp_id, tags={"config_hash": "running"})  # still RUNNING
    other_run(client, exp_id, "baseline")
    other_run(client, exp_id, "sweep")
    _, csv, md = write(exp, tmp_path)
    assert list(csv["target"]) == [0.5] and list(csv["acc_finetuned"]) == [0.9]
    assert "1 finished runs; 0 of 1 runs verified" in md


def test_no_runs(exp, tmp_path):
    files, csv, md = write(exp, tmp_path)
    assert "No finished runs." in md and csv.empty and [p.name for p in files] == ["results.csv", "results.md"]


def rows(md: str, title: str) -> list[list[str]]:
    """The cells of the table under the first heading that starts with `title`, header first."""
    text = md.split(f"### {title}", 1)[1].split("\n#", 1)[0]
    lines = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|") and "---" not in line]
    return [[cell.strip() for cell in line] for line in lines]


def test_accuracy_table_is_method_by_target_with_seeds(exp, tmp_path):
    client, exp_id, _, _ = exp
    for seed, acc in enumerate([0.95, 0.96, 0.97]):
        job(client, exp_id, seed=seed, acc=acc)
    job(client, exp_id, target=0.7, seed=0, acc=0.9)
    job(client, exp_id, method="filter", acc=0.8)
    _, csv, md = write(exp, tmp_path)
    assert rows(md, "Accuracy after fine-tuning") == [["method", "0.5", "0.7"],
                                                      ["filter", "0.8000 (1)", ""],
                                                      ["magnitude", "0.9600 ± 0.0100 (3)", "0.9000 (1)"]]
    assert "Dense baseline: 0.9500 ± 0.0000 (3)" in md
    assert list(csv["seeds"]) == [1, 3, 1]  # results.csv stays long: one row per method x target


def test_efficiency_table_and_flops_ratio(exp, tmp_path):
    client, exp_id, _, _ = exp
    cost = {"eval/flops_dense": 1000, "eval/flops_effective": 500, "eval/compression": 2.0}
    job(client, exp_id, metrics=cost)
    job(client, exp_id, method="filter", metrics={**cost, "eval/flops_shrunk": 250, "eval/speedup_measured": 1.5})
    _, csv, md = write(exp, tmp_path)
    assert dict(zip(csv["method"], csv["flops_ratio"])) == {"filter": 4.0, "magnitude": 2.0}  # shrunk where any
    header = ["method", "target", "sparsity", "compression", "flops_ratio", "speedup_measured"]
    assert rows(md, "Efficiency") == [header, ["filter", "0.5", "0.5", "2", "4", "1.5"],
                                      ["magnitude", "0.5", "0.5", "2", "2", ""]]  # not measured: blank


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = pd.DataFrame({"cost": [1, 2, 2, 3, 4, 5, 5, 6, float("nan")],
                           "acc": [0.5, 0.7, 0.6, 0.7, 0.9, 0.8, 0.9, 0.95, 1.0]})
    front = report.pareto(points, "cost", "acc")
    # (2, 0.6) loses to (2, 0.7), (3, 0.7) to (2, 0.7), (5, 0.8) and (5, 0.9) to (4, 0.9); NaN is no point
    assert list(zip(front["cost"], front["acc"])) == [(1, 0.5), (2, 0.7), (4, 0.9), (6, 0.95)]


def test_paired_difference_has_a_95_percent_t_interval(exp, tmp_path):
    client, exp_id, _, _ = exp
    magnitude, filter_ = [0.90, 0.92, 0.95], [0.91, 0.95, 0.96]
    for seed, (a, b) in enumerate(zip(magnitude, filter_)):
        job(client, exp_id, seed=seed, acc=a)
        job(client, exp_id, method="filter", seed=seed, acc=b)
    job(client, exp_id, method="filter", seed=7, acc=0.5)  # no magnitude run of seed 7: no pair
    job(client, exp_id, method="filter", target=0.7, acc=0.85)
    job(client, exp_id, target=0.7, acc=0.8)
    _, _, md = write(exp, tmp_path)
    d = pd.Series(filter_) - pd.Series(magnitude)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    diffs = report.paired_differences(report.per_run(report.runs_frame(exp[0], None, [exp_id]))[0])
    (row,) = diffs[(diffs["method"] == "filter") & (diffs["target"] == 0.5)].to_dict("records")
    assert row["pairs"] == 3
    assert (row["diff"], row["low"], row["high"]) == pytest.approx((d.mean(), low, high))
    interval = f"{report.signed(d.mean())} [{report.signed(low)}, {report.signed(high)}] (3 seeds)"
    assert interval == "+0.017 [−0.012, +0.045] (3 seeds)"
    assert rows(md, "Difference in fine-tuned accuracy") == [["method", "vs", "0.5", "0.7"],  # no random runs
                                                             ["filter", "magnitude", interval,
                                                              "+0.050 (1 seed, no interval)"]]


def test_plots_are_written_and_listed(exp, tmp_path):
    client, exp_id, _, _ = exp
    for method, seed, target in [(m, s, t) for m in ("magnitude", "random", "filter") for s in (0, 1)
                                 for t in (0.3, 0.6)]:
        flops = 1000 * (1 - target)
        job(client, exp_id, method=method, seed=seed, target=target, acc=0.9 - target / 4 + seed / 100,
            metrics={"eval/flops_dense": 1000, "eval/flops_effective": flops, "eval/latency_ms_dense_b256": 5.0,
                     "eval/latency_ms_pruned_b256": 5 * (1 - target / 2)})
    job(client, exp_id, data_digest="d2")  # another group: one run, no FLOPs, no pairs
    files, _, md = write(exp, tmp_path)
    pngs = sorted(p.name for p in files if p.suffix == ".png")
    assert pngs == ["accuracy_vs_cost_d1.png", "accuracy_vs_sparsity_d1.png", "accuracy_vs_sparsity_d2.png",
                    "difference_to_baselines_d1.png"]
    assert all(p.is_file() for p in files)
    cost = matplotlib.image.imread(tmp_path / "accuracy_vs_cost_d1.png")
    sparsity = matplotlib.image.imread(tmp_path / "accuracy_vs_sparsity_d1.png")
    assert cost.ndim == 3 and cost.shape == sparsity.shape  # two panels each: FLOPs and latency
    assert md.count("### Difference in fine-tuned accuracy") == 1
