"""Beyond one machine: a sweep through a real Ray head on 127.0.0.1 (2 workers) and through submitit's local
executor; the GPU options (mixed precision, XLA) on CPU, with pruned weights exactly zero."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, no_tensorflow_here
from omegaconf import OmegaConf
from test_failures import free_port

from pipeline import tracking
from pipeline.config import ConfigError, validate

PY = sys.executable
# A Ray node on loopback only: without this Ray swaps 127.0.0.1 for the machine's network address; and no
# token to share between the head and the sweep
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
SMOKE = ["training=smoke", "training.baseline.epochs=1", "training.finetune.epochs=1"]
pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on loopback with 2 CPUs (2 workers), stopped with its process group at the end."""
    port, tmp = free_port(), tmp_path_factory.mktemp("ray")
    cmd = [str(Path(PY).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={tmp}"]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **LOOPBACK_RAY})
    deadline = time.time() + 120
    while head.poll() is None and time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGKILL)  # the head, its GCS, raylet and workers (a graceful stop takes 35 s)
    head.wait()


def sweep(tmp_path, *args, env=None, targets="0.3,0.5"):
    """python -m pipeline.run -m from a folder of its own, into a sqlite store there."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [PY, "-m", "pipeline.run", "-m", *SMOKE, f"sparsity.target={targets}",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.sweep.dir={work}/multirun", *args]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900, env=full_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    return proc, client, runs


def check_sweep(proc, client, runs, job_logs="", n=2):
    """n jobs FINISHED, one baseline, the report on the parent run, progress counted to the end (in the
    sweep's output, or in the jobs' own logs where the launcher keeps them apart)."""
    jobs = [r for r in runs if r.data.tags.get("config_hash")]
    kinds = [r.data.tags.get("kind") for r in runs]
    assert [r.info.status for r in jobs] == ["FINISHED"] * n
    # one baseline (per code version: another helper's edit mid-sweep makes a new one)
    assert kinds.count("baseline") == len({j.data.tags["code_version"] for j in jobs}) and kinds.count("sweep") == 1
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert {j.data.tags["mlflow.parentRunId"] for j in jobs} == {parent.info.run_id}
    assert "results.md" in {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    out = proc.stdout + proc.stderr + job_logs
    assert f"of {n}] magnitude-0.30 finished" in out and f"{n} done" in out, out[-3000:]
    assert f"sweep done: {n} finished, 0 skipped" in out
    return jobs


def test_a_sweep_runs_on_a_ray_cluster_of_two_workers(ray_head, tmp_path):
    """Three jobs on two long-lived workers: each imports TensorFlow once and runs its jobs one after another;
    the sweep's process never imports it."""
    proc, client, runs = sweep(tmp_path, "hydra/launcher=ray", targets="0.3,0.5,0.7",
                               env={"RAY_ADDRESS": ray_head, **LOOPBACK_RAY, **no_tensorflow_here(tmp_path)})
    jobs = check_sweep(proc, client, runs, n=3)
    out = proc.stdout + proc.stderr
    assert "Ray launcher: 3 jobs on 2 workers on 127.0.0.1" in out
    workers = {int(pid) for pid in re.findall(r"pid (\d+) on \S+ \(preloaded in", out)}
    assert len(workers) == 2 and {int(j.data.tags["pid"]) for j in jobs} == workers  # one of them ran 2 jobs
    # a worker trained the baseline as the sweep started, before any job
    assert {j.data.tags["baseline_trained_here"] for j in jobs} == {"false"}


def test_a_model_that_does_not_fit_stops_a_ray_sweep_in_one_line(ray_head, tmp_path):
    """The fit check made in a worker still stops the sweep before any job, with the one-line error."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_head, **LOOPBACK_RAY, **no_tensorflow_here(tmp_path)}
    proc = subprocess.run([PY, "-m", "pipeline.run", "-m", *SMOKE, "sparsity.target=0.3,0.5", "hydra/launcher=ray",
                           "model.padding=valid", "model.conv_layers=5", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                           f"hydra.sweep.dir={work}/multirun"], cwd=work, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: model=seed_cnn does not fit images of shape (8, 8, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.db").exists()


def test_a_ray_sweep_whose_cluster_is_not_there_stops_in_one_line(tmp_path):
    """RAY_ADDRESS naming no cluster: one line at once, exit 2, nothing written (Ray itself retries for minutes)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run([PY, "-m", "pipeline.run", "-m", *SMOKE, "sparsity.target=0.3,0.5", "hydra/launcher=ray",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.sweep.dir={tmp_path}/multirun"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": address, **LOOPBACK_RAY})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: hydra/launcher=ray: no Ray cluster answers at {address}")
    assert not (tmp_path / "m.db").exists()


def test_a_sweep_runs_through_submitit(tmp_path):
    """submitit_local: the SLURM launcher's code path (pickled jobs in their own processes) without SLURM."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc, client, runs = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15")
    logs = "".join(p.read_text() for p in (tmp_path / "work" / "multirun" / ".submitit").rglob("*.out"))
    check_sweep(proc, client, runs, logs)


def test_the_ray_launcher_sizes_its_workers_tensorflow(monkeypatch):
    """A worker's TensorFlow as wide as its CPUs, with the sweep's TF settings (a cluster started before the
    sweep does not pass them on; what the jobs read from the sweep goes with each job: the sweep test)."""
    from hydra_plugins.pipeline_ray_launcher.ray_launcher import TF_ENV, RayLauncher

    for name in TF_ENV:
        monkeypatch.setenv(name, f"value of {name}")
    launcher = RayLauncher(remote=OmegaConf.create({"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}}))
    assert launcher._options() == {"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}}
    threads = {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2"}
    assert launcher._env() == {**threads, **{k: f"value of {k}" for k in TF_ENV}}


@pytest.mark.parametrize("remote, workers, total, expected", [
    ({"num_cpus": 1}, None, {"CPU": 2.0}, 2),
    ({"num_cpus": 1}, None, {"CPU": 8.0}, 3),  # at most one per job
    ({"num_cpus": 3}, None, {"CPU": 8.0}, 2),
    ({"num_cpus": 1, "num_gpus": 1}, None, {"CPU": 8.0, "GPU": 2.0}, 2),
    ({"num_cpus": 1, "num_gpus": 1}, None, {"CPU": 8.0}, 1),  # none fits: one, which waits for room
    ({"memory": 4e9, "resources": {"big": 1}}, None, {"CPU": 8.0, "memory": 9e9, "big": 3.0}, 2),
    ({"num_cpus": 1}, 1, {"CPU": 8.0}, 1),
])
def test_the_ray_launcher_starts_a_worker_per_slot(remote, workers, total, expected):
    from hydra_plugins.pipeline_ray_launcher.ray_launcher import RayLauncher

    assert RayLauncher(remote=OmegaConf.create(remote), workers=workers)._size(3, total) == expected


# The GPU options, on CPU: they compose, and masks hold exactly.

@pytest.mark.parametrize("policy, jit", [("mixed_float16", True), ("mixed_bfloat16", False)])
def test_mixed_precision_and_xla_keep_pruned_weights_exactly_zero(policy, jit, digits):
    import keras
    from tensorflow.python.framework import config as tf_config

    from pipeline.pruning.magnitude import Magnitude
    from pipeline.pruning.masks import MaskedModel
    from pipeline.stages import train

    parts = validate(compose_config([*SMOKE, "model=seed_cnn", f"training.mixed_precision={policy}",
                                     f"training.jit_compile={str(jit).lower()}", "training.deterministic=false"]))
    deterministic = tf_config.is_op_determinism_enabled()  # an earlier job's: Keras would then skip XLA
    tf_config.disable_op_determinism()
    try:
        train.configure(parts["training"])
        model = parts["model"].build(digits.input_shape, digits.num_classes)
        assert model.layers[1].compute_dtype == policy.split("_")[1] and model.layers[1].kernel.dtype == "float32"
        train.compile_model(model, parts["training"].finetune)
        assert model.jit_compile is jit
        scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert scaled == (policy == "mixed_float16")  # loss scaling for float16 only
        masked = MaskedModel(model, Magnitude().masks(model, 0.7, 0))
        train.fit(model, digits, parts["training"].finetune, "tiny")
        for path, keep in masked.masks.items():
            weight = masked.variables[path].numpy()
            assert weight.dtype == np.float32 and np.all(weight[~keep] == 0), path
            assert np.count_nonzero(weight[keep]) > 0.9 * keep.sum()
    finally:
        keras.mixed_precision.set_global_policy("float32")
        train.JIT_COMPILE = "auto"
        if deterministic:
            tf_config.enable_op_determinism()


def test_precision_options_are_checked():
    with pytest.raises(ConfigError, match=r"training\.mixed_precision='float16' is not allowed: null"):
        validate(compose_config(["training.mixed_precision=float16"]))
    with pytest.raises(ConfigError, match=r"training\.jit_compile=True is not allowed: .*deterministic=false"):
        validate(compose_config(["training.jit_compile=true"]))


def test_a_run_records_its_device_and_tensorflow_build():
    import tensorflow as tf

    tags = tracking.device_tags()
    assert (tags["device"] == "CPU") == (not tf.config.list_physical_devices("GPU"))  # else the GPU's name
    assert tags["tf.version"] and "is_cuda_build" in json.loads(tags["tf.build"]) and tags["tf.onednn"] == "1"
