import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import pipeline  # noqa: F401  (sets TensorFlow's environment before any test imports it)

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")


def compose_config(overrides=()):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_pipeline(args, tmp_path, check=True, timeout=600, env=None):
    """python -m pipeline.run as a user runs it, into a tracking store under tmp_path."""
    cmd = [sys.executable, "-m", "pipeline.run", *args]
    if not any(a.startswith("tracking.uri=") for a in args):
        cmd.append(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    if not any(a.startswith("hydra.run.dir=") for a in args):
        cmd += [f"hydra.run.dir={tmp_path}/outputs", f"hydra.sweep.dir={tmp_path}/multirun"]
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def no_tensorflow_here(tmp_path) -> dict[str, str]:
    """An environment in which the process a test starts (a sweep's) cannot import TensorFlow, while the
    processes that one starts (its workers) import the real one: the sweep's process need not import it."""
    fake = tmp_path / "no-tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import importlib, os, sys\n"
        f"if os.getppid() == {os.getpid()}:\n"
        "    raise ImportError('the sweep imported TensorFlow')\n"
        f"sys.path[:] = [p for p in sys.path if p != {str(fake.parent)!r}]\n"
        "del sys.modules['tensorflow']\n"
        "sys.modules['tensorflow'] = importlib.import_module('tensorflow')\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


def run_in_process(tmp_path, overrides=()):
    """One job as python -m pipeline.run runs it (validate, load, fit check, run_job), in this process,
    into a tracking store under tmp_path: its result ({run_id, metrics})."""
    from pipeline.config import validate
    from pipeline.models import check_fits
    from pipeline.run import run_job

    cfg = compose_config([*overrides, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    parts = validate(cfg)
    data = parts["data"].load(cfg.seed)
    check_fits(parts["model"], data.input_shape, data.num_classes)
    return run_job(cfg, parts, data)


@pytest.fixture
def client_for():
    from mlflow.tracking import MlflowClient

    return lambda tmp_path: MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="session")
def digits():
    from pipeline.data import Digits

    return Digits().load(0)


def one_line_error(fn, *needles) -> str:
    """fn() raises a one-line DataError naming every needle; its message."""
    from pipeline.data import DataError

    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg
