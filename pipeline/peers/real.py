"""Real data: every method of conf/method on Fashion-MNIST next to TF-MOT, as a section of BENCHMARKS.md.

    .venv/bin/python -m pipeline.peers.real [--out BENCHMARKS.md] [--reuse-peer]

Skipped, with the reason printed, when Fashion-MNIST is not on this machine (the Keras cache or Debian's
dataset-fashion-mnist under /usr/share/datasets): it never downloads. Otherwise, on one budget (BUDGET):
1. TF-MOT's prune_low_magnitude (ConstantSparsity and PolynomialDecay) in .venv-peers, by running
   pipeline.peers.tfmot --data fashion_mnist as a subprocess (skipped with a note when .venv-peers is absent;
   --reuse-peer keeps a complete benchmarks/real_tfmot.json made with the same arguments);
2. ours at the same time, one process per model and seed, with the pipeline's own stages (train_baseline,
   prune, finetune, shrink, evaluate, as pipeline.run chains them, without MLflow): seed_cnn and vgg_bn, every
   conf/method/*.yaml one-shot, magnitude also gradual, each target, from one baseline per model, seed and
   training-time penalty (slim's L1 on BatchNorm scales gets its own); FLOPs and paired latency where surgery
   shrinks the model;
3. benchmarks/real.md, also put between its markers in --out (replaced there, or appended).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.baseline import seed_everything
from pipeline.bench import HOOKS, put_section
from pipeline.config import Phase, build
from pipeline.data import DataError
from pipeline.peers import common
from pipeline.pruning.surgery import shrink
from pipeline.stages.evaluate import evaluate, test_metrics
from pipeline.stages.finetune import finetune
from pipeline.stages.prune import prune
from pipeline.stages.train import train_baseline

REPO = common.CONF.parent
PEER_PY = REPO / ".venv-peers" / "bin" / "python"
SECTION = "benchmarks/real.md"
TITLE = next(title for title, rel in HOOKS.items() if rel == SECTION)
MARGIN = 0.5  # points: our magnitude pruning within this of TF-MOT, or better
# What fits 2 shared cores in about half an hour (both sides, every method, both models).
# (The gradual schedule over one short epoch would update its masks about 3 times: one-shot only.)
BUDGET = {"data": "fashion_mnist", "limit": 2000, "test_limit": 1000, "models": ["seed_cnn", "vgg_bn"],
          "targets": [0.5, 0.7, 0.9], "seeds": [0, 1], "training": "default", "baseline_epochs": 4,
          "baseline_lr": 0.001, "finetune_epochs": 1, "schedules": ["one_shot"]}
PEER_SCHEDULES = {"one_shot": "ConstantSparsity", "gradual": "PolynomialDecay"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.peers.real", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="BENCHMARKS.md", help="the file whose section is (re)written")
    p.add_argument("--peer-json", default="benchmarks/real_tfmot.json")
    p.add_argument("--ours-json", default="benchmarks/real_ours.json")
    p.add_argument("--reuse-peer", action="store_true",
                   help="keep --peer-json if complete and made with the same arguments")
    p.add_argument("--part", choices=["all", "ours"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--render", action="store_true", help="only write the section again from --ours-json "
                   "and --peer-json of a finished run")
    for key, value in BUDGET.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None,
                       default=value, help=f"(default {value}; the benchmark's budget)")
    return p.parse_args()


def budget(args) -> dict:
    return {k: getattr(args, k) for k in BUDGET}


def load_data(source, seed: int, test_limit: int | None):
    data = source.load(seed)
    if test_limit:
        data = dataclasses.replace(data, x_test=data.x_test[:test_limit], y_test=data.y_test[:test_limit])
    return data


def peer_argv(b: dict, out: str) -> list[str]:
    """The arguments of pipeline.peers.tfmot for this budget."""
    def joined(xs):
        return ",".join(str(x) for x in xs)

    return ["--out", out, "--models", joined(b["models"]), "--seeds", joined(b["seeds"]), "--targets",
            joined(b["targets"]), "--schedules", joined(b["schedules"]), "--training", b["training"],
            "--baseline-epochs", str(b["baseline_epochs"]), "--baseline-lr", str(b["baseline_lr"]),
            "--finetune-epochs", str(b["finetune_epochs"]),
            "--data", b["data"], "--data-limit", str(b["limit"]), "--test-limit", str(b["test_limit"])]


def same_peer_run(meta: dict, argv: list[str]) -> bool:
    """Whether a TF-MOT result (its meta) was made with these arguments (tfmot.py records the data options
    apart from its argv; --training default may be left out)."""
    want = dict(zip(argv[::2], argv[1::2]))
    had = {"--training": "default", **dict(zip(meta["argv"][::2], meta["argv"][1::2])), "--data": meta.get("data"),
           "--data-limit": str(meta.get("data_limit")), "--test-limit": str(meta.get("test_limit")),
           "--baseline-lr": str(meta["baseline"]["lr"])}
    return all(had.get(k) == v for k, v in want.items() if k != "--out")


def budget_argv(b: dict) -> list[str]:
    out = []
    for key, value in b.items():
        out += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def start(cmd: list[str]) -> subprocess.Popen:
    print("[real] " + " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=REPO)


def run_all(b: dict, args) -> tuple[dict | None, str, dict, list[str]]:
    """TF-MOT (one process) and ours (one process per model and seed), all at once: a process is single-threaded
    most of the time in these small models, and a shared machine gives each process its share.
    Returns TF-MOT's result (None if none) with a note on it, ours, and what failed."""
    peer, note, procs = None, "", {}
    done = json.loads(Path(args.peer_json).read_text()) if Path(args.peer_json).exists() else None
    if args.reuse_peer and done and done["meta"].get("complete") and same_peer_run(done["meta"],
                                                                                   peer_argv(b, args.peer_json)):
        peer, note = done, f"reused {args.peer_json} (complete, same arguments, made {done['meta']['time']})"
    elif not PEER_PY.exists():
        note = f"TF-MOT not run: {PEER_PY.relative_to(REPO)} is missing (`make bench` makes it)"
    else:
        Path(args.peer_json).unlink(missing_ok=True)
        procs["TF-MOT"] = start([str(PEER_PY), "-m", "pipeline.peers.tfmot", *peer_argv(b, args.peer_json)])
    units = {f"{args.ours_json}.{m}-{s}": {**b, "models": [m], "seeds": [s]} for m in b["models"] for s in b["seeds"]}
    for path, unit in units.items():
        Path(path).unlink(missing_ok=True)
        procs[path] = start([sys.executable, "-m", "pipeline.peers.real", "--part", "ours", "--ours-json", path,
                             *budget_argv(unit)])
    started = time.perf_counter()
    failed = [f"{name} (exit status {code})" for name, proc in procs.items() if (code := proc.wait()) != 0]
    if "TF-MOT" in procs:
        ok = "TF-MOT" not in " ".join(failed) and Path(args.peer_json).exists()
        peer = json.loads(Path(args.peer_json).read_text()) if ok else None
        note = (f"ran alongside ours, {(time.perf_counter() - started) / 60:.0f} min" if ok
                else "TF-MOT failed: see its output above")
    parts = [json.loads(Path(p).read_text()) for p in units if Path(p).exists()]
    ours = {"meta": parts[0]["meta"] if parts else {}, "rows": [r for part in parts for r in part["rows"]]}
    common.write(args.ours_json, ours["meta"], ours["rows"])
    for path in units:
        Path(path).unlink(missing_ok=True)
    return peer, note, ours, failed


