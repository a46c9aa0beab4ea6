"""python -m pipeline.bench_cluster (part of `make bench`): the same 8-job sweep on Hydra's basic launcher
and on a Ray cluster of 2 workers (a head started here on 127.0.0.1), and what a remote tracking server
(`mlflow server` on 127.0.0.1, artifacts proxied) costs per job against local sqlite. Each sweep gets a
fresh store, so each trains its baseline once. Writes benchmarks/cluster.md and .json."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import tracking
from pipeline.bench import STEP_THREADS as ONE_THREAD
from pipeline.sweep import read_results

REPO = Path(__file__).resolve().parents[1]
TARGETS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"  # 8 jobs
# Jobs of about half a minute, what a cluster is for: with the default budget's 2-3 s jobs a sweep is mostly
# its fixed costs (start, the one baseline, the report), which no launcher divides among workers
BUDGET = "training=default training.finetune.epochs=300"
SECTION = "benchmarks/cluster.md"  # hooked into BENCHMARKS.md (pipeline.bench.HOOKS)
# Ray on loopback only (else it swaps 127.0.0.1 for the machine's network address), no token to share
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, what: str, proc, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}")


@contextmanager
def service(cmd: list[str], port: int, what: str, env: dict | None = None, stop: int = signal.SIGTERM):
    """A server process in its own session, listening on 127.0.0.1:port; its group is ended afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        _wait_port(port, what, proc)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, stop)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ray_head(tmp: Path):
    port, bin_dir = _port(), Path(sys.executable).parent
    return service([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={tmp / 'ray-head'}"], port, "ray head", env=LOOPBACK_RAY,
                   stop=signal.SIGKILL)  # the head, its daemons and workers at once (a graceful stop takes 35 s)


def mlflow_server(tmp: Path):
    port = _port()
    return service([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                    str(port), "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--serve-artifacts",
                    "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
                   port, "mlflow server", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def sweep(name: str, tmp: Path, args: list[str], env: dict | None = None) -> dict:
    """One sweep from a folder of its own into a fresh sqlite store (its baseline trained once): wall time,
    the jobs' own times (jobs.jsonl), where the time went (phases()) and the worker processes."""
    work = tmp / name
    (work / "store").mkdir(parents=True)
    if not any(a.startswith("tracking") for a in args):  # its own folder: baselines are cached beside the db
        args = [*args, f"tracking.uri=sqlite:///{work}/store/mlflow.db"]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipeline.run", "-m", f"sparsity.target={TARGETS}",
           f"hydra.sweep.dir={work}/multirun", *args]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=full_env)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    jobs = read_results(work / "multirun" / "jobs.jsonl")
    seconds = [j["seconds"] for j in jobs]
    res = {"wall_s": round(end - start, 1), "jobs": len(jobs), "job_s_median": round(statistics.median(seconds), 2),
           "job_s_sum": round(sum(seconds), 1), "load_before": round(load, 1),
           "load_after": round(os.getloadavg()[0], 1)}
    uri = next((a.split("=", 1)[1] for a in args if a.startswith("tracking.uri=sqlite")), None)
    if uri:
        res |= phases(uri, start, end)
    for key, pattern in (("ray_connect_s", r"connected in ([\d.]+)s"), ("preload_s", r"preloaded in ([\d.]+)s")):
        found = [float(x) for x in re.findall(pattern, proc.stdout + proc.stderr)]
        if found:
            res[key] = max(found)
    print(f"[{name}] {res}", flush=True)
    return res


def phases(uri: str, start: float, end: float) -> dict:
    """Where a sweep's time went, from its runs' clocks: `start` until the first job's run opens (interpreter,
    validation, Ray's connection, workers, TensorFlow), `baseline` until the baseline's run ends (trained by
    the first job, or on Ray by a worker as the sweep starts; the jobs that need it wait), `jobs` until the
    last job's run ends, `end` the report; and how many processes ran jobs."""
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    jobs = [r for r in runs if r.data.tags.get("config_hash")]
    (baseline,) = [r for r in runs if r.data.tags.get("kind") == "baseline"]
    first, trained = min(r.info.start_time for r in jobs) / 1000, baseline.info.end_time / 1000
    last = max(r.info.end_time for r in jobs) / 1000
    return {"phases_s": {"start": round(first - start, 1), "baseline": round(trained - first, 1),
                         "jobs": round(last - trained, 1), "end": round(end - last, 1)},
            "processes": len({r.data.tags["pid"] for r in jobs})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smoke training budget")
    ap.add_argument("--budget", default=BUDGET, help=f"the jobs' budget as overrides (default {BUDGET!r}; "
                    "without --quick)")
    ap.add_argument("--repeats", type=int, default=2, help="basic and Ray sweeps, alternating (default 2 each)")
    ap.add_argument("--out", default=str(REPO / SECTION))
    args, _ = ap.parse_known_args()  # `make bench ARGS=...` also carries pipeline.bench's options
    budget = "training=smoke" if args.quick else args.budget
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    runs: dict[str, list] = {"basic": [], "ray": []}
    try:
        # The head runs through every basic and Ray sweep alike (its idle daemons load both), started before
        # any, as a team's cluster would be: a sweep joins it with RAY_ADDRESS.
        with ray_head(tmp) as address:
            for i in range(args.repeats):
                runs["basic"].append(sweep(f"basic-{i}", tmp, budget.split()))
                runs["ray"].append(sweep(f"ray-{i}", tmp, [*budget.split(), "hydra/launcher=ray"],
                                         {"RAY_ADDRESS": address, **LOOPBACK_RAY}))
        # The store's cost apart from TensorFlow's threads: both on one thread, so the server has a core too
        one = sweep("basic-1thread", tmp, budget.split(), ONE_THREAD)
        with mlflow_server(tmp) as address:
            server = sweep("server", tmp, [*budget.split(), "tracking=server", f"tracking.uri=http://{address}"],
                           ONE_THREAD)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    speedup = median["basic"] / median["ray"]
    pairs = [b["wall_s"] / r["wall_s"] for b, r in zip(runs["basic"], runs["ray"])]
    overhead = server["job_s_median"] - one["job_s_median"]
    write(args.out, budget, runs, one, server, speedup, pairs, overhead)
    if Path(args.out).resolve() == REPO / SECTION:  # make bench: its section of BENCHMARKS.md too
        from pipeline.bench import HOOKS, put_section

        put_section(REPO / "BENCHMARKS.md", next(t for t, rel in HOOKS.items() if rel == SECTION), SECTION)


def write(out: str, budget: str, runs: dict, one: dict, server: dict, speedup: float, pairs: list,
          overhead: float) -> None:
    label = {"basic": "basic launcher", "ray": "Ray, 2 workers"}
    rows = [(f"{label[k]} #{i + 1}", r) for i in range(len(runs["basic"])) for k in ("basic", "ray")
            for r in [runs[k][i]]]
    rows += [("basic launcher, one TensorFlow thread", one), ("basic launcher, one thread, tracking server", server)]
    cell = lambda r, k: str(r.get("phases_s", {}).get(k, ""))  # noqa: E731
    lines = [
        f"Generated by `python -m pipeline.bench_cluster` (run by `make bench`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: 8 jobs (magnitude, sparsity {TARGETS}), "
        f"`{budget}`, on {os.cpu_count()} cores; each sweep into a fresh "
        "sqlite store (its baseline trained once), basic and Ray alternating; a Ray head (2 CPUs) on 127.0.0.1 "
        "started before them and running through all of them.", "",
        "Phases (s, from the runs' own clocks): start, until the first job's run opens (interpreter, validation of "
        "every job, Ray's connection and workers); baseline, until the baseline's run ends (on the basic launcher "
        "the first job trains it; on Ray a worker starts on it before the jobs, while the sweep opens its parent run, "
        "and the jobs that need it wait); jobs, until the last job's run ends; end, the report and the exit. "
        "Processes: how many ran jobs.", "",
        "| sweep | wall (s) | start | baseline | jobs | end | median job (s) | processes | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {name} | {r['wall_s']} | {cell(r, 'start')} | {cell(r, 'baseline')} | {cell(r, 'jobs')} | "
          f"{cell(r, 'end')} | {r['job_s_median']} | {r.get('processes', '')} | {r['load_before']} -> "
          f"{r['load_after']} |" for name, r in rows),
        "", f"- Ray with 2 workers vs the basic launcher: {speedup:.2f}x faster (median wall times; per pair "
        f"{', '.join(f'{p:.2f}x' for p in pairs)}; target >= 1.6x).",
        f"- Against the basic launcher on one TensorFlow thread (TF_NUM_INTRAOP_THREADS=TF_NUM_INTEROP_THREADS=1, "
        f"faster on this small model than its default of every core), Ray is "
        f"{one['wall_s'] / statistics.median(r['wall_s'] for r in runs['ray']):.2f}x faster.",
        f"- Tracking server vs local sqlite: {overhead:+.2f}s per job (median job time, process start excluded; "
        "both on one TensorFlow thread, so the server has a core of its own).",
    ]
    phase = lambda kind, key: statistics.median(r["phases_s"][key] for r in runs[kind])  # noqa: E731
    if all("phases_s" in r for r in runs["basic"] + runs["ray"]):
        fixed = {k: sum(phase(k, p) for p in ("start", "baseline", "end")) for k in runs}
        job = {k: statistics.median(r["job_s_median"] for r in runs[k]) for k in runs}
        slower, faster = job["ray"] / job["basic"], phase("basic", "jobs") / phase("ray", "jobs")
        lines.append(f"- Where it goes (medians): the jobs phase is {faster:.2f}x faster on Ray, whose jobs each "
                     f"take {slower:.2f}x as long as the basic launcher's (Ray: two at once on 2 cores, one "
                     f"TensorFlow thread each; basic: one at a time, TensorFlow's default threads, every core for one "
                     f"process, which on a model this small is slower than one thread: see README, Speed); the fixed "
                     f"costs, which no launcher divides (start, the baseline that jobs wait for, the report), are "
                     f"{fixed['basic']:.1f}s on the basic launcher and "
                     f"{fixed['ray']:.1f}s on Ray. The longer the jobs, the closer the whole sweep's ratio comes to "
                     "the jobs phase's.")
    ray = runs["ray"]
    if all("preload_s" in r for r in ray):
        each = lambda key: ", ".join(str(r[key]) for r in ray)  # noqa: E731
        lines.append(f"- Ray's fixed costs per sweep: connecting to the head {each('ray_connect_s')}s; each worker's "
                     f"start (TensorFlow and the job's modules imported; the slower of the 2) {each('preload_s')}s, "
                     "while the sweep validates its jobs.")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps({**runs, "basic_1thread": one, "server": server,
                                                          "ray_speedup": round(speedup, 2),
                                                          "pairs": [round(p, 2) for p in pairs],
                                                          "server_overhead_s": round(overhead, 2)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
