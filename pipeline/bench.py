"""python -m pipeline.bench: measure the pipeline and write BENCHMARKS.md.

1. sweep: the default grid as one real sweep (baseline trained once, shared) against the same grid
   with the baseline retrained for every job (each job a single run into its own fresh store).
2. overhead: the shared sweep's wall time against the time of its model.fit calls, timed in-process.
3. structured: filter and slim at target 0.5 on vgg_bn: accuracy, FLOPs and latency, read from MLflow.

Every figure comes from commands printed in BENCHMARKS.md; rerun this module to reproduce them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["magnitude", "filter", "slim", "hybrid"]
QUICK_GRID = [0.3, 0.6, 0.9]
STRUCTURED = {"methods": ["filter", "slim"], "target": 0.5, "model": "vgg_bn"}
SPEED = "benchmarks/speed.md"  # section 4, written by bench_speed (also alone: --only speed)
STEP_ARGS = ["--models", "seed_cnn", "--seeds", "0", "--targets", "0.5", "--baseline-epochs", "2"]
STEP_ROUNDS = 3  # each side's step timing runs this many times, alternating, so both see the same load
STEP_THREADS = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}  # both sides: a sweep worker's
HOOKS = {"4. Speed: steps per compiled call, parallel jobs": SPEED,
         "TensorFlow Model Optimization peer": "benchmarks/peer.md",  # written by other modules
         "Study reproduction": "benchmarks/study.md",
         "Real data: Fashion-MNIST, every method, next to TF-MOT": "benchmarks/real.md",
         "Any Keras model: ResNet-20 and MobileNetV2, filter pruning on every coupled group": "benchmarks/models.md",
         "Beyond one machine: Ray workers, tracking server": "benchmarks/cluster.md"}


def default_grid() -> list[float]:
    """The sparsity targets of hydra.sweeper.params in conf/config.yaml."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(REPO / "conf" / "config.yaml").hydra.sweeper.params
    return [float(t) for t in str(params["sparsity.target"]).split(",")]


def seed() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO / "conf" / "config.yaml").seed)


def machine() -> dict[str, str]:
    """nproc, CPU model and library versions (read without importing TensorFlow here)."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    tf = next((version(p) for p in ("tensorflow-cpu", "tensorflow") if _installed(p)), "?")
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "tensorflow": tf, "keras": version("keras"), "mlflow": version("mlflow"),
            "platform": platform.platform(), "load": _load()}


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


def run(args: list[str], log: Path, env: dict | None = None) -> float:
    """Run a command (from the repo root), its output to `log`; return its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}; see {log}")
    return seconds


def pipeline_cmd(*overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *(["-m"] if multirun else []), *overrides]


def show(cmd: list[str], work: Path) -> str:
    """The command as a user types it, the temporary directory written <tmp>."""
    return " ".join(["python", *cmd[1:]]).replace(str(work), "<tmp>")