def methods() -> list:
    """Every conf/method/*.yaml, built as the pipeline builds it."""
    return [build("method", OmegaConf.load(p)) for p in sorted((common.CONF / "method").glob("*.yaml"))]


def run_ours(b: dict, source, out: str) -> dict:
    import keras

    base_dict, ft_dict = common.budgets(b["training"])
    base_dict.update(epochs=b["baseline_epochs"], lr=b["baseline_lr"])
    ft_dict["epochs"] = b["finetune_epochs"]
    base_phase, ft_phase = Phase(**base_dict), Phase(**ft_dict)
    every = methods()
    sparsity = {name: OmegaConf.load(common.CONF / "sparsity" / f"{name}.yaml") for name in b["schedules"]}
    meta = common.environment(peer="ours", keras=keras.__version__, baseline=base_dict, finetune=ft_dict,
                              methods=[dataclasses.asdict(m) for m in every], budget=b, complete=False)
    rows = []
    for name in b["models"]:
        spec = build("model", OmegaConf.load(common.CONF / "model" / f"{name}.yaml"))
        for seed in b["seeds"]:
            data = load_data(source, seed, b["test_limit"])
            baselines = {}  # the method's training-time penalty -> (weights, accuracy)
            for method in every:
                seed_everything(seed, True)
                model = spec.build(data.input_shape, data.num_classes)
                key = json.dumps(method.penalty(model), sort_keys=True)
                if key not in baselines:
                    started = time.perf_counter()
                    train_baseline(model, data, base_phase, method)
                    acc = test_metrics(model, data)["accuracy"]
                    baselines[key] = model.get_weights(), acc
                    rows.append({"model": name, "seed": seed, "method": "baseline", "penalty": key,
                                 "accuracy": acc, "train_s": time.perf_counter() - started})
                    print(f"[real] {name} seed {seed} baseline (penalty {key}): {acc:.4f}", flush=True)
                weights, base_acc = baselines[key]
                schedules = b["schedules"] if method.name == "magnitude" else ["one_shot"]
                for schedule_name in schedules:
                    for target in b["targets"]:
                        row = {"model": name, "seed": seed, "method": method.name, "schedule": schedule_name,
                               "target": target, "baseline_accuracy": base_acc}
                        started = time.perf_counter()
                        try:
                            schedule = build("sparsity", OmegaConf.merge(sparsity[schedule_name],
                                                                          {"target": target}))
                            row |= job(spec, data, weights, method, schedule, ft_phase, seed)
                        except Exception as e:  # reported in the table; the other jobs go on
                            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                        row["seconds"] = time.perf_counter() - started
                        rows.append(row)
                        common.write(out, meta, rows, quiet=True)
                        print(f"[real] {name} seed {seed} {method.name} {schedule_name} {target}: "
                              + (f"acc {row['accuracy']:.4f} sparsity {row['sparsity']:.3f}" if "accuracy" in row
                                 else row["error"]) + f" ({row['seconds']:.0f} s)", flush=True)
    meta["complete"] = True
    common.write(out, meta, rows)
    return {"meta": meta, "rows": rows}


