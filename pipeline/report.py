"""The comparison report: runs -> pandas -> results tables (CSV, Markdown) and plots.

python -m pipeline.report [--experiment NAME | --parent RUN_ID] [--out DIR] [--uri URI]

Runs are compared only with runs of the same setting: one group per set of runs that share every
resolved config value except the seed, where they are tracked, and what forms the rows (method x target),
plus the code that ran them and the data they saw (tags code_version, data_digest). A method option that
differs between runs of one method (e.g. method.scope) becomes part of its label.

Written into --out: results.csv (one row per group x method x target: means over seeds, the spread of the
fine-tuned accuracy, the number of seeds), results.md (per group: fine-tuned accuracy as method x target,
"mean ± std (seeds)"; efficiency; each method's accuracy minus magnitude's and random's, paired by seed,
with a 95% t-interval) and per group the figures accuracy_vs_sparsity_*, accuracy_vs_cost_* (FLOPs and
measured latency, each method's Pareto frontier) and difference_to_baselines_*.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd
from scipy import stats

COLUMNS = {
    "metrics.baseline/accuracy": "acc_baseline",
    "metrics.pruned/accuracy": "acc_pruned",
    "metrics.eval/accuracy": "acc_finetuned",
    "metrics.eval/sparsity": "sparsity",
    "metrics.eval/conv_sparsity": "conv_sparsity",
    "metrics.eval/model_sparsity": "model_sparsity",
    "metrics.eval/compression": "compression",
    "metrics.eval/flops_dense": "flops_dense",
    "metrics.eval/flops_effective": "flops_effective",
    "metrics.eval/speedup_theoretical": "speedup_theoretical",
    "metrics.eval/flops_shrunk": "flops_shrunk",
    "metrics.eval/speedup_measured": "speedup_measured",
    "metrics.eval/size_gzip_bytes": "size_gzip_bytes",
    "metrics.eval/latency_ms_dense": "latency_ms_dense",
    "metrics.eval/latency_ms_pruned": "latency_ms_pruned",
    "metrics.eval/latency_ms_dense_b256": "latency_ms_dense_b256",
    "metrics.eval/latency_ms_pruned_b256": "latency_ms_pruned_b256",
}
MEANS = [*COLUMNS.values(), "flops_pruned", "flops_ratio"]  # averaged over seeds
RESULTS = ["method", "target", *MEANS, "acc_finetuned_std", "seeds"]  # results.csv, after the group's values
JOB_RUNS = "attributes.status = 'FINISHED' and tags.config_hash != ''"  # not baselines, not sweeps
NOT_SETTING = ("params.seed", "params.sparsity.target", "params.tracking.", "params.method.")
SETTING_TAGS = ["tags.code_version", "tags.data_digest"]
ABSENT = "(absent)"  # a value a run does not have (e.g. an old run without the tag code_version)
PLOTS = ("accuracy_vs_sparsity", "accuracy_vs_cost", "difference_to_baselines")  # file-name prefixes
REFERENCES = ("magnitude", "random")  # the methods every other one is compared with
EFFICIENCY = ["method", "target", "sparsity", "compression", "flops_ratio", "speedup_measured"]
METHOD = "params.method."


# --- the runs ---

def runs_frame(client, run_ids: list[str] | None = None, experiment_ids: list[str] | None = None,
               parent: str | None = None) -> pd.DataFrame:
    """FINISHED job runs as one row each (run_id, start_time, params.*, metrics.*, tags.*), one per job:
    runs with the same tag config_hash are the same job, and only the latest counts.

    run_ids: only these runs; parent: only the jobs of this sweep (its children and the runs it reused,
    listed in its artifact jobs.json); else every job run of experiment_ids."""
    if parent:
        experiment_ids = [client.get_run(parent).info.experiment_id]
    elif run_ids is not None:
        experiment_ids = sorted({client.get_run(r).info.experiment_id for r in set(run_ids)})
    df = pd.DataFrame([_row(r) for r in _search(client, experiment_ids)] if experiment_ids else [])
    if df.empty:
        return df
    if parent:
        df = df[column(df, "tags.mlflow.parentRunId").eq(parent) | df["run_id"].isin(sweep_jobs(client, parent))]
    elif run_ids is not None:
        df = df[df["run_id"].isin(run_ids)]
    latest = df.sort_values("start_time").drop_duplicates("tags.config_hash", keep="last").reset_index(drop=True)
    latest.attrs["repeats"] = len(df) - len(latest)
    return latest


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or NaN where no run has that key."""
    return df[name] if name in df else pd.Series(float("nan"), index=df.index)


