"""python -m pipeline.ui: print the links to an experiment's runs and its newest sweep, then serve the MLflow UI.

    python -m pipeline.ui [--uri URI] [--experiment pruning] [--port 5000]

The store is --uri, else MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db; it must exist (no
store or no such experiment: one line, exit status 2). The links open MLflow's model-training view
(workflowType=machine_learning): MLflow 3's UI otherwise opens an experiment in its GenAI traces view.

The runs link opens a saved view of the experiment (the experiment tag mlflow.sharedViewState.<id>, listed
under *Views* in the UI): the job runs, best eval/accuracy first, with the key metrics and params as
columns; the charts link opens its chart tab, accuracy and speed-up against sparsity first. A URL alone can
filter and sort MLflow's runs table but not choose its columns or charts; where the view cannot be saved
(a read-only store) the links carry the filter and the order only. The sweep link opens the newest sweep's
parent run on its Model metrics tab: the frontier/<method>/* series, step = sparsity in per mille.

A sqlite store is served by `mlflow server` on 127.0.0.1 only, with one worker and MLflow's job execution
off (about 0.5 GB instead of 2.5 GB), in the foreground: Ctrl-C stops it, and the server never outlives
this process. For a tracking server (http(s)://) the links point at that server and nothing is started.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import quote, urlencode

from pipeline import tracking
from pipeline.config import ConfigError

HOST = "127.0.0.1"
VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow's saved views: experiment tags, the id after the prefix
VIEW_ID = "pipeline-jobs"
VIEW_NAME = "Jobs: key metrics (make ui)"
JOBS_FILTER = "tags.method IS NOT NULL"  # every job run (failed ones too); not the sweeps, not the baselines
ORDER_BY = "metrics.`eval/accuracy`"
METRICS = ["eval/accuracy", "eval/sparsity", "eval/speedup_theoretical", "baseline/accuracy", "eval/compression",
           "eval/latency_ms_pruned"]
PARAMS = ["method.name", "sparsity.target", "sparsity.name", "model.name", "seed"]
CHARTS = [("eval/sparsity", "eval/accuracy"), ("eval/sparsity", "eval/speedup_theoretical")]  # (x, y)


def column(kind: str, key: str) -> str:
    """A runs-table column as MLflow's UI names it: metrics.`eval/accuracy`, params.`method.name`."""
    return f"{kind}.`{key}`"


