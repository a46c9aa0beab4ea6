"""python -m pipeline.bench_cluster (part of `make bench`): the same 8-job sweep on Hydra's basic launcher
and on a Ray cluster of 2 workers (a head started here on 127.0.0.1), and what a remote tracking server
(`mlflow server` on 127.0.0.1, artifacts proxied) costs per job against local sqlite. Each sweep gets a
fresh store, so each trains its baseline once. Writes benchmarks/cluster.md and .json."""

from __future__ import annotations

import argparse
import json
import os
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

from pipeline.sweep import read_results

REPO = Path(__file__).resolve().parents[1]
TARGETS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"  # 8 jobs
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
def service(cmd: list[str], port: int, what: str, env: dict | None = None):
    """A server process in its own session, listening on 127.0.0.1:port; its group is ended afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        _wait_port(port, what, proc)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ray_head(tmp: Path):
    port, bin_dir = _port(), Path(sys.executable).parent
    return service([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={tmp / 'ray-head'}"], port, "ray head", env=LOOPBACK_RAY)


def mlflow_server(tmp: Path):
    port = _port()
    return service([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                    str(port), "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--serve-artifacts",
                    "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
                   port, "mlflow server", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def sweep(name: str, tmp: Path, args: list[str], env: dict | None = None) -> dict:
    """One sweep from a folder of its own: wall time, and the jobs' own times (jobs.jsonl)."""
    work = tmp / name
    work.mkdir()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipeline.run", "-m", f"sparsity.target={TARGETS}",
           f"hydra.sweep.dir={work}/multirun", *args]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=full_env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    jobs = read_results(work / "multirun" / "jobs.jsonl")
    seconds = [j["seconds"] for j in jobs]
    print(f"[{name}] {wall:.1f}s for {len(jobs)} jobs", flush=True)
    return {"wall_s": round(wall, 1), "jobs": len(jobs), "job_s_median": round(statistics.median(seconds), 2),
            "job_s_sum": round(sum(seconds), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smoke training budget")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "cluster.md"))
    args, _ = ap.parse_known_args()  # `make bench ARGS=...` also carries pipeline.bench's options
    training = ["training=smoke"] if args.quick else []
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        store = lambda name: [f"tracking.uri=sqlite:///{tmp}/{name}.db"]  # noqa: E731
        res = {"basic": sweep("basic", tmp, [*training, *store("basic")])}
        with ray_head(tmp) as address:
            res["ray"] = sweep("ray", tmp, [*training, *store("ray"), "hydra/launcher=ray"],
                               {"RAY_ADDRESS": address, **LOOPBACK_RAY})
        with mlflow_server(tmp) as address:
            res["server"] = sweep("server", tmp, [*training, "tracking=server", f"tracking.uri=http://{address}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    speedup = res["basic"]["wall_s"] / res["ray"]["wall_s"]
    overhead = res["server"]["job_s_median"] - res["basic"]["job_s_median"]
    lines = [
        "# Beyond one machine (python -m pipeline.bench_cluster)", "",
        f"8 jobs (magnitude, sparsity {TARGETS}), {'training=smoke' if args.quick else 'training=default'}, "
        f"on {os.cpu_count()} cores; each sweep a fresh store (one baseline trained).", "",
        "| sweep | wall (s) | median job (s) | sum of jobs (s) |", "|---|---|---|---|",
        *(f"| {label} | {res[k]['wall_s']} | {res[k]['job_s_median']} | {res[k]['job_s_sum']} |"
          for k, label in (("basic", "basic launcher, sqlite"), ("ray", "Ray, 2 workers, sqlite"),
                           ("server", "basic launcher, tracking server"))),
        "", f"- Ray with 2 workers vs the basic launcher: {speedup:.2f}x faster (target >= 1.6x).",
        f"- Tracking server vs local sqlite: {overhead:+.2f}s per job (median job time, process start excluded).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({**res, "ray_speedup": round(speedup, 2),
                                                               "server_overhead_s": round(overhead, 2)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