def _search(client, experiment_ids: list[str]) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, JOB_RUNS, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _row(run) -> dict:
    data = run.data
    return {"run_id": run.info.run_id, "start_time": run.info.start_time,
            **{f"params.{k}": v for k, v in data.params.items()},
            **{f"metrics.{k}": v for k, v in data.metrics.items()},
            **{f"tags.{k}": v for k, v in data.tags.items()}}


def sweep_jobs(client, parent: str) -> list[str]:
    """The run ids a sweep's parent lists in its artifact jobs.json (finished and reused jobs), if any."""
    if "jobs.json" not in {a.path for a in client.list_artifacts(parent)}:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(parent, "jobs.json", tmp)).read_text())


# --- the tables ---

def _differs(values: pd.Series) -> bool:
    return values.nunique(dropna=False) > 1


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The columns whose values define a setting: all params but seed, target, method.* and tracking.*,
    and the tags code_version and data_digest."""
    params = [c for c in df if c.startswith("params.") and not c.startswith(NOT_SETTING)]
    return sorted(params) + [t for t in SETTING_TAGS if t in df]


def short(column: str) -> str:
    return column.split(".", 1)[1]


def method_labels(df: pd.DataFrame) -> pd.Series:
    """method.name, plus every option of that method whose value differs between its runs."""
    labels = df[METHOD + "name"].copy()
    options = [c for c in df if c.startswith(METHOD) and c != METHOD + "name"]
    for _, runs in df.groupby(METHOD + "name"):
        split = [c for c in options if runs[c].notna().any() and _differs(runs[c])]
        if split:
            text = runs[split].fillna(ABSENT).apply(
                lambda row: ", ".join(f"{c.removeprefix(METHOD)}={v}" for c, v in row.items()), axis=1)
            labels[runs.index] = runs[METHOD + "name"] + " (" + text + ")"
    return labels


def per_run(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: the values that tell its group from the others (short names), method label,
    target, seed and metrics; flops_pruned is the shrunk model's FLOPs where one exists, else the
    effective ones, and flops_ratio = flops_dense / flops_pruned. Returns the rows and the group columns."""
    if df.empty:
        return pd.DataFrame(columns=["method", "target", "seed", *MEANS]), []
    groups = [c for c in setting_columns(df) if _differs(df[c])]
    runs = df[groups].fillna(ABSENT).rename(columns=short)
    runs["method"] = method_labels(df)
    runs["target"] = df["params.sparsity.target"].astype(float)
    runs["seed"] = df["params.seed"]
    for col, name in COLUMNS.items():
        runs[name] = column(df, col)
    runs["flops_pruned"] = runs["flops_shrunk"].fillna(runs["flops_effective"])
    runs["flops_ratio"] = runs["flops_dense"] / runs["flops_pruned"]
    return runs, [short(c) for c in groups]


