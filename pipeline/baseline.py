"""Train each baseline once: a dense model is identified by a hash of exactly the config that
determines it, kept on disk beside the tracking store (sqlite, or no tracking), or as an artifact of its
baseline run on a tracking server (RunStore), and reused by every job that shares it.

Safe across processes: one job trains while the others wait (on a file lock, or on the training
worker's claim in the tracking store), then load. A file that fails to verify (checksum) or to load is
trained again, never used.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline import tracking
from pipeline.config import stable_hash

log = logging.getLogger(__name__)


def baseline_spec(ident: dict[str, Any], penalty: dict | None, pretrained: bool = False) -> dict[str, Any]:
    """Everything that determines a trained dense model, and nothing else (`ident`: config.identity).
    A pretrained model (model=file, trained=true) is its file's content fitted to the data: no seed, no training."""
    if pretrained:
        return {k: ident[k] for k in ("data", "model", "data_digest", "code_version")}
    numerics = {k: ident["training"][k] for k in ("mixed_precision", "jit_compile")
                if ident["training"].get(k) is not None}  # set: another model (unset: the hashes stay)
    return {**{k: ident[k] for k in ("data", "model", "seed", "data_digest", "code_version")},
            "training": ident["training"]["baseline"], "deterministic": ident["training"]["deterministic"],
            "bn_recalibration": ident["training"]["bn_recalibration"], "penalty": penalty, **numerics}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_loaded: collections.OrderedDict = collections.OrderedDict()  # "folder:checksum" -> model this process loaded


def load_verified(folder: Path):
    """The cached model if its file matches its recorded checksum and loads; else None. A file this process
    loaded before (the same checksum) is not read again: its model is copied (half the time of a load)."""
    import keras

    from pipeline.stages.loop import cached

    meta_path, model_path = folder / "meta.json", folder / "model.keras"
    if not meta_path.exists():
        return None

    def load():
        if _sha256(model_path) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        return keras.saving.load_model(model_path, compile=False, safe_mode=True)

    try:
        meta = json.loads(meta_path.read_text())
        loaded = cached(_loaded, f"{folder}:{meta['sha256']}", load)
        copy = keras.models.clone_model(loaded)
        if [v.path for v in copy.variables] != [v.path for v in loaded.variables]:  # masks are keyed by path
            return load()
        copy.set_weights(loaded.get_weights())
        return copy
    except Exception as e:
        log.warning("baseline %s is unusable (%s): training it again", folder.name, e)
        return None


def obtain(spec: dict[str, Any], cache: Path, build: Callable, train: Callable,
           on_trained: Callable | None = None):
    """Return (model, hash, trained_now). `train(model)` returns its history; `on_trained(hash, model,
    history, path)` is called once, by the process that trained it. The model returned is always the
    one loaded from the cache, so a job's result cannot depend on whether it trained the baseline
    (training-only state such as a regularizer on a variable is not saved)."""
    key = stable_hash(spec)
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        model = load_verified(folder)
        if model is not None:
            return model, key, False
        model = build()
        history = train(model)
        tmp = folder / "model.tmp.keras"
        model.save(tmp)
        meta = {"hash": key, "spec": spec, "sha256": _sha256(tmp)}
        os.replace(tmp, folder / "model.keras")
        (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2, default=str))
        os.replace(folder / "meta.json.tmp", folder / "meta.json")
        if on_trained is not None:
            on_trained(key, model, history, folder / "model.keras")
        return load_verified(folder), key, True


_scores: collections.OrderedDict = collections.OrderedDict()  # baseline hash and weights -> test metrics


def test_metrics(model, weights: list, data, key: str) -> dict[str, float]:
    """The baseline's test metrics (evaluate.test_metrics), computed once per process for its hash `key` and
    `weights` (the model's): every job of a sweep starts from the same baseline."""
    from pipeline.data import arrays_digest
    from pipeline.stages.evaluate import test_metrics
    from pipeline.stages.loop import cached

    return dict(cached(_scores, f"{key}:{arrays_digest(*weights)}", lambda: test_metrics(model, data)))


