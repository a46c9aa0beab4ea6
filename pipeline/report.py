"""The comparison report: runs -> pandas -> results tables (CSV, Markdown) and accuracy-sparsity plots.

python -m pipeline.report [--experiment NAME | --parent RUN_ID] [--out DIR] [--uri URI]

Runs are compared only with runs of the same setting: one table (and one plot) per group of runs that
share every resolved config value except the seed, where they are tracked, and what forms the rows
(method x target), plus the code that ran them and the data they saw (tags code_version, data_digest).
A method option that differs between runs of one method (e.g. method.scope) becomes part of its label.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd

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
}
JOB_RUNS = "attributes.status = 'FINISHED' and tags.config_hash != ''"  # not baselines, not sweeps
NOT_SETTING = ("params.seed", "params.sparsity.target", "params.tracking.", "params.method.")
SETTING_TAGS = ["tags.code_version", "tags.data_digest"]
ABSENT = "(absent)"  # a value a run does not have (e.g. an old run without the tag code_version)
PLOT = "accuracy_vs_sparsity"
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


# --- the table ---

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


def table(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per (group, method label, target): the group's defining values, the metrics' means over
    seeds, acc_finetuned_std and the number of distinct seeds. Returns the table and its group columns."""
    if df.empty:
        return pd.DataFrame(columns=["method", "target", *COLUMNS.values(), "acc_finetuned_std", "seeds"]), []
    groups = [c for c in setting_columns(df) if _differs(df[c])]
    keys = [short(c) for c in groups] + ["method", "target"]
    t = df[groups].fillna(ABSENT).rename(columns=short)
    t["method"] = method_labels(df)
    t["target"] = df["params.sparsity.target"].astype(float)
    t["seed"] = df["params.seed"]
    for col, name in COLUMNS.items():
        t[name] = column(df, col)
    grouped = t.groupby(keys)
    out = grouped[list(COLUMNS.values())].mean()
    out["acc_finetuned_std"] = grouped["acc_finetuned"].std().fillna(0.0)
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index().sort_values(keys, ignore_index=True), keys[:-2]


def common_values(df: pd.DataFrame) -> str:
    """The setting every run shares, as key=value."""
    return ", ".join(f"{short(c)}={df[c].iloc[0]}" for c in setting_columns(df)
                     if df[c].notna().all() and not _differs(df[c]))


def by_group(t: pd.DataFrame, keys: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    """(the group's defining values, its rows without them), one per group."""
    if not keys:
        return [({}, t)]
    return [(dict(zip(keys, values)), part.drop(columns=keys)) for values, part in t.groupby(keys)]


def heading(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def markdown(df: pd.DataFrame, t: pd.DataFrame, keys: list[str]) -> str:
    n = len(df)
    verified = int(column(df, "tags.verified").eq("true").sum())
    repeats = df.attrs.get("repeats", 0)
    lines = [
        "# Pruning results", "",
        f"{n} finished runs; {verified} of {n} runs verified with `python -m pipeline.verify`."
        + (f" {repeats} repeated runs of the same job (same config_hash) left out: the latest counts." if repeats
           else ""),
        "Accuracy is test accuracy; `target` is the method's prune rate over its own pool; `sparsity` is "
        "measured over all conv and dense kernels, `conv_sparsity` over conv kernels, `model_sparsity` over all "
        "parameters. Means over distinct seeds (`seeds`), spread as standard deviation. One table per setting: "
        "runs that differ in anything but the seed are never averaged together.", ""]
    if df.empty:
        return "\n".join([*lines, "No finished runs.", ""])
    if common_values(df):
        lines += [f"Common to all runs: {common_values(df)}", ""]
    for values, part in by_group(t, keys):
        lines += [f"## {heading(values)}", "", part.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)


# --- the plots ---

def slugs(groups: list[dict]) -> list[str]:
    """Short, unique file-name parts for the groups."""
    names: list[str] = []
    for values in groups:
        name = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(v)).strip("-")[:20] for v in values.values()) or "all"
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    return names


def plot(part: pd.DataFrame, title: str, path: Path) -> Path:
    """The study's figure: accuracy against sparsity, one curve per method, before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (x, label) in zip(axes, [("target", "prune rate (method's own pool)"),
                                     ("sparsity", "measured sparsity (all conv+dense kernels)")]):
        for method, m in part.groupby("method"):
            m = m.sort_values(x)
            line, = ax.plot(m[x], m["acc_finetuned"], marker="o", label=f"{method} fine-tuned")
            ax.fill_between(m[x], m["acc_finetuned"] - m["acc_finetuned_std"],
                            m["acc_finetuned"] + m["acc_finetuned_std"], alpha=0.15, color=line.get_color())
            ax.plot(m[x], m["acc_pruned"], marker="x", ls="--", color=line.get_color(), label=f"{method} pruned")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: accuracy vs sparsity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the files ---

def owned(out: Path) -> list[Path]:
    """The files in `out` that write() writes and so replaces: never anything else."""
    return [p for p in [out / "results.csv", out / "results.md", *out.glob(f"{PLOT}_*.png")] if p.is_file()]


def write(client, run_ids: list[str] | None, out: Path, experiment_ids: list[str] | None = None,
          parent: str | None = None) -> list[Path]:
    """Write results.csv, results.md and one plot per group into `out` (replacing those of an earlier
    call); return the paths written, so that the caller logs exactly these."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in owned(out):
        path.unlink()
    df = runs_frame(client, run_ids, experiment_ids, parent)
    t, keys = table(df)
    t.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown(df, t, keys))
    written = [out / "results.csv", out / "results.md"]
    groups = by_group(t, keys) if not t.empty else []
    for (values, part), name in zip(groups, slugs([values for values, _ in groups])):
        written.append(plot(part, heading(values), out / f"{PLOT}_{name}.png"))
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