def view_state() -> dict:
    """What the runs page shows, as MLflow's saved views hold it (search facets and UI state): the jobs,
    best eval/accuracy first, the method and target, then the key metrics (wide enough for their digits),
    then the rest of the params; its chart tab starts with accuracy and speed-up against sparsity (one
    point per job, all jobs, not only MLflow's default first ten)."""
    metrics = [column("metrics", m) for m in METRICS]
    params = [column("params", p) for p in PARAMS]
    section = f"{VIEW_ID}-charts"
    charts = [{"uuid": f"{VIEW_ID}-{x}-{y}".replace("/", "-"), "type": "SCATTER", "metricSectionId": section,
               "runsCountToCompare": 1000, "deleted": False, "isGenerated": False,
               "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}} for x, y in CHARTS]
    return {"searchFilter": JOBS_FILTER, "orderByKey": ORDER_BY, "orderByAsc": False,
            "selectedColumns": metrics + params,
            "columnOrder": params[:2] + metrics + params[2:] + ["duration"],
            "columnWidths": {m: 150 for m in metrics},
            "runsHiddenMode": "SHOW_ALL",
            "compareRunSections": [{"uuid": section, "name": "Against sparsity (one point per job)", "display": True,
                                    "isReordered": False, "deleted": False, "isGenerated": False}],
            "compareRunCharts": charts}


def save_view(client, exp_id: str, uri: str) -> str | None:
    """The id of the saved view of the jobs (written once per content; older versions of it removed), or
    None if the store cannot take it."""
    if not tracking.writable(uri):
        print("note: the store is read-only, so the runs view cannot be saved: pick the columns under Columns",
              file=sys.stderr)
        return None
    state = json.dumps(view_state(), sort_keys=True)
    view_id = f"{VIEW_ID}-{hashlib.sha256(state.encode()).hexdigest()[:8]}"
    try:
        tags = client.get_experiment(exp_id).tags
        if VIEW_PREFIX + view_id not in tags:
            now = int(time.time() * 1000)
            envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": state}
            client.set_experiment_tag(exp_id, VIEW_PREFIX + view_id, json.dumps(envelope))
        for key in tags:
            if key.startswith(f"{VIEW_PREFIX}{VIEW_ID}-") and key != VIEW_PREFIX + view_id:
                client.delete_experiment_tag(exp_id, key)
    except Exception as e:  # a read-only store, a server that refuses: the plain link still works
        print(f"note: could not save the runs view ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
              "pick the columns under Columns", file=sys.stderr)
        return None
    return view_id


def runs_link(base: str, exp_id: str, view_id: str | None, charts: bool = False) -> str:
    """The experiment's runs page in the model-training view: the saved view, else its filter and order."""
    query = {"workflowType": "machine_learning"}
    if view_id:
        query["viewStateShareKey"] = view_id  # the view's facets apply only if the URL has none of its own
    else:
        query.update(searchFilter=JOBS_FILTER, orderByKey=ORDER_BY, orderByAsc="false")
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{base}/#/experiments/{exp_id}/runs?{urlencode(query, quote_via=quote)}"


def run_link(base: str, exp_id: str, run_id: str, tab: str = "model-metrics") -> str:
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}/{tab}?workflowType=machine_learning"


def newest_sweep(client, exp_id: str):
    runs = client.search_runs([exp_id], "tags.kind = 'sweep'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def server_command(uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", HOST, "--port", str(port), "--workers", "1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help="tracking store (default: MLFLOW_TRACKING_URI, else "
                                      "sqlite:///<repo>/mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="pruning", help="experiment name (default: pruning)")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # see below
    args = parser.parse_args(argv)
    if args.serve_only:
        return serve(server_command(args.uri, args.port), {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    uri = tracking.resolve_uri(args.uri)
    remote = uri.startswith(("http://", "https://"))
    try:
        if not remote and not 0 < args.port < 65536:
            raise ConfigError(f"--port={args.port}: allowed is 1..65535")
        client = tracking.existing_client(uri)
        exp = client.get_experiment_by_name(args.experiment)
        if exp is not None and exp.lifecycle_stage != "active":
            raise ConfigError(f"experiment {args.experiment!r} in {uri} is deleted; restore it with: "
                              f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
                              f"--experiment-id {exp.experiment_id}")
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments(max_results=50))) or "none"
            raise ConfigError(f"no experiment {args.experiment!r} in {uri} (experiments: {names})")
        if not remote and not port_free(args.port):
            raise ConfigError(f"--port={args.port}: {HOST}:{args.port} is in use (another `make ui`?); "
                              "choose another port")
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    base = uri.rstrip("/") if remote else f"http://{HOST}:{args.port}"
    exp_id = exp.experiment_id
    view_id = save_view(client, exp_id, uri)
    print(f"experiment {exp.name!r} (id {exp_id}) in {uri}")
    print(f"runs:   {runs_link(base, exp_id, view_id)}")
    print(f"charts: {runs_link(base, exp_id, view_id, charts=True)}")
    sweep = newest_sweep(client, exp_id)
    if sweep is not None:
        print(f"sweep:  {run_link(base, exp_id, sweep.info.run_id)}  "
              f"({sweep.info.run_name}, the newest: frontier/<method>/* against sparsity in per mille)")
    if remote:
        print(f"{uri} is a tracking server: its UI is already served there")
        return 0
    print(f"serving {uri} on {base} (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    # This process holds MLflow's client (about 200 MB): a fresh one, without it, watches the server.
    command = [sys.executable, "-m", "pipeline.ui", "--serve-only", "--uri", uri, "--port", str(args.port)]
    os.execv(command[0], command)
    return 0  # not reached


def serve(command: list[str], env: dict[str, str], grace: float = 20.0) -> int:
    """Run the server in the foreground until it ends or this process is told to stop (Ctrl-C, SIGTERM,
    SIGHUP); then pass the server ONE signal and wait for it (SIGKILL after `grace` seconds).

    The server runs in its own process group: a terminal's Ctrl-C reaches the whole foreground group, and
    `mlflow server` forwards each signal to its uvicorn child, so uvicorn would get two and quit with a
    traceback. It also dies with this process (Linux: PR_SET_PDEATHSIG), even one killed hard."""
    proc: list[subprocess.Popen] = []
    stopping: list[float] = []

    def forward(signum, _frame):
        if not stopping:
            stopping.append(time.monotonic())
            if proc and proc[0].poll() is None:
                proc[0].send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        proc.append(subprocess.Popen(command, env=env, process_group=0, preexec_fn=_die_with_parent))
        if stopping:  # told to stop before the server existed
            proc[0].send_signal(signal.SIGTERM)
        while True:
            try:
                code = proc[0].wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > grace:
                    os.killpg(proc[0].pid, signal.SIGKILL)
    finally:
        if proc and proc[0].poll() is None:
            os.killpg(proc[0].pid, signal.SIGKILL)
            proc[0].wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        print("stopped", file=sys.stderr)
        return 0
    return code


def _die_with_parent() -> None:
    """In the server's process, before exec: get SIGTERM when the process that started it ends (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