def for_job(conf: dict[str, Any], parts: dict, data, store):
    """The job's trained dense model: (model, hash, trained_now). A baseline trained here is logged once,
    as its own run (tag kind=baseline), in the job's tracking.Store."""
    from pipeline.config import identity
    from pipeline.stages.evaluate import test_metrics
    from pipeline.stages.train import train_baseline

    method, spec, phase = parts["method"], parts["model"], parts["training"].baseline
    build = lambda: spec.build(data.input_shape, data.num_classes)  # noqa: E731
    spec.prepare_loading()  # e.g. model.safe_mode=false: the cached copy loads as the file did
    ident = identity(conf["seed"], parts, data.digest)
    if spec.pretrained:  # the file is the baseline: evaluated, never trained
        spec_b = baseline_spec(ident, None, pretrained=True)
    else:
        spec_b = baseline_spec(ident, method.penalty(build()))

    def train(model):  # and recalibrate its BatchNorm (a pretrained file: neither)
        if spec.pretrained:
            return {}
        return train_baseline(model, data, phase, method, bn_recalibration=parts["training"].bn_recalibration)

    def describe(b, trained, history, path):  # what a baseline run holds
        b.params(tracking.params_of(spec_b))
        b.history("train", history)  # per epoch; baseline/* holds the test-set figures
        b.metrics(test_metrics(trained, data), prefix="baseline/")
        b.artifact(path, "model")

    if store.track.enabled and tracking.sqlite_path(store.uri) is None:  # a server: nothing else is shared
        return RunStore(store.client, store.exp_id, store.track.claim_timeout).obtain(spec_b, build, train, describe)

    def log_run(key, trained, history, path):
        if store.client is None:
            return
        with tracking.Run(store.client, store.exp_id, f"baseline-{key[:8]}",
                          {"kind": "baseline", "baseline_hash": key}) as b:
            describe(b, trained, history, path)

    return obtain(spec_b, tracking.store_dir(store.uri) / "baselines", build, train, log_run)


def seed_everything(seed: int, deterministic: bool) -> None:
    """One seed for initialisation, shuffling and pruning (Python's, NumPy's, Keras's and TensorFlow's, by
    keras.utils.set_random_seed); deterministic TF ops when asked.

    tf.random.set_seed also clears TensorFlow's kernel cache, after which every compiled function of the
    process (the loops a sweep's worker keeps across its jobs) rebuilds its kernels on its next call: about
    0.4 s a job. When TF has this seed already (a worker's next job), only its sequence of op seeds is reset:
    the pipeline's random ops are stateless or seeded per dataset, so no cached kernel holds random state
    (tests/test_speed.py: a job after others gives what it gives alone)."""
    import keras
    import tensorflow as tf
    from tensorflow.python.eager import context

    ctx = context.context()
    set_seed = tf.random.set_seed
    if getattr(ctx, "_seed", None) == seed:
        tf.random.set_seed = lambda s: setattr(ctx, "_rng", random.Random(s))
    try:
        keras.utils.set_random_seed(seed)
    finally:
        tf.random.set_seed = set_seed
    if deterministic:
        tf.config.experimental.enable_op_determinism()


class RunStore:
    """Baselines kept as the `model/model.keras` artifact of their baseline run (tag kind=baseline, found by
    its baseline_hash), read and written through the tracking server: a worker on any machine reuses them
    with no shared filesystem. The claim to train one is its RUNNING baseline run: a worker creates its run,
    and trains only if no other RUNNING run of that hash exists (else it deletes its run and waits), so two
    workers never both train. A trainer shows it lives by a heartbeat tag; one whose heartbeat stands still
    for `timeout` seconds (by the waiter's own clock), or whose process on this host has died, is marked
    KILLED and another worker takes over."""

    HEARTBEAT = "baseline.heartbeat"
    UNUSABLE = "baseline.unusable"
    POLL_S = 2.0

    def __init__(self, client, exp_id: str, timeout: float):
        self.client, self.exp_id, self.timeout = client, exp_id, timeout
        self.seen: dict[str, tuple[str, float]] = {}  # claim run id -> (heartbeat, when it last moved)

    def _runs(self, key: str, status: str):
        return self.client.search_runs([self.exp_id], f"tags.baseline_hash = '{key}' and tags.kind = 'baseline' "
                                       f"and attributes.status = '{status}'", order_by=["attributes.start_time DESC"])

    def obtain(self, spec: dict[str, Any], build: Callable, train: Callable, describe: Callable):
        """(model, hash, trained_now), as obtain(); describe(run, model, history, path) fills the run."""
        key, waiting = stable_hash(spec), None
        while True:
            model = self._load_finished(key)
            if model is not None:
                return model, key, False
            live = [r for r in self._runs(key, "RUNNING") if self._alive(r)]
            if not live:
                run = self._claim(key)
                if run is not None:
                    model = self._load_finished(key)  # a trainer that finished between the two searches above
                    if model is not None:
                        self.client.delete_run(run.id)
                        return model, key, False
                    return self._train(run, build, train, describe), key, True
            elif waiting != live[0].info.run_id:
                waiting = live[0].info.run_id
                log.info("baseline %s is being trained by run %s (host %s): waiting for it", key, waiting,
                         live[0].data.tags.get("host", "?"))
            time.sleep(self.POLL_S * random.uniform(0.5, 1.5))

    def _load_finished(self, key: str):
        import keras

        for run in self._runs(key, "FINISHED"):
            if run.data.tags.get(self.UNUSABLE):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(self.client.download_artifacts(run.info.run_id, "model/model.keras", tmp))
                try:
                    expected = json.loads(run.data.tags.get(tracking.CHECKSUMS_TAG, "{}")).get("model/model.keras")
                    if _sha256(path) != expected:
                        raise ValueError("checksum mismatch")
                    return keras.saving.load_model(path, compile=False, safe_mode=True)
                except Exception as e:
                    log.warning("baseline run %s is unusable (%s): training it again", run.info.run_id, e)
                    self.client.set_tag(run.info.run_id, self.UNUSABLE, str(e)[:500])
        return None

    def _alive(self, run) -> bool:
        """Alive unless its process on this host is gone, or its heartbeat has not moved for `timeout`;
        a dead claim is marked KILLED."""
        tags, run_id, now = run.data.tags, run.info.run_id, time.monotonic()
        beat = tags.get(self.HEARTBEAT, "")
        if self.seen.get(run_id, (None,))[0] != beat:
            self.seen[run_id] = (beat, now)
        local = tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit()
        if local and not tracking.alive(int(tags["pid"])):
            why = "its process ended"
        elif now - self.seen[run_id][1] > self.timeout:
            why = f"no heartbeat for {self.timeout:.0f}s"
        else:
            return True
        log.warning("baseline run %s stopped (%s): another worker takes it over", run_id, why)
        self.client.set_tag(run_id, "error", f"baseline trainer stopped: {why}")
        self.client.set_terminated(run_id, "KILLED")
        return False

    def _claim(self, key: str):
        """This worker's claim (its baseline run), or None when another worker claimed at the same time."""
        run = tracking.Run(self.client, self.exp_id, f"baseline-{key[:8]}",
                           {"kind": "baseline", "baseline_hash": key, self.HEARTBEAT: "0"})
        if any(r.info.run_id != run.id for r in self._runs(key, "RUNNING")):
            self.client.delete_run(run.id)  # both step back; the random pause lets one go first next time
            return None
        return run

    def _train(self, run, build: Callable, train: Callable, describe: Callable):
        import keras

        stop = threading.Event()

        def beat():  # a sign of life for the waiting workers, until the run is closed
            n = 0
            while not stop.wait(max(1.0, self.timeout / 5)):
                n += 1
                try:
                    self.client.set_tag(run.id, self.HEARTBEAT, str(n))
                except Exception:  # the server is away: the job fails on its own next request
                    pass

        threading.Thread(target=beat, daemon=True).start()
        try:
            with run, tempfile.TemporaryDirectory() as tmp:
                model = build()
                history = train(model)
                path = Path(tmp) / "model.keras"
                model.save(path)
                describe(run, model, history, path)
                # the model returned is the one saved, as a worker that loads it gets it
                return keras.saving.load_model(path, compile=False, safe_mode=True)
        finally:
            stop.set()
