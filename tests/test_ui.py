"""The MLflow view in a real browser: `python -m pipeline.ui` serves a small sweep's store on 127.0.0.1 and
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) opens the links it prints."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, run_pipeline

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOBS = ["magnitude-0.30", "magnitude-0.60", "filter-0.30", "filter-0.60"]
ACCURACY = 'metrics.`eval/accuracy`'

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no browser: {CHROMIUM} is missing "
                                "(apt-get install chromium)")


def ui(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "pipeline.ui", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc=None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    output = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} (waited {timeout:.0f}s)\n{output}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 30) -> int:
    """Ctrl-C as a terminal sends it (to the whole process group); SIGKILL if it does not end in time."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait(10)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    run_pipeline(["-m", "method=magnitude,filter", "sparsity.target=0.3,0.6", "training=smoke"], tmp)
    return tmp


@pytest.fixture(scope="module")
def served(store):
    """`python -m pipeline.ui` on a free port, as `make ui` runs it: the links it printed, stopped at the end."""
    port, log = free_port(), store / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.ui", "--uri", f"sqlite:///{store}/mlflow.db",
                                 "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        text = wait_for(lambda: "serving" in log.read_text() and log.read_text(), 60, "no links printed", proc, log)
        links = dict(re.findall(r"^(runs|charts|sweep):\s+(\S+)", text, re.M))
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), 180, "the server did not answer", proc, log)
        yield {"proc": proc, "port": port, "log": log, "dir": store, **links}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")

    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(served["dir"] / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def open_page(browser, url: str, expected: list[str], screenshot: Path):
    """The page at url once its text holds every expected string (up to 90 s), with its screenshot saved."""
    page = browser.new_page()
    page.goto(url)
    try:
        page.wait_for_function("names => names.every(n => document.body.innerText.includes(n))", arg=expected,
                               timeout=90_000, polling=500)
    finally:
        page.screenshot(path=str(screenshot))
    return page


def experiment_id(store: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store}/mlflow.db").get_experiment_by_name("pruning").experiment_id


def job_metrics(store: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{store}/mlflow.db").search_runs([experiment_id(store)], "tags.method IS NOT NULL")
    return {r.info.run_name: r.data.metrics["eval/accuracy"] for r in runs}


def test_missing_store_or_experiment_is_one_line_and_exit_2(store, tmp_path):
    proc = ui("--uri", f"sqlite:///{tmp_path}/none.db")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and f"{tmp_path}/none.db" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none.db").exists()  # never created
    proc = ui("--uri", f"sqlite:///{store}/mlflow.db", "--experiment", "nope")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: no experiment 'nope' in sqlite:///")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_links_open_the_model_training_view(served):
    exp, port = experiment_id(served["dir"]), served["port"]
    assert served["runs"].startswith(f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning&")
    assert served["charts"].endswith("&compareRunsMode=CHART")
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/{exp}/runs/[0-9a-f]{{32}}/model-metrics"
                        r"\?workflowType=machine_learning", served["sweep"])
    with socket.socket() as s:  # the server listens on the loopback address only
        assert s.connect_ex(("127.0.0.1", port)) == 0


def test_runs_page_lists_the_jobs_with_their_metrics(served, browser):
    """The printed runs link, no click: the four jobs, best eval/accuracy first, their values in view."""
    expected = job_metrics(served["dir"])
    assert sorted(expected) == sorted(JOBS)
    page = open_page(browser, served["runs"], [*JOBS, "eval/accuracy", "eval/sparsity"],
                     served["dir"] / "runs.png")
    assert "Evaluation runs" not in page.inner_text("body")  # the GenAI view's navigation
    table = page.inner_text(".ag-root-wrapper")
    assert "sweep-" not in table and "baseline-" not in table  # the jobs only
    assert "4 matching runs" in page.inner_text("body")
    box = page.locator(f'.ag-header-cell[col-id="{ACCURACY}"]').bounding_box()
    view = page.locator(".ag-header-viewport").bounding_box()  # the scrolled part of the table, as shown
    assert box and view and view["x"] <= box["x"] and box["x"] + box["width"] <= view["x"] + view["width"], \
        "the eval/accuracy column is out of view"
    shown = {}
    for name in JOBS:
        row = page.locator(".ag-pinned-left-cols-container .ag-row", has_text=name).get_attribute("row-index")
        cell = page.locator(f'.ag-center-cols-container .ag-row[row-index="{row}"] [col-id="{ACCURACY}"]')
        shown[int(row)] = (name, float(cell.inner_text()))
    for name, value in shown.values():
        assert value == pytest.approx(expected[name], abs=1e-12), name
    values = [value for _, (_, value) in sorted(shown.items())]
    assert values == sorted(values, reverse=True), "not sorted by eval/accuracy, best first"
    page.close()


def test_charts_link_plots_accuracy_against_sparsity(served, browser):
    page = open_page(browser, served["charts"], ["eval/sparsity vs. eval/accuracy",
                                                 "eval/sparsity vs. eval/speedup_theoretical"],
                     served["dir"] / "charts.png")
    assert "Evaluation runs" not in page.inner_text("body")
    page.close()


def test_sweep_page_charts_the_frontier(served, browser):
    """The newest sweep's parent run, Model metrics tab: each method's frontier series as charts."""
    series = [f"frontier/{m}/{name}" for m in ("magnitude", "filter") for name in ("accuracy", "flops_ratio")]
    page = open_page(browser, served["sweep"], ["sweep-", "Model metrics", *series], served["dir"] / "sweep.png")
    text = page.inner_text("body")
    assert "Evaluation runs" not in text
    for method in ("magnitude", "filter"):  # a section per method, a chart per series
        assert page.get_by_text(f"frontier/{method}", exact=True).count() == 1
    page.close()


def test_ctrl_c_stops_the_server(served):
    proc, port = served["proc"], served["port"]
    assert proc.poll() is None
    started = time.monotonic()
    code = stop(proc)
    log = served["log"].read_text()
    assert time.monotonic() - started < 30 and code in (0, -signal.SIGINT, 130), (code, log[-2000:])
    assert not answers(f"http://127.0.0.1:{port}/health")
    assert "Traceback" not in log


def test_the_runs_view_is_saved_once(served):
    """The view the runs link opens is an experiment tag that `make ui` wrote: another `make ui` leaves it
    as it is, removes an older version of it and keeps the user's own views."""
    from mlflow.tracking import MlflowClient

    from pipeline import ui as pipeline_ui

    uri, prefix = f"sqlite:///{served['dir']}/mlflow.db", "mlflow.sharedViewState."
    client, exp = MlflowClient(uri), experiment_id(served["dir"])
    view = re.search(r"viewStateShareKey=([\w-]+)", served["runs"]).group(1)
    saved = client.get_experiment(exp).tags[prefix + view]
    client.set_experiment_tag(exp, f"{prefix}pipeline-jobs-00000000", saved)  # as an older `make ui` left it
    client.set_experiment_tag(exp, f"{prefix}mine", saved)
    assert pipeline_ui.save_view(client, exp, uri) == view
    tags = client.get_experiment(exp).tags
    assert sorted(k for k in tags if k.startswith(prefix)) == [f"{prefix}mine", prefix + view]
    assert tags[prefix + view] == saved
    assert pipeline_ui.runs_link("http://h:1", exp, None) == (  # no view: the filter and the order only
        f"http://h:1/#/experiments/{exp}/runs?workflowType=machine_learning&searchFilter=tags.method%20IS%20NOT%20NULL"
        "&orderByKey=metrics.%60eval%2Faccuracy%60&orderByAsc=false")