def summarize(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per (group, method, target): the means over seeds, acc_finetuned_std and the number of
    distinct seeds."""
    if runs.empty:
        return pd.DataFrame(columns=[*keys, *RESULTS])
    grouped = runs.groupby([*keys, "method", "target"])
    out = grouped[MEANS].mean()
    out["acc_finetuned_std"] = grouped["acc_finetuned"].std().fillna(0.0)
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index().sort_values([*keys, "method", "target"], ignore_index=True)


def table(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """results.csv from runs_frame's rows: summarize(per_run(df)). Returns the table and its group columns."""
    runs, keys = per_run(df)
    return summarize(runs, keys), keys


def interval(differences: pd.Series, level: float = 0.95) -> dict:
    """The mean of paired differences and its t-interval (n - 1 degrees of freedom); none from one pair."""
    n, mean = len(differences), differences.mean()
    half = stats.t.ppf((1 + level) / 2, n - 1) * differences.std() / n ** 0.5 if n > 1 else float("nan")
    return {"pairs": n, "diff": mean, "low": mean - half, "high": mean + half}


def paired_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """For one group: each method's fine-tuned accuracy minus each reference method's (REFERENCES present
    in the group; not the mirror image of one already shown, random minus magnitude) at the same target,
    paired by seed: reference, method, target, pairs, diff, low, high."""
    acc = runs.pivot_table(index=["target", "seed"], columns="method", values="acc_finetuned")
    rows = [{"reference": ref, "method": method, "target": target, **interval(d)}
            for i, ref in enumerate(REFERENCES) if ref in acc
            for method in acc.columns.drop(list(REFERENCES[:i + 1]), errors="ignore")
            for target, d in (acc[method] - acc[ref]).dropna().groupby(level="target")]
    return pd.DataFrame(rows, columns=["reference", "method", "target", "pairs", "diff", "low", "high"])


def pareto(points: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """The points no other point dominates (one with no more cost and no less value), by rising cost;
    of equal points, one."""
    p = points.dropna(subset=[cost, value]).sort_values([cost, value], ascending=[True, False])
    return p[p[value] > p[value].cummax().shift(fill_value=float("-inf"))]


# --- the Markdown ---

def spread(values: pd.Series) -> str:
    """mean ± standard deviation (n), or mean (1) for a single value: `0.9611 ± 0.0040 (3)`."""
    values = values.dropna()
    if len(values) < 2:
        return f"{values.iloc[0]:.4f} (1)" if len(values) else ""
    return f"{values.mean():.4f} ± {values.std():.4f} ({len(values)})"


def signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def difference(row: pd.Series) -> str:
    """`+0.012 [−0.004, +0.028] (3 seeds)`, or `+0.012 (1 seed, no interval)`."""
    if row["pairs"] == 1:
        return f"{signed(row['diff'])} (1 seed, no interval)"
    return f"{signed(row['diff'])} [{signed(row['low'])}, {signed(row['high'])}] ({int(row['pairs'])} seeds)"


def by_target(cells: pd.Series) -> str:
    """Cells indexed by (row labels..., target) as a Markdown table with one column per target."""
    grid = cells.unstack("target").fillna("")
    grid.columns = [f"{t:g}" for t in grid.columns]
    return grid.reset_index().to_markdown(index=False, disable_numparse=True)


def accuracy_table(runs: pd.DataFrame) -> str:
    return by_target(runs.groupby(["method", "target"])["acc_finetuned"].agg(spread))


def efficiency_table(runs: pd.DataFrame) -> str:
    rows = summarize(runs, [])[EFFICIENCY].dropna(axis=1, how="all")  # a metric no run logged: no column
    blank = rows.astype(object).where(rows.notna(), None)  # a cell not logged: blank (tabulate's missingval)
    return blank.to_markdown(index=False, floatfmt=".4g", missingval="")


def difference_table(diffs: pd.DataFrame) -> str:
    cells = diffs.set_index(["method", "reference", "target"]).apply(difference, axis=1)
    return by_target(cells.rename_axis(index={"reference": "vs"}))


def group_section(values: dict, runs: pd.DataFrame) -> list[str]:
    """The Markdown of one group: its heading, accuracy, efficiency and paired differences."""
    baseline = spread(runs.groupby("seed")["acc_baseline"].mean())
    lines = [f"## {heading(values)}", "", *([f"Dense baseline: {baseline}", ""] if baseline else []),
             "### Accuracy after fine-tuning: mean ± std (seeds); columns: target", "", accuracy_table(runs), "",
             "### Efficiency (means over seeds)", "", efficiency_table(runs), ""]
    diffs = paired_differences(runs)
    if not diffs.empty:
        lines += ["### Difference in fine-tuned accuracy, paired by seed: mean [95% t-interval] (seeds); "
                  "columns: target", "", difference_table(diffs), ""]
    return lines


def common_values(df: pd.DataFrame) -> str:
    """The setting every run shares, as key=value."""
    return ", ".join(f"{short(c)}={df[c].iloc[0]}" for c in setting_columns(df)
                     if df[c].notna().all() and not _differs(df[c]))


def by_group(rows: pd.DataFrame, keys: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    """(the group's defining values, its rows without them), one per group."""
    if rows.empty:
        return []
    if not keys:
        return [({}, rows)]
    return [(dict(zip(keys, values)), part.drop(columns=keys)) for values, part in rows.groupby(keys)]


def heading(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def markdown(df: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> str:
    n = len(df)
    verified = int(column(df, "tags.verified").eq("true").sum())
    repeats = df.attrs.get("repeats", 0)
    lines = [
        "# Pruning results", "",
        f"{n} finished runs; {verified} of {n} runs verified with `python -m pipeline.verify`."
        + (f" {repeats} repeated runs of the same job (same config_hash) left out: the latest counts." if repeats
           else ""),
        "Accuracy is test accuracy; `target` is the method's prune rate over its own pool; `sparsity` is "
        "measured over all conv and dense kernels; `compression` = parameters / nonzero parameters; "
        "`flops_ratio` = dense FLOPs / FLOPs of the shrunk model where one exists, else the effective FLOPs "
        "(zero weights skipped); `speedup_measured` = dense / pruned latency at batch 256. Means over "
        "distinct seeds, spread as standard deviation, the number of seeds in parentheses; the differences "
        "pair runs of the same seed. One section per setting: runs that differ in anything but the seed are "
        "never averaged together. All columns per method and target: results.csv.", ""]
    if df.empty:
        return "\n".join([*lines, "No finished runs.", ""])
    if common_values(df):
        lines += [f"Common to all runs: {common_values(df)}", ""]
    for values, part in by_group(runs, keys):
        lines += group_section(values, part)
    return "\n".join(lines)


# --- the plots ---

FLOPS = ("flops_pruned", "flops_dense", "FLOPs per example (shrunk model where one exists, else effective)")
LATENCIES = [("latency_ms_pruned_b256", "latency_ms_dense_b256", "measured latency, ms per batch of 256"),
             ("latency_ms_pruned", "latency_ms_dense", "measured latency, ms per example")]


def slugs(groups: list[dict]) -> list[str]:
    """Short, unique file-name parts for the groups."""
    names: list[str] = []
    for values in groups:
        name = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(v)).strip("-")[:20] for v in values.values()) or "all"
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    return names


def panels(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), sharey=True, squeeze=False)
    return fig, list(axes[0])


def save(fig, axes, title: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def points(ax, x: pd.Series, y: pd.Series, err=None, ls: str = "-", **kw) -> None:
    """Points with error bars, joined by a line unless two share an x value (a line would zigzag there)."""
    kw.setdefault("marker", "o")
    ax.errorbar(x, y, yerr=err, ls=ls if x.is_unique else "none", ms=4, capsize=2, **kw)


def plot_sparsity(part: pd.DataFrame, colors: dict, title: str, path: Path) -> Path:
    """The study's figure: accuracy against the prune rate and the measured sparsity, one curve per method,
    before and after fine-tuning."""
    fig, axes = panels(2)
    for ax, (x, label) in zip(axes, [("target", "prune rate (method's own pool)"),
                                     ("sparsity", "measured sparsity (all conv+dense kernels)")]):
        for method, m in part.groupby("method"):
            m = m.sort_values(x)
            color = colors[method]
            points(ax, m[x], m["acc_finetuned"], m["acc_finetuned_std"], color=color, label=f"{method} fine-tuned")
            points(ax, m[x], m["acc_pruned"], ls="--", marker="x", color=color, label=f"{method} pruned")
        ax.set_xlabel(label)
    return save(fig, axes, f"{title}: accuracy vs sparsity (error bars: std over seeds)", "test accuracy", path)


def cost_axes(part: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(cost, dense cost, label) of each cost some run logged: FLOPs, and latency (batch 256 if logged)."""
    latency = next((c for c in LATENCIES if part[c[0]].notna().any()), None)
    return [c for c in (FLOPS, latency) if c and part[c[0]].notna().any()]


def plot_cost(part: pd.DataFrame, colors: dict, title: str, path: Path) -> Path | None:
    """Fine-tuned accuracy against FLOPs and measured latency, each method's Pareto frontier drawn."""
    costs = cost_axes(part)
    if not costs:
        return None
    fig, axes = panels(len(costs))
    for ax, (x, dense, label) in zip(axes, costs):
        for method, m in part.groupby("method"):
            points(ax, m[x], m["acc_finetuned"], m["acc_finetuned_std"], ls="none", alpha=0.6, color=colors[method])
            front = pareto(m, x, "acc_finetuned")
            ax.plot(front[x], front["acc_finetuned"], color=colors[method], label=f"{method} (frontier)")
        ax.plot(part[dense].mean(), part["acc_baseline"].mean(), "k*", ms=10, label="dense")
        ax.set_xlabel(label)
    return save(fig, axes, f"{title}: accuracy vs cost (lines: Pareto frontiers; error bars: std over seeds)",
                "fine-tuned test accuracy", path)


def plot_differences(runs: pd.DataFrame, colors: dict, title: str, path: Path) -> Path | None:
    """Each method's fine-tuned accuracy minus magnitude's and random's, paired by seed, 95% t-intervals."""
    diffs = paired_differences(runs)
    if diffs.empty:
        return None
    fig, axes = panels(diffs["reference"].nunique())
    for ax, (ref, d) in zip(axes, diffs.groupby("reference")):
        for method, m in d.groupby("method"):
            m = m.sort_values("target")
            err = [(m["diff"] - m["low"]).fillna(0), (m["high"] - m["diff"]).fillna(0)]
            points(ax, m["target"], m["diff"], err, color=colors[method], label=method)
            one = m[m["pairs"] == 1]
            ax.scatter(one["target"], one["diff"], s=80, facecolors="none", edgecolors=colors[method])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("prune rate (method's own pool)")
        ax.set_title(f"minus {ref}", fontsize=9)
    note = "; circled: one seed, no interval" if (diffs["pairs"] == 1).any() else ""
    return save(fig, axes, f"{title}: difference in accuracy, paired by seed (95% t-interval{note})",
                "fine-tuned accuracy difference", path)


def plots(runs: pd.DataFrame, title: str, out: Path, name: str) -> list[Path]:
    """The figures of one group that have something to show, named <prefix>_<name>.png; one colour per
    method in all of them."""
    part = summarize(runs, [])
    colors = {method: f"C{i % 10}" for i, method in enumerate(part["method"].unique())}
    figures = [plot_sparsity(part, colors, title, out / f"{PLOTS[0]}_{name}.png"),
               plot_cost(part, colors, title, out / f"{PLOTS[1]}_{name}.png"),
               plot_differences(runs, colors, title, out / f"{PLOTS[2]}_{name}.png")]
    return [p for p in figures if p is not None]


# --- the files ---

def owned(out: Path) -> list[Path]:
    """The files in `out` that write() writes and so replaces: never anything else."""
    plotted = [p for prefix in PLOTS for p in out.glob(f"{prefix}_*.png")]
    return [p for p in [out / "results.csv", out / "results.md", *plotted] if p.is_file()]


def write(client, run_ids: list[str] | None, out: Path, experiment_ids: list[str] | None = None,
          parent: str | None = None, df: pd.DataFrame | None = None) -> list[Path]:
    """Write results.csv, results.md and the plots of each group into `out` (replacing those of an earlier
    call) from the runs (df: runs_frame's, if the caller has it); return the paths written, so that the caller
    logs exactly these."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in owned(out):
        path.unlink()
    if df is None:
        df = runs_frame(client, run_ids, experiment_ids, parent)
    runs, keys = per_run(df)
    summarize(runs, keys).to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown(df, runs, keys))
    written = [out / "results.csv", out / "results.md"]
    groups = by_group(runs, keys)
    for (values, part), name in zip(groups, slugs([values for values, _ in groups])):
        written += plots(part, heading(values), out, name)
    return written


def main(argv: list[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="pruning", help="experiment name (default: pruning)")
    p.add_argument("--parent", help="only the jobs of this sweep's parent run (its experiment is used)")
    p.add_argument("--uri", help="tracking URI (default: as the pipeline)")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    args = p.parse_args(argv)
    try:
        client = tracking.existing_client(tracking.resolve_uri(args.uri))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    experiment_ids = None
    if not args.parent:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            print(f"error: no experiment named {args.experiment!r} in {client.tracking_uri}", file=sys.stderr)
            return 2
        experiment_ids = [exp.experiment_id]
    try:
        written = write(client, None, Path(args.out), experiment_ids, args.parent)
    except MlflowException as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    print(f"written to {Path(args.out).resolve()}: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
