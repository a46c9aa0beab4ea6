"""The study's published observations vs our two sweeps (training=seed_report and training=default).

    python -m pipeline.peers.study --seed-csv A/results.csv --default-csv B/results.csv
    python -m pipeline.peers.study --seed-experiment study_seed_report --seed-uri sqlite:////tmp/a/db \\
                                   --default-experiment study_default --default-uri sqlite:////tmp/b/db

Both sweeps are `python -m pipeline.run -m experiment=seed_report [training=default]` (conf/experiment/
seed_report.yaml); the CSVs are pipeline.report's results.csv (one row per method x target). Writes
benchmarks/study.md. Every verdict is computed from the numbers with the rules stated in the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

LOSS_LIMIT = 0.02  # the study's "under 2 points lost": also our threshold for "accuracy declines"
COLLAPSE = 0.10  # more than 10 points lost after fine-tuning = the method collapsed
STUDY = {
    "magnitude_50": "Magnitude: accuracy lost below 2 points at 50% of connections pruned.",
    "magnitude_onset": "Magnitude: accuracy stays nearly the same up to about 60% sparsity, then declines.",
    "filter": "Filter pruning collapses on the 3-filter model: ~43% accuracy at the first filters pruned, "
              "falling to ~19%; overall sparsity below 1%.",
    "slim": "Network slimming collapses: 67% at the lowest level, ~19% from 0.14% overall sparsity.",
    "hybrid": "Hybrid declines slowly up to 60-70% prune rate of the conv layers (6-7% overall sparsity in "
              "the study's model), then sharply.",
    "ranking": "Magnitude is the best method by a large margin.",
}


def load(csv: str | None, experiment: str | None, uri: str | None, model: str) -> pd.DataFrame:
    """The results table of one model: a results.csv, or the runs of an experiment."""
    if csv:
        table = pd.read_csv(csv)
        return table[table["model.name"] == model] if "model.name" in table else table
    from pipeline import report, tracking

    client = tracking.client(tracking.resolve_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment named {experiment!r} in {client.tracking_uri}")
    runs = report.runs_frame(client, None, [exp.experiment_id])
    return report.table(runs[runs["params.model.name"] == model] if not runs.empty else runs)[0]


def loss(part: pd.DataFrame) -> pd.Series:
    return part["acc_baseline"] - part["acc_finetuned"]


def onset(part: pd.DataFrame) -> float | None:
    """The lowest target from which fine-tuned accuracy stays more than LOSS_LIMIT below the baseline."""
    part = part.sort_values("target")
    lost = (loss(part) > LOSS_LIMIT).tolist()
    for i in range(len(lost)):
        if all(lost[i:]):
            return float(part["target"].iloc[i])
    return None


def first_pruning(part: pd.DataFrame) -> pd.Series | None:
    """The row of the lowest target that pruned anything (3 filters: 0.1-0.3 of them round down to none)."""
    pruned = part[part["sparsity"] > 0].sort_values("target")
    return pruned.iloc[0] if len(pruned) else None


def p(x: float) -> str:
    return f"{100 * x:.1f}"


def findings(t: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """observation key -> (verdict, the numbers behind it)."""
    out = {}
    methods = {m: part.sort_values("target") for m, part in t.groupby("method")}
    mag = methods.get("magnitude")
    if mag is not None:
        at50 = mag[(mag["target"] - 0.5).abs() < 1e-9]
        if len(at50):
            lost = float(loss(at50).iloc[0])
            out["magnitude_50"] = ("agrees" if lost < LOSS_LIMIT else "differs",
                                   f"lost {p(lost)} pts at 0.5 (baseline {p(at50['acc_baseline'].iloc[0])}, "
                                   f"fine-tuned {p(at50['acc_finetuned'].iloc[0])})")
        o = onset(mag)
        if o is None:
            v = f"differs: no lasting decline up to {mag['target'].max():.1f}"
        elif 0.55 <= o <= 0.75:
            v = "agrees"
        else:
            v = "differs: declines earlier" if o < 0.55 else "differs: holds longer"
        out["magnitude_onset"] = (v, f"lasting loss > 2 pts from target {o}; losses "
                                  + ", ".join(f"{r.target:.1f}: {p(r.acc_baseline - r.acc_finetuned)}"
                                              for r in mag.itertuples()))
    for name in ("filter", "slim"):
        part = methods.get(name)
        if part is None:
            continue
        first = first_pruning(part)
        if first is None:
            out[name] = ("differs: pruned nothing", "measured sparsity 0 at every target")
            continue
        lost = first["acc_baseline"] - first["acc_finetuned"]
        last = part.iloc[-1]
        v = "agrees" if lost > COLLAPSE else "differs: no collapse at the first units pruned"
        out[name] = (v, f"first target that prunes: {first['target']:.1f} (model sparsity "
                     f"{100 * first['model_sparsity']:.2f}%), fine-tuned {p(first['acc_finetuned'])} "
                     f"(lost {p(lost)} pts); at {last['target']:.1f}: {p(last['acc_finetuned'])} "
                     f"(model sparsity {100 * last['model_sparsity']:.2f}%); max model sparsity "
                     f"{100 * part['model_sparsity'].max():.2f}%")
    hyb = methods.get("hybrid")
    if hyb is not None:
        o = onset(hyb)
        drops = hyb["acc_finetuned"].diff()
        knee = hyb.loc[drops.idxmin()] if drops.notna().any() else None
        if o is None:
            v = f"differs: no lasting decline up to {hyb['target'].max():.1f}"
        elif 0.55 <= o <= 0.85:
            v = "agrees"
        else:
            v = "differs: declines earlier" if o < 0.55 else "differs: holds longer"
        at = hyb[(hyb["target"] - (o if o is not None else -1)).abs() < 1e-9]
        sparsity_at = f"{100 * at['model_sparsity'].iloc[0]:.2f}%" if len(at) else "n/a"
        out["hybrid"] = (v, f"lasting loss > 2 pts from target {o} (overall sparsity there {sparsity_at}); "
                         f"largest single drop {p(-drops.min()) if knee is not None else 'n/a'} pts into "
                         f"{knee['target'] if knee is not None else 'n/a'}")
    if mag is not None and len(methods) > 1:
        others = t[t["method"] != "magnitude"].groupby("target")["acc_finetuned"].max()
        gap = (mag.set_index("target")["acc_finetuned"] - others).dropna()
        v = "agrees" if (gap > 0).all() and gap.mean() > 0.05 else (
            "partly: magnitude best on average" if gap.mean() > 0 else "differs")
        out["ranking"] = (v, f"magnitude minus best other method: mean {p(gap.mean())} pts, "
                          f"min {p(gap.min())} "
                          f"pts (at {gap.idxmin():.1f}), max {p(gap.max())} pts")
    return out


def table_md(a: pd.DataFrame, b: pd.DataFrame) -> str:
    keys = ["method", "target"]
    cols = ["acc_baseline", "acc_pruned", "acc_finetuned", "sparsity", "model_sparsity"]
    m = a[keys + cols].merge(b[keys + cols], on=keys, suffixes=("_seed", "_default"))
    lines = ["| method | target | baseline | pruned | fine-tuned (seed_report) | fine-tuned (default) "
             "| kernel sparsity | model sparsity |", "|---|---|---|---|---|---|---|---|"]
    for r in m.sort_values(keys).itertuples():
        lines.append(f"| {r.method} | {r.target:.1f} | {p(r.acc_baseline_seed)} | {p(r.acc_pruned_seed)} "
                     f"| {p(r.acc_finetuned_seed)} | {p(r.acc_finetuned_default)} | {r.sparsity_seed:.3f} "
                     f"| {100 * r.model_sparsity_seed:.2f}% |")
    return "\n".join(lines)


def write(seed: pd.DataFrame, default: pd.DataFrame, out: Path, sources: str) -> str:
    fs, fd = findings(seed), findings(default)
    lines = ["# Reproducing the seed study (Batra, Das, Xu 2024)", "",
             f"Sources: {sources}.", "",
             "Two sweeps of `python -m pipeline.run -m experiment=seed_report` (seed_cnn on digits, methods "
             "magnitude, filter, slim, hybrid, prune rates 0.1..0.9, seed 0): `training=seed_report` "
             "(the study's fine-tuning: 20 epochs SGD, lr 1e-6, weight decay 1e-8) and `training=default` "
             "(15 epochs Adam, lr 1e-3). Our masks hold at every step; the study re-applied them per epoch.",
             "",
             f"Rules: 'declines' = fine-tuned accuracy more than {100 * LOSS_LIMIT:.0f} points below the "
             f"dense baseline from that target on; 'collapse' = more than {100 * COLLAPSE:.0f} points lost "
             "at the first target that prunes anything; targets are the method's prune rate over its own "
             "pool; model sparsity is zeros over all parameters (the study's 'sparsity' for "
             "filter/slim/hybrid).", "",
             "Targets run per method: " + "; ".join(
                 f"{m}: {', '.join(f'{t:.1f}' for t in sorted(set(seed.loc[seed['method'] == m, 'target'])))}"
                 for m in sorted(set(seed["method"]))) + " (onsets are only as fine as this grid).", "",
             "## The study's observations vs ours", "",
             "| observation (study) | with the study's fine-tuning | with our default fine-tuning |",
             "|---|---|---|"]
    for key, text in STUDY.items():
        a, b = fs.get(key, ("n/a", "")), fd.get(key, ("n/a", ""))
        lines.append(f"| {text} | **{a[0]}**: {a[1]} | **{b[0]}**: {b[1]} |")
    rec_s = (seed["acc_finetuned"] - seed["acc_pruned"]).groupby(seed["method"]).mean()
    rec_d = (default["acc_finetuned"] - default["acc_pruned"]).groupby(default["method"]).mean()
    lines += ["", "## What fine-tuning recovers (mean fine-tuned minus pruned accuracy over targets, "
              "points)", "",
              "| method | seed_report fine-tuning | default fine-tuning |", "|---|---|---|"]
    for method in sorted(set(rec_s.index) | set(rec_d.index)):
        nan = float("nan")
        lines.append(f"| {method} | {p(rec_s.get(method, nan))} | {p(rec_d.get(method, nan))} |")
    agree_s = sum(v[0] == "agrees" for v in fs.values())
    agree_d = sum(v[0] == "agrees" for v in fd.values())
    lines += ["", f"Agreement: {agree_s} of {len(fs)} observations with the study's fine-tuning, "
              f"{agree_d} of {len(fd)} with ours.", "",
              "Where the denominators differ: our digits images are 8x8, so the dense layers hold almost all "
              "parameters and the conv layers' share of the model is smaller than in the study's model; "
              "compare filter/slim/hybrid by prune rate, not by overall sparsity. With 3 filters per layer, "
              "low prune rates may remove no whole filter or channel at all: the measured sparsity in the "
              "table shows where.", "", "## All numbers (accuracy in %, seed 0)", "",
              table_md(seed, default), ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-csv")
    ap.add_argument("--default-csv")
    ap.add_argument("--seed-experiment", default="study_seed_report")
    ap.add_argument("--default-experiment", default="study_default")
    ap.add_argument("--seed-uri")
    ap.add_argument("--default-uri")
    ap.add_argument("--model", default="seed_cnn")
    ap.add_argument("--out", default="benchmarks/study.md")
    args = ap.parse_args(argv)
    seed = load(args.seed_csv, args.seed_experiment, args.seed_uri, args.model)
    default = load(args.default_csv, args.default_experiment, args.default_uri, args.model)
    if seed.empty or default.empty:
        print("error: no finished runs in one of the two sweeps", file=sys.stderr)
        return 2
    sources = (f"seed_report: {args.seed_csv or f'{args.seed_experiment} @ {args.seed_uri}'}; "
               f"default: {args.default_csv or f'{args.default_experiment} @ {args.default_uri}'}")
    print(write(seed, default, Path(args.out), sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