def job(spec, data, weights, method, schedule, phase, seed) -> dict:
    """One pipeline job from a trained baseline: prune -> fine-tune -> shrink -> evaluate (as run.run_job)."""
    seed_everything(seed, True)
    model = spec.build(data.input_shape, data.num_classes)
    model.set_weights(weights)
    masked = prune(model, method, schedule.initial, seed)
    finetune(masked, data, phase, method, schedule, seed)
    masked.detach()
    small, kept = shrink(model)
    # latency (paired with the dense model) only where surgery makes the model smaller
    metrics = evaluate(model, data, dense_weights=weights if kept else None, small_model=small if kept else None)
    keys = ("accuracy", "sparsity", "conv_sparsity", "model_sparsity", "flops_dense", "flops_effective",
            "flops_shrunk", "latency_ms_dense", "latency_ms_pruned", "latency_ms_dense_b256",
            "latency_ms_pruned_b256")
    return {k: float(metrics[k]) for k in keys if k in metrics} | {"shrunk": bool(kept)}


# --- the section ---------------------------------------------------------------------------------------------

def pct(values: list[float]) -> str:
    """'85.12 (84.90, 85.35)': the mean over seeds, then each seed's value, in %."""
    if not values:
        return "-"
    each = ", ".join(f"{100 * v:.2f}" for v in values)
    return f"{100 * statistics.fmean(values):.2f} ({each})" if len(values) > 1 else f"{100 * values[0]:.2f}"


def values(rows, **match) -> list[float]:
    return [r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"])
            if "accuracy" in r and all(r.get(k) == v for k, v in match.items())]


def mean(rows, key, **match) -> float:
    xs = [r[key] for r in rows if key in r and all(r.get(k) == v for k, v in match.items())]
    return statistics.fmean(xs) if xs else float("nan")


