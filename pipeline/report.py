"""The comparison report: runs -> pandas -> a results table (CSV, Markdown) and accuracy-sparsity plots.

python -m pipeline.report [--experiment NAME | --parent RUN_ID] [--out DIR] [--uri URI]
"""

from __future__ import annotations

import argparse
import sys
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
KEYS = ["model", "schedule", "method", "target"]


def runs_frame(client, run_ids: list[str] | None = None, experiment_ids: list[str] | None = None,
               parent: str | None = None) -> pd.DataFrame:
    """FINISHED job runs (not baselines, not sweeps) as one row each."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    if run_ids is not None:
        runs = [client.get_run(r) for r in dict.fromkeys(run_ids)]
        experiment_ids = sorted({r.info.experiment_id for r in runs})
    filters = ["attributes.status = 'FINISHED'", "tags.config_hash != ''"]
    if parent:
        filters.append(f"tags.mlflow.parentRunId = '{parent}'")
    df = mlflow.search_runs(experiment_ids, " and ".join(filters), output_format="pandas")
    if run_ids is not None and not df.empty:
        df = df[df["run_id"].isin(run_ids)]
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Method x target (x model, schedule): mean over seeds, with the spread and the count."""
    if df.empty:
        return pd.DataFrame()
    t = pd.DataFrame({
        "model": df["params.model.name"], "schedule": df["params.sparsity.name"],
        "method": df["params.method.name"], "target": df["params.sparsity.target"].astype(float),
        "seed": df["params.seed"],
    })
    for col, name in COLUMNS.items():
        t[name] = df[col] if col in df else float("nan")
    grouped = t.groupby(KEYS)
    out = grouped[list(COLUMNS.values())].mean()
    out["acc_finetuned_std"] = grouped["acc_finetuned"].std().fillna(0.0)
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index().sort_values(KEYS)


def plots(t: pd.DataFrame, out: Path) -> list[Path]:
    """The study's figures: accuracy against sparsity, one curve per method, before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (model, schedule), part in t.groupby(["model", "schedule"]):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, (x, label) in zip(axes, [("target", "prune rate (method's own pool)"),
                                         ("sparsity", "measured sparsity (all conv+dense kernels)")]):
            for method, m in part.groupby("method"):
                m = m.sort_values(x)
                line, = ax.plot(m[x], m["acc_finetuned"], marker="o", label=f"{method} fine-tuned")
                ax.fill_between(m[x], m["acc_finetuned"] - m["acc_finetuned_std"],
                                m["acc_finetuned"] + m["acc_finetuned_std"], alpha=0.15, color=line.get_color())
                ax.plot(m[x], m["acc_pruned"], marker="x", ls="--", color=line.get_color(),
                        label=f"{method} pruned")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model}, {schedule}: accuracy vs sparsity")
        fig.tight_layout()
        path = out / f"accuracy_vs_sparsity_{model}_{schedule}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(client, run_ids: list[str] | None, out: Path, experiment_ids=None, parent=None) -> pd.DataFrame:
    """Write results.csv, results.md and the plots into `out`; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    df = runs_frame(client, run_ids, experiment_ids, parent)
    t = table(df)
    t.to_csv(out / "results.csv", index=False)
    verified = int((df["tags.verified"] == "true").sum()) if "tags.verified" in df else 0
    header = (f"# Pruning results\n\n{len(df)} finished runs; {verified} of {len(df)} runs verified with "
              "`python -m pipeline.verify`. Accuracy is test accuracy; `target` is the "
              "method's prune rate over its own pool; `sparsity` is measured over all conv and dense kernels, "
              "`conv_sparsity` over conv kernels, `model_sparsity` over all parameters. Means over seeds "
              "(`seeds`), spread as standard deviation.\n\n")
    (out / "results.md").write_text(header + (t.to_markdown(index=False, floatfmt=".4g") if not t.empty
                                              else "No finished runs.") + "\n")
    if not t.empty:
        plots(t, out)
    return t


def main(argv: list[str] | None = None) -> int:
    from pipeline import tracking

    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="pruning", help="experiment name (default: pruning)")
    p.add_argument("--parent", help="only the jobs of this sweep's parent run")
    p.add_argument("--uri", help="tracking URI (default: as the pipeline)")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    args = p.parse_args(argv)
    client = tracking.client(tracking.resolve_uri(args.uri))
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: no experiment named {args.experiment!r} in {client.tracking_uri}", file=sys.stderr)
        return 2
    t = write(client, None, Path(args.out), [exp.experiment_id], args.parent)
    print(t.to_markdown(index=False, floatfmt=".4g") if not t.empty else "No finished runs.")
    print(f"\nwritten to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