def runs(uri: str, include_baselines: bool = False) -> list:
    """All runs of the experiment `pruning` in the store at `uri` (job runs only, by default)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pruning")
    found = client.search_runs([exp.experiment_id], max_results=10000) if exp else []
    return [r for r in found if include_baselines or r.data.tags.get("kind") not in ("baseline", "sweep")]


# 1. shared baseline against retrained per job

def bench_sweep(grid: list[float], full: bool, work: Path) -> dict:
    shared = work / "shared"
    shared.mkdir()
    uri = f"sqlite:///{shared / 'mlflow.db'}"
    overrides = [f"method={','.join(METHODS)}", f"tracking.uri={uri}", f"hydra.sweep.dir={shared / 'sweep'}"]
    if not full:
        overrides.append(f"sparsity.target={','.join(str(t) for t in grid)}")
    cmd = pipeline_cmd(*overrides, multirun=True)
    print(f"[sweep] shared baseline: {len(METHODS) * len(grid)} jobs ...", flush=True)
    shared_s = run(cmd, work / "shared.log")
    jobs = [json.loads(line) for line in (shared / "sweep" / "jobs.jsonl").read_text().splitlines()]
    all_runs = runs(uri, include_baselines=True)
    baselines = [r for r in all_runs if r.data.tags.get("kind") == "baseline"]
    trained = {r.info.run_id for r in all_runs if r.data.tags.get("baseline_trained_here") == "true"}
    print(f"[sweep] shared: {shared_s:.1f}s ({len(baselines)} baselines trained)", flush=True)

    per_job_s, per_job_cmds = [], []
    for method in METHODS:
        for target in grid:
            store = work / f"job-{method}-{target}"
            store.mkdir()
            one = pipeline_cmd(f"method={method}", f"sparsity.target={target}",
                               f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                               f"hydra.run.dir={store / 'out'}")
            per_job_cmds.append(one)
            per_job_s.append(run(one, store / "run.log"))
            print(f"[sweep] retrained {method}-{target:.2f}: {per_job_s[-1]:.1f}s", flush=True)
    retrained_s = sum(per_job_s)
    print(f"[sweep] retrained per job: {retrained_s:.1f}s; shared is {retrained_s / shared_s:.2f}x faster",
          flush=True)
    return {"grid": grid, "full": full, "jobs": len(jobs), "cmd": show(cmd, work),
            "per_job_cmd": show(per_job_cmds[0], work),
            "shared_s": shared_s, "retrained_s": retrained_s, "ratio": retrained_s / shared_s,
            "job_seconds_sum": sum(j["seconds"] for j in jobs), "per_job_s": per_job_s,
            "trained_job_s": [j["seconds"] for j in jobs if j.get("run_id") in trained],
            "reused_job_s": [j["seconds"] for j in jobs if j.get("run_id") not in trained],
            "statuses": sorted({j["status"] for j in jobs}),
            "baselines": len(baselines),
            "per_job_mean_s": retrained_s / len(per_job_s)}


# 2. overhead: the sweep's wall time against its model.fit time

def training_seconds(grid: list[float]) -> dict:
    """Time, in this process, the model.fit calls the sweep makes (each distinct baseline once, then
    every job's fine-tuning) and the evaluate stage, with the same configs, data, models and seeds."""
    import keras
    import tensorflow as tf
    from hydra import compose, initialize_config_dir

    from pipeline import baseline
    from pipeline.config import identity, validate
    from pipeline.pruning.surgery import shrink
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.finetune import finetune
    from pipeline.stages.prune import prune
    from pipeline.stages.train import train_baseline

    out = {"baseline_fit_s": 0.0, "finetune_fit_s": 0.0, "evaluate_s": 0.0, "baselines": 0}
    trained: dict[str, list] = {}
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for method_name in METHODS:
            for target in grid:
                cfg = compose("config", overrides=[f"method={method_name}", f"sparsity.target={target}",
                                                   "tracking=none"])
                parts = validate(cfg)
                data = parts["data"].load(cfg.seed)
                method, schedule, spec, training = (parts[k] for k in
                                                    ("method", "sparsity", "model", "training"))
                keras.utils.set_random_seed(cfg.seed)
                if training.deterministic:
                    tf.config.experimental.enable_op_determinism()
                model = spec.build(data.input_shape, data.num_classes)
                key = baseline.stable_hash(baseline.baseline_spec(identity(cfg.seed, parts, data.digest),
                                                                   method.penalty(model)))
                if key not in trained:
                    start = time.perf_counter()
                    train_baseline(model, data, training.baseline, method)
                    out["baseline_fit_s"] += time.perf_counter() - start
                    out["baselines"] += 1
                    trained[key] = model.get_weights()
                else:
                    model.set_weights(trained[key])
                dense = model.get_weights()
                masked = prune(model, method, schedule.initial, cfg.seed)
                start = time.perf_counter()
                finetune(masked, data, training.finetune, method, schedule, cfg.seed)
                out["finetune_fit_s"] += time.perf_counter() - start
                masked.detach()
                start = time.perf_counter()
                small, kept = shrink(model)
                evaluate(model, data, dense_weights=dense, small_model=small if kept else None)
                out["evaluate_s"] += time.perf_counter() - start
                print(f"[overhead] {method_name}-{target:.2f} timed", flush=True)
    out["fit_s"] = out["baseline_fit_s"] + out["finetune_fit_s"]
    return out


def startup_seconds(work: Path) -> float:
    """Wall time of a fresh process that imports TensorFlow, Keras, MLflow, Hydra and the pipeline."""
    code = "import tensorflow, keras, mlflow, hydra, pipeline.run, pipeline.stages.evaluate"
    return run([sys.executable, "-c", code], work / "startup.log")


def bench_overhead(sweep: dict, work: Path) -> dict:
    print("[overhead] timing the fit calls in-process ...", flush=True)
    fits = training_seconds(sweep["grid"])
    startup = startup_seconds(work)
    ratio = sweep["shared_s"] / fits["fit_s"]
    print(f"[overhead] sweep {sweep['shared_s']:.1f}s / fit {fits['fit_s']:.1f}s = {ratio:.2f}x", flush=True)
    return {**fits, "startup_s": startup, "ratio": ratio}


# 3. structured pruning on vgg_bn

def bench_structured(work: Path) -> dict:
    store = work / "structured"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cmd = pipeline_cmd(f"method={','.join(STRUCTURED['methods'])}", f"model={STRUCTURED['model']}",
                       f"sparsity.target={STRUCTURED['target']}", f"tracking.uri={uri}",
                       f"hydra.sweep.dir={store / 'sweep'}", multirun=True)
    print("[structured] filter and slim on vgg_bn ...", flush=True)
    seconds = run(cmd, work / "structured.log")
    rows = []
    for r in sorted(runs(uri), key=lambda r: r.data.params["method.name"]):
        m = r.data.metrics
        rows.append({
            "method": r.data.params["method.name"], "target": float(r.data.params["sparsity.target"]),
            "baseline_acc": m["baseline/accuracy"], "acc": m["eval/accuracy"],
            "points_lost": 100 * (m["baseline/accuracy"] - m["eval/accuracy"]),
            "flops_dense": m["eval/flops_dense"],
            "flops_shrunk": m.get("eval/flops_shrunk", m["eval/flops_dense"]),  # absent: nothing removed
            "lat_dense_b1": m["eval/latency_ms_dense"], "lat_pruned_b1": m["eval/latency_ms_pruned"],
            "lat_dense_b256": m["eval/latency_ms_dense_b256"],
            "lat_pruned_b256": m["eval/latency_ms_pruned_b256"],
        })
        row = rows[-1]
        row["flops_ratio"] = row["flops_dense"] / row["flops_shrunk"]
        row["speedup_b1"] = row["lat_dense_b1"] / row["lat_pruned_b1"]
        row["speedup_b256"] = row["lat_dense_b256"] / row["lat_pruned_b256"]
        print(f"[structured] {row['method']}: acc {row['baseline_acc']:.4f} -> {row['acc']:.4f} "
              f"({row['points_lost']:+.2f} points lost), FLOPs {row['flops_ratio']:.2f}x fewer, latency "
              f"{row['speedup_b256']:.2f}x (b256) / {row['speedup_b1']:.2f}x (b1)", flush=True)
    return {"cmd": show(cmd, work), "seconds": seconds, "rows": rows}


# 4. speed: the step against TF-MOT's and Keras's, the default sweep against its training time

def bench_speed(work: Path) -> dict:
    """Side by side in this run: the fine-tuning step of seed_cnn on digits (ours masked, ours dense, plain
    Keras model.fit of the dense model; TF-MOT's pruning step and tf_keras's dense fit in the peer venv),
    alternating the two processes; then the default `make sweep` and the training time inside it."""
    peer_py = REPO / ".venv-peers" / "bin" / "python"
    steps: dict[str, list[dict]] = {"ours": [], "tfmot": []}
    for r in range(STEP_ROUNDS):
        for side, py in (("tfmot", peer_py), ("ours", Path(sys.executable))):
            if not py.exists():
                print(f"[speed] {py} missing (make {peer_py.parent.parent.name}): TF-MOT not timed", flush=True)
                continue
            out = work / f"step-{side}-{r}.json"
            run([str(py), "-m", f"pipeline.peers.{side}", *STEP_ARGS, "--out", str(out)], work / f"{out.stem}.log",
                STEP_THREADS)
            steps[side].append({row["schedule"]: row["step_ms"] for row in json.loads(out.read_text())["rows"]
                                if "step_ms" in row})
            print(f"[speed] {side} round {r + 1}: {steps[side][-1]}", flush=True)
    store = work / "speed"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cmd = pipeline_cmd("hydra/launcher=workers", f"method={','.join(METHODS)}", f"tracking.uri={uri}",
                       f"hydra.sweep.dir={store / 'sweep'}", multirun=True)
    print("[speed] the default sweep on the workers launcher ...", flush=True)
    load_before = _load()
    wall = run(cmd, work / "speed-sweep.log")
    from mlflow.tracking import MlflowClient

    client, found = MlflowClient(uri), runs(uri, include_baselines=True)
    jobs = [r for r in found if "time/finetune_seconds" in r.data.metrics]
    finetune_s = sum(r.data.metrics["time/finetune_seconds"] for r in jobs)
    baseline_s = sum(m.value for r in found if r.data.tags.get("kind") == "baseline"
                     for m in client.get_metric_history(r.info.run_id, "train/seconds"))
    print(f"[speed] sweep {wall:.1f}s; training in it {baseline_s + finetune_s:.1f}s", flush=True)
    return {"steps": steps, "sweep_s": wall, "jobs": len(jobs), "finetune_s": finetune_s, "baseline_s": baseline_s,
            "job_s": sum(r.data.metrics.get("time/job_seconds", 0) for r in jobs), "cmd": show(cmd, work),
            "load_before": load_before, "load_after": _load(), "cores": len(os.sched_getaffinity(0))}


def speed_markdown(speed: dict) -> str:
    import statistics

    def ms(side: str, schedule: str) -> float:
        values = [r[schedule] for r in speed["steps"][side] if schedule in r]
        return statistics.median(values) if values else float("nan")

    masked = {s: ms("ours", s) for s in ("one_shot", "gradual")}
    keras_fit, ours_dense = ms("ours", "keras_fit"), ms("ours", "dense")
    tfmot = {s: ms("tfmot", s) for s in ("one_shot", "gradual")}
    tf_keras = ms("tfmot", "dense")
    fit_s = speed["baseline_s"] + speed["finetune_s"]
    ratio = speed["sweep_s"] / fit_s
    rounds = len(speed["steps"]["ours"])
    lines = [f"Steps: seed_cnn on digits, fine-tuning batch 32 (conf/training/default.yaml), target 0.5; "
             f"`python -m pipeline.peers.tfmot {' '.join(STEP_ARGS)}` in .venv-peers and `python -m "
             f"pipeline.peers.ours` with the same arguments, run in turn {rounds} time(s) each (median "
             "of the runs): ms per training step = each epoch's training part (start of the epoch to the start "
             "of its validation) / its steps, median over epochs 2-15. Ours: masked fine-tuning as the pipeline "
             "runs it (pipeline.stages.finetune: an epoch per compiled call, with gradual magnitude's mask "
             "updates inside it; masks held inside every optimizer step; Adam's update fused); `keras_fit`: the "
             "same dense model with Keras as it comes (its own Adam, model.fit), same batch size. TF-MOT: "
             "prune_low_magnitude + UpdatePruningStep with tf_keras. Both processes run TensorFlow's oneDNN "
             f"kernels (TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}, gradients' kernels kept: "
             f"TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE={os.environ['TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE']}) on one "
             "TensorFlow thread (TF_NUM_INTRAOP_THREADS=TF_NUM_INTEROP_THREADS=1), as each worker of the sweep below "
             "does on 2 cores.", "",
             "| step | ms |", "|---|---:|",
             f"| ours masked, one_shot | {masked['one_shot']:.3f} |",
             f"| ours masked, gradual (masks recomputed every 10 steps over 60% of fine-tuning, in the loop) "
             f"| {masked['gradual']:.3f} |",
             f"| ours dense, fast path | {ours_dense:.3f} |",
             f"| Keras 3 as it comes (its Adam, model.fit), dense | {keras_fit:.3f} |",
             f"| TF-MOT pruning step, one_shot (ConstantSparsity) | {tfmot['one_shot']:.3f} |",
             f"| TF-MOT pruning step, gradual (PolynomialDecay) | {tfmot['gradual']:.3f} |",
             f"| tf_keras model.fit, dense | {tf_keras:.3f} |", "",
             "Each run's figures (ms, in the order they ran; the spread is the machine's load): " + "; ".join(
                 f"{side} {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
                 for i in range(rounds) for side in ("tfmot", "ours") if i < len(speed["steps"][side])
                 for r in [speed["steps"][side][i]]) + ".", ""]
    worst_tfmot = max(masked[s] / tfmot[s] for s in masked)
    worst_keras = max(masked[s] / keras_fit for s in masked)
    lines += ["| ratio | one_shot | gradual | target |", "|---|---:|---:|---|",
              f"| ours masked / TF-MOT (same schedule) | {masked['one_shot'] / tfmot['one_shot']:.2f}x "
              f"| {masked['gradual'] / tfmot['gradual']:.2f}x | <= 0.5x: {verdict(worst_tfmot <= 0.5)} |",
              f"| ours masked / plain Keras fit of the dense model | {masked['one_shot'] / keras_fit:.2f}x "
              f"| {masked['gradual'] / keras_fit:.2f}x | <= 0.5x: {verdict(worst_keras <= 0.5)} |", "",
              f"Sweep: the default `make sweep` ({speed['jobs']} jobs, workers launcher, {speed['cores']} cores, TF "
              "threads divided among the workers), into a fresh store:", "", f"    {speed['cmd']}", "",
              "Training time = the `model.fit`-equivalent time inside that very sweep, read from its runs: the "
              "baseline run's per-epoch `train/seconds` plus every job's `time/finetune_seconds` (the per-epoch "
              "times of fine-tuning, validation included). Jobs run in parallel, so this sum of the workers' "
              "training can exceed the wall time. The baseline trains while the workers start beside it (each "
              "imports MLflow at low priority): its time here is longer than alone, and counts as training.", "",
              "| part | seconds |", "|---|---:|",
              f"| sweep wall time (process start to report) | {speed['sweep_s']:.1f} |",
              f"| training inside it: baseline | {speed['baseline_s']:.1f} |",
              f"| training inside it: fine-tuning of {speed['jobs']} jobs | {speed['finetune_s']:.1f} |",
              f"| sum of the jobs' own times | {speed['job_s']:.1f} |",
              f"| **ratio sweep wall / training** | **{ratio:.2f}x** |", "",
              f"- Sweep wall / training <= 1.15x: {verdict(ratio <= 1.15)}.",
              f"- The default sweep under 90 s on 2 cores: {verdict(speed['sweep_s'] < 90)} "
              f"({speed['sweep_s']:.0f} s).",
              f"- Load average (1 / 5 / 15 min) before the sweep: {speed['load_before']}; after: "
              f"{speed['load_after']}. The machine was shared with other work while this ran: a load above "
              f"{speed['cores']} means fewer cores than counted were ours, so absolute seconds are inflated; "
              "the ratios are measured side by side in this one run."]
    return "\n".join(lines) + "\n"


def put_section(path: Path, title: str, rel: str) -> None:
    """Replace the hooked section `rel` between its markers in path (or append it), leaving the rest."""
    begin, end = f"<!-- begin: {rel} -->", f"<!-- end: {rel} -->"
    block = f"{begin}\n## {title}\n\n{(REPO / rel).read_text().rstrip()}\n\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)


# BENCHMARKS.md

def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(info: dict, argv: list[str], sweep: dict | None, overhead: dict | None,
             structured: dict | None) -> str:
    lines = ["# Benchmarks", "",
             f"Generated by `python -m pipeline.bench {' '.join(argv)}` "
             f"(= `make bench ARGS=\"{' '.join(argv)}\"`) "
             f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Rerun it to reproduce every figure; "
             "each store is a fresh temporary directory. Timings are wall-clock on a shared machine, so "
             "compare the ratios (measured side by side in one run) rather than the absolute seconds.", "",
             "## Machine", "",
             f"- nproc: {info['nproc']}; CPU: {info['cpu']}; {info['platform']}",
             f"- Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}, "
             f"MLflow {info['mlflow']}",
             f"- load average (1 / 5 / 15 min) at start: {info.get('load', '?')}; at the end: {_load()} "
             f"(the machine is shared: a load above {info['nproc']} means other work competed for the cores)",
             f"- seed: {info['seed']} (the config's top-level `seed`; it drives data split, initialisation "
             "and pruning); data `digits`, `training=default`, environment TF_CPP_MIN_LOG_LEVEL="
             f"{os.environ['TF_CPP_MIN_LOG_LEVEL']}, TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}", ""]
    if info.get("note"):  # set by hand in results.json when a report is re-rendered from partial runs
        lines += [f"> **Note.** {info['note']}", ""]
    if sweep:
        grid = ",".join(f"{t:g}" for t in sweep["grid"])
        n, done = sweep["jobs"], len(sweep["per_job_s"])
        retrained = sweep["retrained_s"] if done == n else sum(sweep["per_job_s"]) / done * n
        ratio = retrained / sweep["shared_s"]
        measured = ", ".join(f"{x:.0f}" for x in sweep["per_job_s"])
        label = (f"{n} runs, mean {retrained / n:.1f} s each" if done == n else
                 f"**extrapolated** from the first {done} of {n} runs: {measured} s")
        # the same comparison without per-job process starts: what a baseline costs inside the sweep
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        per_baseline = mean(sweep["trained_job_s"]) - mean(sweep["reused_job_s"])
        est = sweep["shared_s"] + (n - sweep["baselines"]) * per_baseline
        estimate = [f"| in the shared sweep: job that trained the baseline minus the mean job that reused it "
                    f"(jobs.jsonl) | {per_baseline:.1f} |",
                    f"| estimate without process starts: shared + {n - sweep['baselines']} more baselines "
                    f"| {est:.1f} |",
                    f"| **ratio of that estimate / shared** | **{est / sweep['shared_s']:.2f}x** |"]
        lines += ["## 1. Shared baseline against a baseline retrained per job", "",
                  f"Grid: methods {','.join(METHODS)} x sparsity.target {grid} = "
                  f"{len(METHODS) * len(sweep['grid'])} jobs on seed_cnn "
                  f"({'the full default grid' if sweep['full'] else '`--quick`: a reduced grid'}).",
                  "", "Shared (one real sweep; the baseline is trained once per distinct baseline config and "
                  "reused from `<store>/baselines/`):", "", f"    {sweep['cmd']}", "",
                  "Retrained per job (every job a single run into its own fresh store, so its baseline "
                  "cache is empty; one line per job, run one after the other):", "",
                  f"    {sweep['per_job_cmd']}", "",
                  "| | wall time (s) |", "|---|---:|",
                  f"| shared baseline (one sweep, {sweep['jobs']} jobs, {sweep['baselines']} baseline(s) "
                  "trained) "
                  f"| {sweep['shared_s']:.1f} |",
                  f"| baseline retrained per job ({label}) | {retrained:.1f} |",
                  f"| **ratio retrained / shared** | **{ratio:.2f}x** |", *estimate, "",
                  f"Target >= 2x: {verdict(ratio >= 2)}. The baseline cache key is the config that "
                  "determines the dense model (data, model, baseline training, seed, and a method's "
                  "training-time penalty: `slim` adds an L1 penalty on BatchNorm scales, so on a model with "
                  "BatchNorm it gets its own baseline). The per-job side also pays a process "
                  "start per job (see section 2); that is part of what a sweep without a shared baseline "
                  "and without a single process costs.", ""]
    if sweep and not overhead:
        lines += ["## 2. Overhead of the sweep over pure training", "",
                  "**Not measured in this run** (the in-process model.fit timing did not run). What the "
                  f"sweep log shows: the sweep took {sweep['shared_s']:.1f} s, of which "
                  f"{sweep['shared_s'] - sweep['job_seconds_sum']:.1f} s outside the jobs (process start, "
                  "importing TensorFlow, validating every job, loading the data, the final report).", ""]
    if overhead and sweep:
        fit, rest = overhead["fit_s"], sweep["shared_s"] - overhead["fit_s"]
        lines += ["## 2. Overhead of the sweep over pure training", "",
                  "Pure training time = the wall time of the `model.fit` calls the sweep makes, timed in "
                  "this process with the same configs, data, models, seeds and budgets: each distinct "
                  "baseline once (40 epochs) plus every job's fine-tuning (15 epochs, masks held in the "
                  "step). `model.fit` includes its per-epoch validation pass and the first epoch's graph "
                  "tracing. The sweep's wall time includes everything else: process start and imports, Hydra "
                  "composition and validation of every job, MLflow runs (params, "
                  "per-epoch metrics, artifacts: masks, layers.csv, the saved models), loading the cached "
                  "baseline, pruning, evaluation (test accuracy, sparsity, FLOPs, gzip size, latency timing "
                  "of dense and pruned models at batch 1 and 256) and the final report with plots.", "",
                  "| part | seconds |", "|---|---:|",
                  f"| sweep wall time | {sweep['shared_s']:.1f} |",
                  f"| model.fit: {overhead['baselines']} baseline(s) | {overhead['baseline_fit_s']:.1f} |",
                  f"| model.fit: fine-tuning of {sweep['jobs']} jobs | {overhead['finetune_fit_s']:.1f} |",
                  f"| **model.fit total** | **{fit:.1f}** |",
                  f"| sweep time not in model.fit | {rest:.1f} |",
                  f"| of which, measured separately: evaluate stage ({sweep['jobs']} jobs, in-process) "
                  f"| {overhead['evaluate_s']:.1f} |",
                  f"| of which, measured separately: one process start + imports (once per sweep) "
                  f"| {overhead['startup_s']:.1f} |",
                  f"| sum of the jobs' own times (jobs.jsonl) | {sweep['job_seconds_sum']:.1f} |",
                  f"| **ratio sweep / model.fit** | **{overhead['ratio']:.2f}x** |", "",
                  f"Target <= 1.3x: {verdict(overhead['ratio'] <= 1.3)}. The sweep time outside the jobs "
                  f"(start-up, validating every job, the report) is "
                  f"{sweep['shared_s'] - sweep['job_seconds_sum']:.1f} s; the rest of the gap is inside the "
                  "jobs (evaluation with latency timing as measured above, then MLflow logging and model "
                  "saving).",
                  ""]
    if structured:
        t = STRUCTURED["target"]
        lines += [f"## 3. Structured pruning on vgg_bn (digits, training=default, target {t})", "",
                  f"    {structured['cmd']}",
                  "", "Read back with MlflowClient from the runs (params `method.name`, `sparsity.target`; "
                  "metrics `baseline/accuracy`, `eval/accuracy`, `eval/flops_dense`, `eval/flops_shrunk`, "
                  "`eval/latency_ms_dense(_b256)`, `eval/latency_ms_pruned(_b256)`). Latency is the median "
                  "of 30 timed forward passes of a tf.function, measured inside the job on the dense model "
                  "and on the physically shrunk model, timed alternately so both see the same load; FLOPs are "
                  "multiply-accumulates per example. Points lost are against each run's own baseline (slim's "
                  "is trained with its L1 penalty on BatchNorm scales). At batch 1 these models are so small "
                  "that the fixed cost of one call dominates, so fewer FLOPs barely change latency there.", "",
                  "| method | baseline acc | fine-tuned acc | points lost | MACs dense | MACs shrunk "
                  "| FLOPs ratio | latency b1 dense/pruned (ms) | speedup b1 "
                  "| latency b256 dense/pruned (ms) | speedup b256 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in structured["rows"]:
            lines.append(f"| {r['method']} | {r['baseline_acc']:.4f} | {r['acc']:.4f} "
                         f"| {r['points_lost']:.2f} "
                         f"| {r['flops_dense']:,.0f} | {r['flops_shrunk']:,.0f} | {r['flops_ratio']:.2f}x "
                         f"| {r['lat_dense_b1']:.3f} / {r['lat_pruned_b1']:.3f} | {r['speedup_b1']:.2f}x "
                         f"| {r['lat_dense_b256']:.2f} / {r['lat_pruned_b256']:.2f} "
                         f"| {r['speedup_b256']:.2f}x |")
        lines += ["", "Targets (each method): >= 2x fewer FLOPs, >= 1.5x lower latency, <= 1 point "
                  "accuracy lost.", ""]
        for r in structured["rows"]:
            lines.append(f"- {r['method']}: FLOPs {verdict(r['flops_ratio'] >= 2)}; latency b256 "
                         f"{verdict(r['speedup_b256'] >= 1.5)}, b1 {verdict(r['speedup_b1'] >= 1.5)}; "
                         f"accuracy {verdict(r['points_lost'] <= 1)}")
        lines.append("")
    for title, rel in HOOKS.items():  # sections written by other modules, included verbatim
        lines += [f"<!-- begin: {rel} -->", f"## {title}", ""]
        path = REPO / rel
        body = path.read_text().rstrip() if path.exists() else f"Not run: `{rel}` does not exist."
        lines += [body, ""]
        lines += [f"<!-- end: {rel} -->", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sparsity grid {QUICK_GRID}, not the default")
    parser.add_argument("--out", default="BENCHMARKS.md", help="the report's path (default BENCHMARKS.md)")
    parser.add_argument("--only", choices=["sweep", "structured", "speed"],
                        help="run one part only (speed: only its section of the report is rewritten)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores and logs")
    parser.add_argument("--render", metavar="DIR",
                        help="only rewrite the report from a work dir kept by --keep")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.render and args.only == "speed":  # section 4 alone, from a work dir kept by --only speed --keep
        (REPO / SPEED).write_text(speed_markdown(json.loads((Path(args.render) / "speed.json").read_text())))
        put_section(Path(args.out) if Path(args.out).is_absolute() else REPO / args.out,
                    next(t for t, rel in HOOKS.items() if rel == SPEED), SPEED)
        return
    if args.render:  # re-render from a kept work dir, e.g. once benchmarks/peer.md exists
        saved = json.loads((Path(args.render) / "results.json").read_text())
        write(Path(args.out), markdown(saved["info"], saved["argv"], *saved["results"]))
        return
    info = {**machine(), "seed": seed()}
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"[bench] work dir {work}", flush=True)
    sweep = overhead = structured = None
    try:
        if args.only in (None, "sweep"):
            grid = QUICK_GRID if args.quick else default_grid()
            sweep = bench_sweep(grid, not args.quick, work)
            overhead = bench_overhead(sweep, work)
        if args.only in (None, "structured"):
            structured = bench_structured(work)
        if args.only in (None, "speed"):
            speed = bench_speed(work)
            (work / "speed.json").write_text(json.dumps(speed, indent=1))
            (REPO / SPEED).write_text(speed_markdown(speed))
            print(f"[bench] wrote {REPO / SPEED}", flush=True)
        saved = {"info": info, "argv": argv, "results": [sweep, overhead, structured]}
        (work / "results.json").write_text(json.dumps(saved, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    if args.only == "speed":
        put_section(out, next(t for t, rel in HOOKS.items() if rel == SPEED), SPEED)
        print(f"[bench] wrote its section of {out}")
        return
    write(out, markdown(info, argv, sweep, overhead, structured))


def write(out: Path, text: str) -> None:
    out = out if out.is_absolute() else REPO / out
    out.write_text(text)
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