def markdown(b: dict, ours: dict, peer: dict | None, peer_note: str, machine: dict, source,
             failed: list[str]) -> str:
    o, p = ours["rows"], (peer or {}).get("rows", [])
    targets, seeds = b["targets"], b["seeds"]
    names = [m["name"] for m in ours["meta"]["methods"]]
    base, ft = ours["meta"]["baseline"], ours["meta"]["finetune"]
    n_train = b["limit"] - max(1, round(source.val_fraction * b["limit"]))
    lines = [
        f"Generated by `python -m pipeline.peers.real` (the last step of `make bench`) on {machine['date']}; "
        f"{machine['minutes']:.0f} min of wall time. Rerun it to reproduce every figure.",
        "",
        f"- Machine: {os.cpu_count()} cores, shared with other work while this ran: load average (1 / 5 / 15 min) "
        f"{machine['load_start']} at the start, {machine['load_end']} at the end (above {os.cpu_count()}: "
        "other processes competed for the cores, so latencies are noisy; they are timed in pairs, see below).",
        f"- Data: `data={b['data']}` found at {source.source()} (no download); `data.limit={b['limit']}`: the "
        f"first {b['limit']} training images ({n_train} to train on, the rest held out for validation by the "
        f"seed); scored on the first {b['test_limit']} of the 10,000 test images (one accuracy's standard "
        f"error is about {100 * (0.85 * 0.15 / b['test_limit']) ** 0.5:.1f} points at 85%).",
        f"- Budget, the same for both sides: conf/training/{b['training']}.yaml with baseline.epochs="
        f"{b['baseline_epochs']} ({base['optimizer']}, lr {base['lr']}, batch {base['batch_size']}) and "
        f"finetune.epochs={b['finetune_epochs']} ({ft['optimizer']}, lr {ft['lr']}, batch {ft['batch_size']}); "
        f"seeds {', '.join(map(str, seeds))} (each: its own split, initialisation, shuffling and masks); "
        f"targets {', '.join(map(str, targets))}.",
        f"- Ours (Keras {ours['meta']['keras']}): the pipeline's stages as `pipeline.run` chains them "
        "(train_baseline -> prune -> finetune -> shrink -> evaluate), without MLflow, one process per model and "
        "seed, all running at the same time as TF-MOT's process; one baseline per "
        "model and seed, and one more for a method with a training-time penalty (slim's L1 on BatchNorm "
        f"scales, on vgg_bn). Methods: every conf/method/*.yaml ({', '.join(names)}) with `sparsity=one_shot`"
        + ("" if b["schedules"] == ["one_shot"] else f", magnitude with `sparsity={','.join(b['schedules'])}`")
        + ". The same jobs, tracked: `python -m pipeline.run -m "
        f"data=fashion_mnist data.limit={b['limit']} model=seed_cnn,vgg_bn method={','.join(names)} "
        f"sparsity.target={','.join(map(str, targets))} training.baseline.epochs={b['baseline_epochs']} "
        f"training.baseline.lr={b['baseline_lr']} training.finetune.epochs={b['finetune_epochs']} seed=0` "
        "(the pipeline scores the full test set).",
    ]
    if peer:
        m = peer["meta"]
        lines.append(f"- TF-MOT {m['tfmot']} (tf_keras {m['tf_keras']}, TF {m['tensorflow']}), {peer_note}: "
                     "`.venv-peers/bin/python -m pipeline.peers.tfmot "
                     f"{' '.join(peer_argv(b, 'benchmarks/real_tfmot.json'))}`: the same models rebuilt in "
                     "tf_keras, its own baseline per seed, prune_low_magnitude on the whole model (each layer to "
                     "the target) with ConstantSparsity(target, begin_step=0, frequency 10)"
                     + (" or PolynomialDecay(0 -> target over the same steps as our gradual)"
                        if "gradual" in b["schedules"] else "") + ", scored after strip_pruning.")
    else:
        lines.append(f"- {peer_note}.")
    if failed:
        lines.append(f"- **Did not finish**: {', '.join(failed)}; their missing results are blank below.")
    for model in b["models"]:  # what was planned and what is here
        planned = len(b["seeds"]) * len(targets) * sum(len(b["schedules"]) if n == "magnitude" else 1
                                                       for n in names)
        done = sum(1 for r in o if r["model"] == model and r["method"] != "baseline" and "accuracy" in r)
        peer_done = sum(1 for r in p if r["model"] == model and r["schedule"] in b["schedules"])
        peer_planned = len(b["seeds"]) * len(targets) * len(b["schedules"])
        lines.append(f"- {model}: {done} of our {planned} jobs and {peer_done} of TF-MOT's {peer_planned} have "
                     "results" + ("." if done == planned and (not peer or peer_done == peer_planned)
                                  else " (**incomplete**)."))
        dense = values(o, model=model, method="baseline", penalty="null")
        if dense and statistics.fmean(dense) < 0.5:
            lines.append(f"- **{model}'s baselines are not trained at this budget** ({pct(dense)}% test accuracy "
                         "after the baseline epochs): its accuracies below compare undertrained models, not "
                         "pruning methods; its FLOPs and latencies do not depend on training.")
    lines += ["", "### Accuracy after pruning and fine-tuning", "",
              "Test accuracy in %: the mean over seeds, then each seed's value in seed order. Baselines are "
              "each side's dense models before pruning.", "",
              "| model | method | schedule | " + " | ".join(f"target {t}" for t in targets) + " |",
              "|---|---|---|" + "---:|" * len(targets)]
    for model in b["models"]:
        for key in sorted({r["penalty"] for r in o if r["method"] == "baseline" and r["model"] == model}):
            label = "baseline" if key == "null" else f"baseline with {key}"
            lines.append(f"| {model} | {label} | dense | "
                         + " | ".join([pct(values(o, model=model, method="baseline", penalty=key))] * len(targets))
                         + " |")
        for name in names:
            for schedule in (b["schedules"] if name == "magnitude" else ["one_shot"]):
                cells = []
                for t in targets:
                    errors = [r["error"] for r in o if r.get("error") and r["model"] == model
                              and r["method"] == name and r["target"] == t]
                    cells.append(pct(values(o, model=model, method=name, schedule=schedule, target=t))
                                 if not errors else f"n/a: {errors[0][:80]}")
                lines.append(f"| {model} | {name} | {schedule} | " + " | ".join(cells) + " |")
        if p:
            lines.append(f"| {model} | TF-MOT baseline | dense | "
                         + " | ".join([pct(values(p, model=model, schedule="baseline"))] * len(targets)) + " |")
            for schedule in b["schedules"]:
                lines.append(f"| {model} | TF-MOT prune_low_magnitude | {PEER_SCHEDULES[schedule]} | "
                             + " | ".join(pct(values(p, model=model, schedule=schedule, target=t))
                                          for t in targets) + " |")
    if p:
        lines += ["", f"### Our magnitude pruning vs TF-MOT: within {MARGIN} points or better", "",
                  "Difference of the means over seeds (ours minus TF-MOT, points); per seed in brackets "
                  "(each side's seed s against the other's seed s). Each side prunes its own baseline, so the "
                  "last column compares the change from each side's own baseline (ours minus TF-MOT; negative: we "
                  "lost more), which takes the two baselines' difference out.", "",
                  "| model | ours vs TF-MOT | target | ours | TF-MOT | difference (pts) | target met "
                  "| baselines ours - TF-MOT (pts) | change from own baseline, ours - TF-MOT (pts) |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        verdicts = []
        for model in b["models"]:
            for schedule in b["schedules"]:
                peer_name = PEER_SCHEDULES[schedule]
                for t in targets:
                    ours_v = values(o, model=model, method="magnitude", schedule=schedule, target=t)
                    peer_v = values(p, model=model, schedule=schedule, target=t)
                    if not ours_v or not peer_v:
                        continue
                    diff = 100 * (statistics.fmean(ours_v) - statistics.fmean(peer_v))
                    per_seed = ", ".join(f"{100 * (a - c):+.2f}" for a, c in zip(ours_v, peer_v))
                    ok = diff >= -MARGIN - 1e-9
                    verdicts.append((model, schedule, t, ok, diff))
                    base_diff = 100 * (statistics.fmean(values(o, model=model, method="baseline", penalty="null"))
                                       - statistics.fmean(values(p, model=model, schedule="baseline")))
                    lines.append(f"| {model} | {schedule} vs {peer_name} | {t} | {pct(ours_v)} | {pct(peer_v)} "
                                 f"| {diff:+.2f} ({per_seed}) | {'pass' if ok else '**fail**'} "
                                 f"| {base_diff:+.2f} | {diff - base_diff:+.2f} |")
        failed = [v for v in verdicts if not v[3]]
        lines += ["", f"Passed {len(verdicts) - len(failed)} of {len(verdicts)}"
                  + (": " + "; ".join(f"{m} {s} {t}: {d:+.2f}" for m, s, t, _, d in failed) + " short."
                     if failed else ".")]
        scope = next((m.get("scope") for m in ours["meta"]["methods"] if m["name"] == "magnitude"), None)
        if scope == "global":
            lines += ["", "Not the same criterion: our magnitude method (scope=global) ranks all conv and dense "
                         "weights together, so most zeros go to the large dense layer, while TF-MOT prunes every "
                         "layer, the small convolutions included, to the target; `method.scope=layer` is the "
                         "like-for-like setting (not run here)."]
    lines += ["", "### Structured methods on vgg_bn: FLOPs and latency", "",
              "Methods whose result surgery shrinks (channels removed). MACs per example of the shrunk model "
              "against the dense one; latency: median of 30 (batch 1) and 10 (batch 256) forward passes of a "
              "tf.function, dense and shrunk timed alternately in the same job so that both see the same load. "
              "Means over seeds.", "",
              "| method | target | accuracy % | MACs dense | MACs shrunk | FLOPs ratio | latency b1 dense / "
              "pruned (ms) | speedup b1 | latency b256 dense / pruned (ms) | speedup b256 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    structured = [n for n in names if any(r.get("shrunk") and r["method"] == n and r["model"] == "vgg_bn"
                                          for r in o)]
    for name in structured:
        for t in targets:
            match = {"model": "vgg_bn", "method": name, "target": t, "shrunk": True}
            if not values(o, **match):
                continue
            f_dense, f_small = mean(o, "flops_dense", **match), mean(o, "flops_shrunk", **match)
            b1 = [mean(o, k, **match) for k in ("latency_ms_dense", "latency_ms_pruned")]
            b256 = [mean(o, k, **match) for k in ("latency_ms_dense_b256", "latency_ms_pruned_b256")]
            lines.append(f"| {name} | {t} | {pct(values(o, **match))} | {f_dense:,.0f} | {f_small:,.0f} "
                         f"| {f_dense / f_small:.2f}x | {b1[0]:.2f} / {b1[1]:.2f} | {b1[0] / b1[1]:.2f}x "
                         f"| {b256[0]:.1f} / {b256[1]:.1f} | {b256[0] / b256[1]:.2f}x |")
    ran = {r["method"] for r in o if r["model"] == "vgg_bn" and "accuracy" in r}
    unshrunk = [n for n in names if n not in structured and n in ran]
    lines += ["", f"Not shrunk, so not timed: {', '.join(unshrunk)} (their zeros stay in dense tensors: "
              "no fewer operations at inference)." if unshrunk else ""]
    if set(names) - ran:
        lines.append(f"No vgg_bn results: {', '.join(n for n in names if n not in ran)}.")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    args = parse()
    b = budget(args)
    node = OmegaConf.merge(OmegaConf.load(common.CONF / "data" / f"{b['data']}.yaml"),
                           {"limit": b["limit"], "download": False})
    source = build("data", node)
    try:
        source.source()  # finds the files, or says where they are missing
    except DataError as e:
        print(f"[real] real-data benchmark skipped: {' '.join(str(e).split())}", flush=True)
        return
    if args.part == "ours":
        run_ours(b, source, args.ours_json)
        return
    if args.render:  # the section again, from the results of a finished run
        ours = json.loads(Path(args.ours_json).read_text())
        run = ours["meta"]["run"]
        peer = json.loads(Path(args.peer_json).read_text()) if Path(args.peer_json).exists() else None
        peer, note, failed = (peer if run["peer"] else None), run["peer_note"], run["failed"]
        b = run["budget"]
    else:
        started, load_start = time.time(), "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
        peer, note, ours, failed = run_all(b, args)
        if not ours["rows"]:
            raise SystemExit(f"[real] no results: {', '.join(failed)} failed")
        run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "load_start": load_start,
               "load_end": "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()),
               "minutes": (time.time() - started) / 60, "budget": b, "peer": peer is not None,
               "peer_note": note, "failed": failed}
        ours["meta"]["run"] = run
        common.write(args.ours_json, ours["meta"], ours["rows"])
    body = markdown(b, ours, peer, note, run, source, failed)
    (REPO / SECTION).write_text(body)
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    put_section(out, TITLE, SECTION)
    print(f"[real] wrote {SECTION} and its section of {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
